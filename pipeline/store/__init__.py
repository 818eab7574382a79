"""Persistence: SQLAlchemy tables, repository functions, engine and migrations."""
