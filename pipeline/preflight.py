"""``sensorwatch check``: before a deployment starts, what would stop it or lose data, one line each.

Checks, in order (each independent of the others' outcome):
  configuration  valid (else the command stops before any check, naming the key)
  database   reachable, and its schema at the newest migration
  models     every group has an active model whose bundle verifies against the configuration
  pipelines  the running ``sensorwatch run`` processes; a warning for one that does not serve its group's active
             model two reload intervals and a minute after its activation (it has not reloaded), or that reported
             refusing its bundle since the activation
  alert sinks  (when a sink is configured or the outbox holds events) events pending and failed per sink; a warning
             for failed events, pending ones older than 5 minutes, or pending ones of a sink no longer configured
  model_dir  exists (or can be created) and is writable: the nightly retrain saves bundles there
  metrics port  free (``run`` serves /metrics and the health probes there), or serving a running pipeline's metrics
  kafka      a broker answers (else the last connection error); the readings topic exists (with its partitions);
             the dead-letter and alert topics exist, or are created on first use by the brokers (a warning), else
             a failure (a warning when the brokers' setting cannot be read)
Each check is ``ok``, ``warn`` (works, but look) or ``fail`` (the pipeline would not start, would wait, or could
not store what it produces).
"""

from __future__ import annotations

import errno
import socket
import tempfile
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from kafka.errors import KafkaError
from sqlalchemy.exc import SQLAlchemyError

from pipeline import kafka_io
from pipeline.config import Config
from pipeline.errors import ConfigError, ModelError, TransientError
from pipeline.registry import bundle_path, load_version, pending_changes, range_conflicts
from pipeline.serving import InstanceRow, behind, is_live, stale_after_s
from pipeline.sinks import SinkSummary, summarize_outbox
from pipeline.store import repo
from pipeline.store.db import describe_error, make_engine, make_sessionmaker, missing_sqlite_file, schema_problem
from pipeline.store.tables import Alert, ModelVersion

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
            *_database_and_models(config), _model_dir(config.model_dir), _metrics_port(config),
            *_kafka(config, kafka_timeout_s)]


def _metrics_port(config: Config) -> Check:
    """Whether ``run`` could listen on the metrics port (a second pipeline process on a host needs its own)."""
    host, port = config.metrics.host, config.metrics.port
    if not config.metrics.enabled:
        return Check("metrics port", "ok", "metrics.enabled is false: no endpoint")
    if port == 0:
        return Check("metrics port", "ok", f"{host}: any free port")
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds
            probe.bind((host, port))
    except OSError as exc:
        # check run beside the deployment: the port is held by that pipeline, where it should be
        if exc.errno == errno.EADDRINUSE and _serves_pipeline_metrics(host, port):
            return Check("metrics port", "ok", f"{host}:{port}: in use by a running sensorwatch pipeline (another "
                         "process on this host needs its own metrics.port)")
        return Check("metrics port", "fail", f"{host}:{port}: {exc.strerror} (a pipeline already running here? each "
                     "process on a host needs its own metrics.port)")
    return Check("metrics port", "ok", f"{host}:{port}: free")


def _serves_pipeline_metrics(host: str, port: int, timeout_s: float = 2.0) -> bool:
    """Whether ``host:port`` answers ``/metrics`` with a sensorwatch pipeline's metrics (a running ``run``)."""
    target = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    url = f"http://[{target}]:{port}/metrics" if ":" in target else f"http://{target}:{port}/metrics"
    try:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # the host itself, never a proxy
        with opener.open(url, timeout=timeout_s) as answer:
            return b"sensorwatch_readings_total" in answer.read(1 << 20)
    except (OSError, ValueError):
        return False


