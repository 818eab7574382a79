"""``sensorwatch demo``: the whole product on one machine, end to end, with a verdict at the end.

Trains on a simulated day of normal data, streams simulated readings with injected anomalies (and a few malformed
messages) through a real Kafka broker and the real pipeline, then compares the alerts in the database with the ground
truth. Uses KAFKA_BOOTSTRAP_SERVERS and DATABASE_URL when set; otherwise starts a local broker and uses SQLite.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from sqlalchemy import select

from pipeline import kafka_io
from pipeline.config import Config, parse_config
from pipeline.evaluation import Span, score_events
from pipeline.history import windows_from_frame
from pipeline.runner import RunStats, run_pipeline
from pipeline.simulate import DEFAULT_SENSORS, simulate_fleet, to_messages, write_ground_truth
from pipeline.store.db import make_engine, make_sessionmaker, upgrade
from pipeline.store.tables import Alert
from pipeline.train import register_trained, train_group
from pipeline.types import datetime_to_ms, ms_to_datetime

PERIOD_S = 10.0
TARGET = 0.8
MALFORMED = (b"{not json", b'{"asset": "ASSET", "ts": 1, "values": {"no_such_sensor": 1.0}}', b"[1, 2, 3]")


@dataclass
class DemoSummary:
    """The demo's figures; ``passed`` when recall and precision both reach the target."""

    readings_produced: int
    readings_consumed: int
    rejected: dict[str, int]
    windows_scored: int
    alerts_raised: int
    anomalies_injected: int
    anomalies_caught: int
    recall: float
    precision: float
    recall_by_kind: dict[str, float]
    train_seconds: float
    stream_seconds: float
    database: str
    passed: bool


def demo_names(run_id: str, n_assets: int, *, shared_database: bool) -> tuple[str, list[str]]:
    """The demo's group and asset names: ``pumps`` and ``pump-N`` in its own SQLite file; in a database it shares
    (``DATABASE_URL``), names of this run only (``demo-<run>``, ``demo-<run>-pump-N``), so it never activates a model
    of a real group nor mixes its scores and alerts with a real asset's (or an earlier demo's)."""
    if not shared_database:
        return "pumps", [f"pump-{i + 1}" for i in range(n_assets)]
    return f"demo-{run_id}", [f"demo-{run_id}-pump-{i + 1}" for i in range(n_assets)]


def demo_config(*, bootstrap: str, database_url: str, model_dir: Path, assets: list[str], run_id: str,
                group: str = "pumps") -> Config:
    """The demo's configuration (the same schema as config/example.yaml)."""
    return parse_config({
        "kafka": {"bootstrap_servers": bootstrap, "topic": f"demo-readings-{run_id}",
                  "dead_letter_topic": f"demo-readings-{run_id}-dlq", "group_id": f"sensorwatch-demo-{run_id}"},
        "database": {"url": database_url},
        "model_dir": str(model_dir),
        "groups": [{
            "name": group, "assets": assets, "sampling_period_s": PERIOD_S,
            "sensors": [{"name": s.name, "unit": s.unit, "valid_range": [s.low, s.high]} for s in DEFAULT_SENSORS],
            "window": {"length": 30, "stride": 5, "max_gap": 3},
            "model": {"type": "dense", "hidden": [64, 16], "epochs": 40, "batch_size": 128, "seed": 0},
            "threshold": {"method": "percentile", "percentile": 99.5, "multiplier": 1.5},
            "alert": {"k": 2, "n": 3, "clear_after": 3, "critical_multiplier": 4.0,
                      "aftermath": {"relative": 0.3, "half_life_s": 21600}},
            "drift": {"span_s": 3600},
        }],
    }, env={})


@contextlib.contextmanager
def _broker(console: Console) -> Iterator[str]:
    env = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if env:
        console.print(f"using Kafka at {env} (KAFKA_BOOTSTRAP_SERVERS)")
        yield env
        return
    from pipeline.localinfra.kafka import LocalKafka

    console.print("starting a local Kafka broker (KRaft)...")
    with LocalKafka() as kafka:
        console.print(f"local Kafka broker at {kafka.bootstrap_servers}")
        yield kafka.bootstrap_servers


def _progress(console: Console) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console)


