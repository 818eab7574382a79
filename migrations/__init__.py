"""Alembic migrations of the sensorwatch schema (installed as ``sensorwatch_migrations``)."""