def _database_and_models(config: Config) -> list[Check]:
    url = config.database.url
    missing = missing_sqlite_file(url)
    if missing is not None:  # connecting would create an empty file
        return [Check("database", "fail", missing), Check("models", "fail", "not checked")]
    try:
        engine = make_engine(url)
    except (SQLAlchemyError, ImportError) as exc:  # e.g. the URL's driver is not installed
        return [Check("database", "fail", describe_error(exc, url)), Check("models", "fail", "not checked")]
    try:
        problem = schema_problem(engine)
        if problem:
            return [Check("database", "fail", f"{config.database.safe_url}: {problem}"),
                    Check("models", "fail", "not checked")]
        with make_sessionmaker(engine)() as session:
            active = repo.active_model_versions(session=session)
            sinks = _alert_sinks(summarize_outbox(session, config, datetime.now(UTC)))
            orphans = _orphaned_alerts(repo.list_alerts(session=session, status="open", limit=None), config)
            running = pipelines_check(repo.list_instances(session=session), active,
                                      repo.database_now(session=session),
                                      stale_after_s(config.retrain.reload_interval_s))
    except (SQLAlchemyError, ImportError) as exc:
        return [Check("database", "fail", describe_error(exc, url)), Check("models", "fail", "not checked")]
    finally:
        engine.dispose()
    problems, serving, pending = [], [], False
    for group in config.groups:
        row = active.get(group.name)
        if row is None:
            problems.append(f"{group.name}: no active model (sensorwatch train)")
            continue
        try:
            detector = load_version(row, group, config.model_dir)
            moved = bundle_path(row, config.model_dir) != Path(row.artifact_path)
            changes = pending_changes(detector, group) + range_conflicts(detector, group)
            serving.append(f"{group.name}: {row.version}" + (f" (bundle under model_dir; registered at "
                                                              f"{row.artifact_path})" if moved else "")
                           + (f": {'; '.join(changes)}" if changes else ""))
            pending = pending or bool(changes)
        except (ModelError, ConfigError, OSError) as exc:
            problems.append(f"{group.name}: {row.version} refused: {exc}")
    if problems:
        models = Check("models", "fail", "; ".join(problems))
    elif pending:
        models = Check("models", "warn", "; ".join(serving))
    else:
        models = Check("models", "ok", "; ".join(serving))
    return [Check("database", "ok", f"{config.database.safe_url}: schema at the newest migration"), models, running,
            *sinks, *orphans]


RECENTLY_GONE_S = 3600.0  # a process not seen for less than this (but past stale_s) is a warning: it died or hangs


def pipelines_check(rows: Sequence[InstanceRow], active: Mapping[str, ModelVersion], now: datetime,
                    stale_s: float) -> Check:
    """The running pipeline processes (``pipeline_instances``) and what they serve: a warning for each that does
    not serve its group's active model ``stale_s`` after its activation (``serving.behind``), and for processes
    last seen between ``stale_s`` and ``RECENTLY_GONE_S`` ago (killed, or hung, within the hour); older rows of
    processes that did not stop cleanly are only counted (their rows go after a week)."""
    live = [r for r in rows if is_live(r, now, stale_s)]
    gone = [r for r in rows if not is_live(r, now, stale_s)]
    recent = sum(1 for r in gone if (now - r.seen_at).total_seconds() <= RECENTLY_GONE_S)
    note = "" if not gone else (f"; {len(gone)} more not seen for over {stale_s:g} s ({recent} of them within the "
                                "hour: stopped without a clean exit, or hung: 'sensorwatch models serving')")
    lagging = behind(live, {g: (r.version, r.activated_at) for g, r in active.items()}, now, stale_s)
    status: Status = "warn" if lagging or recent else "ok"
    if not live:
        return Check("pipelines", status, f"none running{note}")
    if lagging:
        return Check("pipelines", status, f"{len(live)} running; " + "; ".join(lagging) + note)
    serving = sorted({f"{g}={v}" for r in live for g, v in r.serving.items()})
    return Check("pipelines", status, f"{len(live)} running, serving {', '.join(serving) or 'no model'}{note}")


def _orphaned_alerts(open_alerts: list[Alert], config: Config) -> list[Check]:
    """A warning for open alerts of assets no longer configured: no window will resolve them."""
    configured = config.asset_groups()
    orphans = [a for a in open_alerts if a.asset not in configured]
    if not orphans:
        return []
    shown = ", ".join(f"#{a.id} ({a.asset})" for a in orphans[:5]) + (" ..." if len(orphans) > 5 else "")
    return [Check("open alerts", "warn", f"{len(orphans)} open alert(s) of assets no longer configured, which no "
                                         f"window will resolve: {shown} (sensorwatch alerts resolve ID --by NAME)")]


STALE_PENDING_S = 300.0  # a pending alert event older than this means no pipeline delivers it, or the receiver is down