def run_demo(*, workdir: Path, n_assets: int, hours: float, seed: int, console: Console) -> DemoSummary:
    """Run the demo and print its summary; also written to ``workdir/summary.json``."""
    workdir.mkdir(parents=True, exist_ok=True)
    database_url = os.environ.get("DATABASE_URL")
    shared = bool(database_url)
    if not database_url:
        db_file = workdir / "sensorwatch.db"
        db_file.unlink(missing_ok=True)
        database_url = f"sqlite:///{db_file.resolve()}"
    run_id = uuid.uuid4().hex[:8]
    group_name, assets = demo_names(run_id, n_assets, shared_database=shared)
    test_periods = int(hours * 3600 / PERIOD_S)
    train_periods = int(24 * 3600 / PERIOD_S)
    # the simulated plant has a daily cycle: end the stream at the last UTC midnight, so every run streams the same
    # hours of the day and gets the same figures (not ones that depend on when the demo is started)
    end = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    test_start = pd.Timestamp(end - timedelta(hours=hours))
    train_start = test_start - pd.Timedelta(seconds=train_periods * PERIOD_S)

    with _broker(console) as bootstrap:
        cfg = demo_config(bootstrap=bootstrap, database_url=database_url, model_dir=workdir / "models", assets=assets,
                          run_id=run_id, group=group_name)
        group = cfg.groups[0]
        console.print(f"database: {escape(cfg.database.safe_url)}")
        if shared:
            console.print(f"DATABASE_URL is set: the demo writes group {group_name} and assets {assets[0]}.."
                          f"{assets[-1]} into it, its own names; no other group or asset is touched")
        upgrade(cfg.database.url)
        engine = make_engine(cfg.database.url)
        sessions = make_sessionmaker(engine)

        console.rule("1. train on a simulated day of normal operation")
        normal, _ = simulate_fleet(assets, train_start, train_periods, PERIOD_S, seed, anomalous_assets=[])
        table = pd.concat([f.assign(asset=a) for a, f in normal.items()]).reset_index()
        trained = train_group(windows_from_frame(table, group), group)
        with sessions.begin() as session:
            row = register_trained(session=session, trained=trained, group=group, model_dir=cfg.model_dir)
        console.print(f"model {row.version}: {trained.windows_used} windows, threshold {row.threshold:.4f}")

        console.rule("2. stream readings with injected anomalies through Kafka")
        frames, truth = simulate_fleet(assets, test_start, test_periods, PERIOD_S, seed + 1,
                                       anomalous_assets=assets[:-1], anomalies_per_asset=2)
        write_ground_truth(workdir / "ground_truth.json", truth)
        messages = to_messages(frames)
        kafka_io.ensure_topics(cfg.kafka, [cfg.kafka.topic, cfg.kafka.dead_letter_topic], partitions=3)
        producer = kafka_io.make_producer(cfg.kafka, linger_ms=20, batch_size=256 * 1024)
        with _progress(console) as bar:
            task = bar.add_task("producing", total=len(messages) + len(MALFORMED))
            for i, (asset, payload) in enumerate(messages):
                producer.send(cfg.kafka.topic, key=asset.encode(), value=kafka_io.encode_reading(payload))
                if i % 2000 == 0:
                    bar.update(task, completed=i)
            for junk in MALFORMED:  # one of them names the first asset: an unknown sensor of a known asset
                producer.send(cfg.kafka.topic, key=assets[0].encode(), value=junk.replace(b"ASSET", assets[0].encode()))
            producer.flush()
            bar.update(task, completed=len(messages) + len(MALFORMED))
        producer.close()

        console.rule("3. consume, score and alert with the pipeline")
        stream_started = time.perf_counter()
        stats = _consume(cfg, expected=len(messages), console=console)
        stream_seconds = time.perf_counter() - stream_started

        with sessions() as session:
            alerts = list(session.scalars(select(Alert).where(
                Alert.asset.in_(assets), Alert.opened_at >= ms_to_datetime(int(test_start.timestamp() * 1000)))))
        engine.dispose()

    truth_spans = [Span(a.asset, datetime_to_ms(a.start.to_pydatetime()), datetime_to_ms(a.end.to_pydatetime()),
                        a.kind) for a in truth]
    alert_spans = [Span(a.asset, datetime_to_ms(a.opened_at), datetime_to_ms(a.last_seen_at)) for a in alerts]
    result = score_events(truth_spans, alert_spans)
    summary = DemoSummary(
        readings_produced=len(messages), readings_consumed=stats.readings, rejected=dict(stats.rejected),
        windows_scored=stats.windows_scored, alerts_raised=len(alerts), anomalies_injected=len(truth),
        anomalies_caught=sum(hit for _, hit in result.caught), recall=round(result.recall, 3),
        precision=round(result.precision, 3), recall_by_kind=result.recall_by_label(),
        train_seconds=trained.metrics["train_seconds"], stream_seconds=round(stream_seconds, 1),
        database=cfg.database.safe_url, passed=result.recall >= TARGET and result.precision >= TARGET,
    )
    (workdir / "summary.json").write_text(json.dumps(asdict(summary), indent=2))
    _print_summary(console, summary, result.caught)
    return summary


def _consume(cfg: Config, *, expected: int, console: Console) -> RunStats:
    """Run the real pipeline until every produced reading (and the malformed extras) went through."""
    stop = threading.Event()
    with _progress(console) as bar:
        task = bar.add_task("consuming", total=expected)

        def on_batch(stats: RunStats) -> None:
            bar.update(task, completed=stats.readings,
                       description=f"consuming ({stats.windows_scored} windows, {stats.alerts_opened} alerts)")
            if stats.readings >= expected and sum(stats.rejected.values()) >= len(MALFORMED):
                stop.set()

        return run_pipeline(cfg, stop=stop, idle_stop_s=30.0, on_batch=on_batch)


def _print_summary(console: Console, s: DemoSummary, caught: list[tuple[Span, bool]]) -> None:
    console.rule("summary")
    table = Table(show_header=False)
    for label, value in (
        ("readings produced / consumed", f"{s.readings_produced} / {s.readings_consumed}"),
        ("rejected to dead-letter topic", str(s.rejected)),
        ("windows scored", str(s.windows_scored)),
        ("alerts raised", str(s.alerts_raised)),
        ("anomalies caught", f"{s.anomalies_caught} / {s.anomalies_injected}"),
        ("recall (event level)", f"{s.recall:.2f}"),
        ("precision (event level)", f"{s.precision:.2f}"),
        ("recall by kind", ", ".join(f"{k} {v:.2f}" for k, v in s.recall_by_kind.items())),
        ("training / streaming time", f"{s.train_seconds:.1f} s / {s.stream_seconds:.1f} s"),
    ):
        table.add_row(label, value)
    console.print(table)
    for span, hit in caught:
        mark = "[green]caught[/green]" if hit else "[red]missed[/red]"
        console.print(f"  {mark} {span.asset} {span.label:<20} {ms_to_datetime(span.start_ms):%H:%M}"
                      f"-{ms_to_datetime(span.end_ms):%H:%M}")
    verdict = "[green]PASS[/green]" if s.passed else "[red]FAIL[/red]"
    console.print(f"{verdict}: recall {s.recall:.2f} and precision {s.precision:.2f} (target {TARGET})")
