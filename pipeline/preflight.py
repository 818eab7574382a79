"""``sensorwatch check``: before a deployment starts, what would stop it or lose data, one line each.

Checks, in order (each independent of the others' outcome):
  database   reachable, and its schema at the newest migration
  models     every group has an active model whose bundle verifies against the configuration
  model_dir  exists (or can be created) and is writable: the nightly retrain saves bundles there
  kafka      a broker answers; the readings topic exists (with its partitions); the dead-letter and alert topics
             exist, or are only a warning (a broker that auto-creates topics creates them on the first send)
Each check is ``ok``, ``warn`` (works, but look) or ``fail`` (the pipeline would not start, or would lose data).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from kafka.errors import KafkaError
from sqlalchemy.exc import SQLAlchemyError

from pipeline import kafka_io
from pipeline.config import Config
from pipeline.errors import ModelError
from pipeline.registry import load_version
from pipeline.store import repo
from pipeline.store.db import make_engine, make_sessionmaker, pending_migrations

Status = Literal["ok", "warn", "fail"]


@dataclass(frozen=True)
class Check:
    """One line of the report."""

    name: str
    status: Status
    detail: str

    def to_dict(self) -> dict[str, str]:
        """JSON-friendly form."""
        return asdict(self)


def run_checks(config: Config, *, kafka_timeout_s: float = 10.0) -> list[Check]:
    """Every check of the module docstring, in order."""
    return [*_database_and_models(config), _model_dir(config.model_dir), *_kafka(config, kafka_timeout_s)]


def _first_line(exc: BaseException) -> str:
    lines = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _database_and_models(config: Config) -> list[Check]:
    engine = make_engine(config.database.url)
    where = config.database.safe_url
    try:
        try:
            behind = pending_migrations(engine)
        except SQLAlchemyError as exc:
            return [Check("database", "fail", f"{where}: {_first_line(exc)}"),
                    Check("models", "fail", "not checked: the database cannot be read")]
        if behind:
            return [Check("database", "fail", f"{where}: schema not up to date: run 'sensorwatch db upgrade'"),
                    Check("models", "fail", "not checked: the schema is not up to date")]
        with make_sessionmaker(engine)() as session:
            active = repo.active_model_versions(session=session)
        problems, serving = [], []
        for group in config.groups:
            row = active.get(group.name)
            if row is None:
                problems.append(f"{group.name}: no active model (sensorwatch train)")
                continue
            try:
                load_version(row, group)
                serving.append(f"{group.name}: {row.version}")
            except ModelError as exc:
                problems.append(f"{group.name}: {row.version} refused: {exc}")
        models = Check("models", "fail", "; ".join(problems)) if problems else Check("models", "ok", "; ".join(serving))
        return [Check("database", "ok", f"{where}: schema at the newest migration"), models]
    finally:
        engine.dispose()


def _model_dir(path: Path) -> Check:
    target = Path(path)
    existing = next((p for p in (target, *target.parents) if p.exists()), None)
    if existing is None or not existing.is_dir():
        return Check("model_dir", "fail", f"{target}: no directory to create it in")
    if existing != target:
        if os.access(existing, os.W_OK):
            return Check("model_dir", "ok", f"{target}: will be created (in {existing})")
        return Check("model_dir", "fail", f"{target}: cannot be created ({existing} is not writable)")
    try:
        with tempfile.NamedTemporaryFile(dir=target):
            pass
    except OSError as exc:
        return Check("model_dir", "fail", f"{target}: not writable ({exc.strerror})")
    return Check("model_dir", "ok", f"{target}: writable")


def _kafka(config: Config, timeout_s: float) -> list[Check]:
    kafka = config.kafka
    produced = [("dead-letter topic", kafka.dead_letter_topic)]
    if config.sinks.kafka is not None and config.sinks.kafka.enabled:
        produced.append(("alert topic", config.sinks.kafka.topic))
    try:
        partitions = kafka_io.topic_partitions(kafka, [kafka.topic, *(t for _, t in produced)], timeout_s=timeout_s)
    except KafkaError as exc:
        return [Check("kafka", "fail", f"{kafka.bootstrap_servers}: no broker answered ({exc})")]
    out = [Check("kafka", "ok", f"{kafka.bootstrap_servers}: brokers answer")]
    if partitions[kafka.topic]:
        out.append(Check("readings topic", "ok", f"{kafka.topic}: {partitions[kafka.topic]} partition(s); up to "
                         f"{partitions[kafka.topic]} pipeline process(es) of group {kafka.group_id} share them"))
    else:
        out.append(Check("readings topic", "fail", f"{kafka.topic}: does not exist (the pipeline waits for it)"))
    for label, topic in produced:
        if partitions[topic]:
            out.append(Check(label, "ok", f"{topic}: {partitions[topic]} partition(s)"))
        else:
            out.append(Check(label, "warn", f"{topic}: does not exist; created on the first send only if the broker "
                             "auto-creates topics, else sending stalls the pipeline: create it"))
    return out