def _alert_sinks(summary: list[SinkSummary]) -> list[Check]:
    """One line on the alert outbox when a sink is configured or the outbox holds events: a warning for failed
    events, for pending events older than ``STALE_PENDING_S`` and for pending events of a sink no longer
    configured."""
    if not summary:
        return []
    notes, warn = [], False
    for x in summary:
        note = f"{x.label or x.sink}: {x.pending} pending, {x.failed} failed"
        if x.label is None and x.pending:
            note, warn = note + " (not configured: they wait until it is again)", True
        age = x.oldest_pending_s or 0.0
        if x.label is not None and age > STALE_PENDING_S:
            note, warn = note + f" (the oldest for {age / 60:.0f} min: is a pipeline running, the receiver up?)", True
        if x.failed:
            note, warn = note + " (`sensorwatch sinks status --failed 10`, then `sinks retry`)", True
        notes.append(note)
    return [Check("alert sinks", "warn" if warn else "ok", "; ".join(notes))]


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
    except ConfigError as exc:  # TLS files that do not load: no client was made
        return [Check("kafka", "fail", str(exc))]
    except (KafkaError, TransientError) as exc:
        return [Check("kafka", "fail", f"{kafka.bootstrap_servers}: no broker could be used within {timeout_s:g} s "
                      f"({exc}); check kafka.bootstrap_servers and kafka.security")]
    out = [Check("kafka", "ok", f"{kafka.bootstrap_servers}: brokers answer")]
    if kafka.security.sasl and not kafka.security.tls and kafka.security.sasl_mechanism == "PLAIN":
        out.append(Check("kafka security", "warn", "SASL PLAIN over SASL_PLAINTEXT sends the password in clear: use "
                         "SASL_SSL, or a SCRAM mechanism"))
    if partitions[kafka.topic]:
        out.append(Check("readings topic", "ok", f"{kafka.topic}: {partitions[kafka.topic]} partition(s); up to "
                         f"{partitions[kafka.topic]} pipeline process(es) of group {kafka.group_id} share them"))
    else:
        out.append(Check("readings topic", "fail", f"{kafka.topic}: does not exist (the pipeline waits for it); "
                         "create it with a partition for each pipeline process you will run, e.g. "
                         f"{kafka_io.create_topic_command(kafka, kafka.topic)}"))
    missing = [(label, topic) for label, topic in produced if not partitions[topic]]
    auto_create = kafka_io.auto_creates_topics(kafka) if missing else None
    out += [produced_topic_check(label, topic, partitions[topic], auto_create) for label, topic in produced]
    costs = {f"READ on topic {kafka.topic}": "the pipeline cannot consume",
             f"READ on group {kafka.group_id}": "the pipeline cannot join its consumer group or commit offsets",
             **{f"WRITE on topic {topic}": _UNWRITABLE_COST[label] for label, topic in produced}}
    needs = {kafka.topic: "READ", **{topic: "WRITE" for _, topic in produced}}
    out.append(permissions_check(kafka_io.permissions(kafka, needs, timeout_s=timeout_s), costs))
    return out


def permissions_check(answers: Mapping[str, bool | None], costs: Mapping[str, str]) -> Check:
    """The check of the principal's permissions from ``kafka_io.permissions``'s ``answers``; ``costs`` says what each
    missing one costs the pipeline. Fails on a refused one; warns when the brokers answered for none."""
    refused = [what for what, allowed in answers.items() if allowed is False]
    unknown = [what for what, allowed in answers.items() if allowed is None]
    if refused:
        return Check("kafka permissions", "fail", f"not allowed: {', '.join(refused)} ("
                     f"{'; '.join(dict.fromkeys(costs[w] for w in refused))}); grant them to the principal of "
                     "kafka.security on the cluster (kafka-acls.sh --add)")
    if len(unknown) == len(answers):
        return Check("kafka permissions", "warn", "the brokers reported no permissions (topics and group they do not "
                     "know yet: run check again once they exist; or an older broker, or no answer in time): not "
                     "checked")
    detail = f"allowed: {', '.join(w for w in answers if w not in unknown)}"
    if unknown:
        detail += f"; not reported: {', '.join(unknown)} (not known to the brokers yet: it shows at the first start)"
    return Check("kafka permissions", "ok", detail)


#: What a topic the pipeline produces to but may not write costs, by its label.
_UNWRITABLE_COST = {
    "dead-letter topic": "the first rejected reading stalls the pipeline (nothing is committed past it)",
    "alert topic": "alert events wait in the outbox, and fail after sinks.kafka.max_age_h",
}

#: What a missing topic the pipeline produces to costs, by its label.
_MISSING_COST = {
    "dead-letter topic": "the first rejected reading stalls the pipeline (nothing is committed past it) until it "
                         "exists",
    "alert topic": "alert events to it wait in the outbox until it exists, and fail after sinks.kafka.max_age_h (the "
                   "database keeps every alert)",
}


def produced_topic_check(label: str, topic: str, partitions: int, auto_create: bool | None) -> Check:
    """The check of a topic the pipeline produces to: ok when it exists; when it does not, a warning if the brokers
    create topics on first use (``auto_create``), a failure if they do not, and a warning naming both outcomes when
    that is unknown."""
    if partitions:
        return Check(label, "ok", f"{topic}: {partitions} partition(s)")
    cost = _MISSING_COST[label]
    if auto_create:
        return Check(label, "warn", f"{topic}: does not exist; the brokers create it on the first send "
                     "(auto.create.topics.enable), with their default partitions and settings")
    if auto_create is False:
        return Check(label, "fail", f"{topic}: does not exist and the brokers do not create topics on first use: "
                     f"{cost}; create it")
    return Check(label, "warn", f"{topic}: does not exist; unless the brokers create topics on first use (their "
                 f"setting could not be read), {cost}; create it")

