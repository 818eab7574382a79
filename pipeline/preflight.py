"""``sensorwatch check``: before a deployment starts, what would stop it or lose data, one line each.

Checks, in order (each independent of the others' outcome):
  configuration  valid (else the command stops before any check, naming the key)
  database   reachable, and its schema at the newest migration
  models     every group has an active model whose bundle verifies against the configuration
  model_dir  exists (or can be created) and is writable: the nightly retrain saves bundles there
  kafka      a broker answers; the readings topic exists (with its partitions); the dead-letter and alert topics
             exist, or are only a warning (a broker that auto-creates topics creates them on the first send)
Each check is ``ok``, ``warn`` (works, but look) or ``fail`` (the pipeline would not start, would wait, or could
not store what it produces).
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from kafka.errors import KafkaError
from sqlalchemy.exc import SQLAlchemyError

from pipeline import kafka_io
from pipeline.config import Config
from pipeline.errors import ConfigError, ModelError, TransientError
from pipeline.registry import load_version
from pipeline.store import repo
from pipeline.store.db import describe_error, make_engine, make_sessionmaker, pending_migrations

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
    assets = sum(len(g.assets) for g in config.groups)
    return [Check("configuration", "ok", f"{len(config.groups)} group(s), {assets} asset(s)"),
            *_database_and_models(config), _model_dir(config.model_dir), *_kafka(config, kafka_timeout_s)]


def _database_and_models(config: Config) -> list[Check]:
    url = config.database.url
    try:
        engine = make_engine(url)
    except (SQLAlchemyError, ImportError) as exc:  # e.g. the URL's driver is not installed
        return [Check("database", "fail", describe_error(exc, url)), Check("models", "fail", "not checked")]
    try:
        if pending_migrations(engine):
            return [Check("database", "fail", f"{config.database.safe_url}: schema not up to date: run "
                          "'sensorwatch db upgrade'"), Check("models", "fail", "not checked")]
        with make_sessionmaker(engine)() as session:
            active = repo.active_model_versions(session=session)
    except (SQLAlchemyError, ImportError) as exc:
        return [Check("database", "fail", describe_error(exc, url)), Check("models", "fail", "not checked")]
    finally:
        engine.dispose()
    problems, serving = [], []
    for group in config.groups:
        row = active.get(group.name)
        if row is None:
            problems.append(f"{group.name}: no active model (sensorwatch train)")
            continue
        try:
            load_version(row, group)
            serving.append(f"{group.name}: {row.version}")
        except (ModelError, ConfigError, OSError) as exc:
            problems.append(f"{group.name}: {row.version} refused: {exc}")
    models = Check("models", "fail", "; ".join(problems)) if problems else Check("models", "ok", "; ".join(serving))
    return [Check("database", "ok", f"{config.database.safe_url}: schema at the newest migration"), models]


def _model_dir(path: Path) -> Check:
    """Whether bundles can be saved under ``path``: by trying (creating a scratch directory in it, or in the nearest
    existing parent when it does not exist yet), since permission bits do not bind every user."""
    target = Path(path).resolve()
    if target.exists() and not target.is_dir():
        return Check("model_dir", "fail", f"{target}: exists and is not a directory")
    existing = next((p for p in (target, *target.parents) if p.exists()), None)
    if existing is None or not existing.is_dir():
        return Check("model_dir", "fail", f"{target}: no directory to create it in")
    try:
        with tempfile.TemporaryDirectory(dir=existing, prefix=".sensorwatch-check-"):
            pass
    except OSError as exc:
        return Check("model_dir", "fail", f"{target}: cannot write in {existing} ({exc.strerror})")
    if existing != target:
        return Check("model_dir", "ok", f"{target}: will be created (in {existing})")
    return Check("model_dir", "ok", f"{target}: writable")


def _kafka(config: Config, timeout_s: float) -> list[Check]:
    kafka = config.kafka
    produced = [("dead-letter topic", kafka.dead_letter_topic)]
    if config.sinks.kafka is not None and config.sinks.kafka.enabled:
        produced.append(("alert topic", config.sinks.kafka.topic))
    try:
        partitions = kafka_io.topic_partitions(kafka, [kafka.topic, *(t for _, t in produced)], timeout_s=timeout_s)
    except (KafkaError, TransientError) as exc:
        return [Check("kafka", "fail", f"{kafka.bootstrap_servers}: no broker answered within {timeout_s:g} s ({exc}); "
                      "check kafka.bootstrap_servers and kafka.security")]
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
