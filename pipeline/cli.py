"""The ``sensorwatch`` command line: parses arguments, loads the config once, calls the modules that do the work."""

from __future__ import annotations

import csv
import io
import json
import logging
import signal
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from pipeline.config import Config, load_config
from pipeline.errors import ConfigError, ModelError, TransientError

app = typer.Typer(help="sensorwatch: streaming anomaly monitoring for industrial IoT sensors.", no_args_is_help=True)
db_app = typer.Typer(help="Database schema migrations.", no_args_is_help=True)
alerts_app = typer.Typer(help="Query alerts.", no_args_is_help=True)
models_app = typer.Typer(help="Inspect and activate model versions.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(alerts_app, name="alerts")
app.add_typer(models_app, name="models")

console = Console(stderr=True)
ConfigOption = Annotated[Path, typer.Option("--config", "-c", help="YAML configuration file.", exists=False)]


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False, rich_tracebacks=False)],
        force=True,
    )
    logging.getLogger("kafka").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)


def _load(path: Path) -> Config:
    try:
        return load_config(path)
    except ConfigError as exc:
        console.print(f"[red]configuration error[/red] in {path}:\n{exc}")
        raise typer.Exit(2) from None


def _fail(exc: Exception, code: int = 1) -> typer.Exit:
    console.print(f"[red]{type(exc).__name__}[/red]: {exc}")
    return typer.Exit(code)


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False) -> None:
    """Configure logging for every command."""
    _setup_logging(verbose)


@app.command()
def run(
    config: ConfigOption,
    idle_stop: Annotated[float | None, typer.Option(help="Exit after this many seconds without records.")] = None,
) -> None:
    """Consume readings, score windows and write scores and alerts until SIGTERM/Ctrl-C."""
    from pipeline.runner import run_pipeline

    cfg = _load(config)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        stats = run_pipeline(cfg, stop=stop, idle_stop_s=idle_stop, serve_metrics=True)
    except (ModelError, TransientError) as exc:
        raise _fail(exc) from None
    logging.getLogger(__name__).info(
        "stopped: %d readings, %d windows scored, %d skipped, %d rejected %s, %d alerts opened",
        stats.readings, stats.windows_scored, stats.windows_skipped, sum(stats.rejected.values()),
        dict(stats.rejected), stats.alerts_opened,
    )


@app.command()
def train(
    config: ConfigOption,
    csv_path: Annotated[Path, typer.Option("--csv", help="CSV of readings: ts, [asset,] one column per sensor.")],
    group: Annotated[str | None, typer.Option(help="Group to train (default: the only group).")] = None,
    activate: Annotated[bool, typer.Option(help="Make the new model the active one.")] = True,
) -> None:
    """Train a group's autoencoder on historical normal data, save the bundle and register the version."""
    from pipeline.registry import register
    from pipeline.store import repo
    from pipeline.store.db import make_engine, make_sessionmaker
    from pipeline.train import read_readings_csv, train_group, windows_from_frame
    from pipeline.types import ms_to_datetime

    cfg = _load(config)
    if group is None and len(cfg.groups) > 1:
        raise _fail(ConfigError(f"--group is required: the config has {len(cfg.groups)} groups"), 2)
    try:
        group_cfg = cfg.group(group) if group else cfg.groups[0]
        windows = windows_from_frame(read_readings_csv(csv_path), group_cfg)
        trained = train_group(windows, group_cfg)
    except (ConfigError, ValueError) as exc:
        raise _fail(exc, 2) from None
    engine = make_engine(cfg.database.url)
    with make_sessionmaker(engine).begin() as session:
        row = register(
            session=session, detector=trained.detector, group=group_cfg, model_dir=cfg.model_dir,
            status="candidate", windows_used=trained.windows_used, metrics=trained.metrics,
            data_range=(ms_to_datetime(trained.data_start_ms), ms_to_datetime(trained.data_end_ms)),
        )
        if activate:
            repo.activate_model_version(session=session, version=row.version)
    console.print(
        f"[green]trained[/green] {row.version}: {trained.windows_used} windows, threshold {row.threshold:.4g} "
        f"({row.threshold_method}), {'active' if activate else 'candidate'}; bundle {row.artifact_path}"
    )


@db_app.command("upgrade")
def db_upgrade(config: ConfigOption, revision: str = "head") -> None:
    """Apply database migrations (run once per deployment and after every upgrade)."""
    from pipeline.store.db import upgrade

    cfg = _load(config)
    upgrade(cfg.database.url, revision)
    console.print(f"[green]database at {revision}[/green]: {cfg.database.safe_url}")


def _since(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise typer.BadParameter(f"not an ISO-8601 time: {value!r}") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


@alerts_app.command("list")
def alerts_list(
    config: ConfigOption,
    status: Annotated[str | None, typer.Option(help="open or resolved.")] = None,
    asset: Annotated[str | None, typer.Option(help="Only this asset.")] = None,
    since: Annotated[str | None, typer.Option(help="Only alerts seen since this ISO-8601 time.")] = None,
    limit: Annotated[int, typer.Option(help="At most this many rows.")] = 50,
    output: Annotated[str, typer.Option("--format", help="table, json or csv.")] = "table",
) -> None:
    """List recent alerts, newest first."""
    from pipeline.store import repo
    from pipeline.store.db import make_engine, make_sessionmaker

    cfg = _load(config)
    with make_sessionmaker(make_engine(cfg.database.url))() as session:
        rows = repo.list_alerts(session=session, status=status, asset=asset, since=_since(since), limit=limit)
    records = [
        {
            "id": r.id, "asset": r.asset, "group": r.group_name, "status": r.status, "severity": r.severity,
            "opened_at": r.opened_at.isoformat(), "last_seen_at": r.last_seen_at.isoformat(),
            "closed_at": r.closed_at.isoformat() if r.closed_at else None, "peak_score": round(r.peak_score, 4),
            "threshold": round(r.threshold, 4), "windows": r.window_count,
            "top_sensors": ", ".join(f"{s['sensor']} {s['share']:.0%}" for s in r.top_sensors),
        }
        for r in rows
    ]
    if output == "json":
        typer.echo(json.dumps(records, indent=2))
    elif output == "csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(records[0]) if records else ["id"])
        writer.writeheader()
        writer.writerows(records)
        typer.echo(buffer.getvalue(), nl=False)
    elif output == "table":
        table = Table(title=f"alerts ({len(records)})")
        for column in ("id", "asset", "status", "severity", "opened_at", "last_seen_at", "peak_score", "windows",
                       "top_sensors"):
            table.add_column(column)
        for rec in records:
            table.add_row(*(str(rec[c]) for c in (
                "id", "asset", "status", "severity", "opened_at", "last_seen_at", "peak_score", "windows",
                "top_sensors")))
        Console().print(table)
    else:
        raise typer.BadParameter("--format must be table, json or csv")


@models_app.command("list")
def models_list(config: ConfigOption, group: Annotated[str | None, typer.Option(help="Only this group.")] = None
                ) -> None:
    """List registered model versions, newest first."""
    from pipeline.store import repo
    from pipeline.store.db import make_engine, make_sessionmaker

    cfg = _load(config)
    with make_sessionmaker(make_engine(cfg.database.url))() as session:
        rows = repo.list_model_versions(session=session, group=group)
    table = Table(title="model versions")
    for column in ("version", "group", "type", "status", "created", "threshold", "windows"):
        table.add_column(column)
    for r in rows:
        table.add_row(r.version, r.group_name, r.model_type, r.status, r.created_at.isoformat(timespec="seconds"),
                      f"{r.threshold:.4g}", str(r.windows_used))
    Console().print(table)


@models_app.command("activate")
def models_activate(config: ConfigOption, version: Annotated[str, typer.Argument(help="Version to activate.")]
                    ) -> None:
    """Make VERSION the active model of its group (also the way to roll back)."""
    from pipeline.store import repo
    from pipeline.store.db import make_engine, make_sessionmaker

    cfg = _load(config)
    try:
        with make_sessionmaker(make_engine(cfg.database.url)).begin() as session:
            row = repo.activate_model_version(session=session, version=version)
    except KeyError:
        raise _fail(ModelError(f"no model version {version!r}"), 2) from None
    console.print(f"[green]{row.version} is now active for group {row.group_name}[/green]")


@app.command()
def simulate(
    out: Annotated[Path, typer.Option(help="Directory for readings.csv and ground_truth.json.")],
    assets: Annotated[str, typer.Option(help="Comma-separated asset ids.")] = "pump-1,pump-2,pump-3",
    hours: Annotated[float, typer.Option(help="Hours of data per asset.")] = 24.0,
    period: Annotated[float, typer.Option(help="Sampling period in seconds.")] = 10.0,
    anomalies: Annotated[int, typer.Option(help="Injected anomalies per asset (0 for normal data).")] = 2,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 7,
    start: Annotated[str, typer.Option(help="First timestamp (ISO-8601, UTC).")] = "2026-01-01T00:00:00",
) -> None:
    """Write simulated multivariate readings (CSV) and the ground truth of injected anomalies (JSON)."""
    import pandas as pd

    from pipeline.simulate import simulate_fleet, write_ground_truth

    names = [a.strip() for a in assets.split(",") if a.strip()]
    frames, truth = simulate_fleet(
        names, pd.Timestamp(start, tz="UTC"), int(hours * 3600 / period), period, seed,
        anomalies_per_asset=anomalies, anomalous_assets=names if anomalies else [],
    )
    out.mkdir(parents=True, exist_ok=True)
    table = pd.concat([f.assign(asset=a) for a, f in frames.items()]).reset_index().sort_values(["ts", "asset"])
    table["ts"] = table["ts"].map(lambda t: t.isoformat())
    table.to_csv(out / "readings.csv", index=False)
    write_ground_truth(out / "ground_truth.json", truth)
    console.print(f"wrote {len(table)} readings of {len(names)} assets and {len(truth)} anomalies to {out}")


@app.command()
def demo(
    workdir: Annotated[Path, typer.Option(help="Where the demo keeps its database, models and results.")] = Path(
        "demo-output"),
    assets: Annotated[int, typer.Option(help="Number of simulated assets.")] = 4,
    hours: Annotated[float, typer.Option(help="Hours of streamed data per asset.")] = 12.0,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 11,
) -> None:
    """End to end: train on simulated normal data, stream anomalies through Kafka and the pipeline, report recall."""
    from pipeline.demo import run_demo

    try:
        summary = run_demo(workdir=workdir, n_assets=assets, hours=hours, seed=seed, console=console)
    except (ModelError, TransientError, ConfigError) as exc:
        raise _fail(exc) from None
    if not summary.passed:
        raise typer.Exit(1)

