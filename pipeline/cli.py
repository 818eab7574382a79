"""The ``sensorwatch`` command line: parses arguments, loads the config once, calls the modules that do the work."""

from __future__ import annotations

import inspect
import json
import logging
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from pipeline import logs
from pipeline.config import Config, load_config
from pipeline.errors import ConfigError, ModelError, TransientError

if TYPE_CHECKING:
    from collections.abc import Sequence

    from sqlalchemy.orm import Session

    from pipeline.store.tables import ModelVersion

app = typer.Typer(help="sensorwatch: streaming anomaly monitoring for industrial IoT sensors.", no_args_is_help=True)
db_app = typer.Typer(help="Database schema migrations and retention.", no_args_is_help=True)
alerts_app = typer.Typer(help="Query alerts.", no_args_is_help=True)
models_app = typer.Typer(help="Inspect and activate model versions.", no_args_is_help=True)
sinks_app = typer.Typer(help="The alert sinks' outbox: what waits, what failed, and queueing it again.",
                        no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(alerts_app, name="alerts")
app.add_typer(models_app, name="models")
app.add_typer(sinks_app, name="sinks")

console = Console(stderr=True)
ConfigOption = Annotated[Path, typer.Option("--config", "-c", help="YAML configuration file.", exists=False)]


class _TopicsBeingCreated(logging.Filter):
    """Drops kafka-python's "Topic ... not found in cluster metadata" for the topics this process only produces to
    (dead letters, alerts): it is logged as an error on the first send to a topic the broker then creates; a topic
    that stays missing fails the send, which the runner reports and retries."""

    def __init__(self, topics: set[str]) -> None:
        super().__init__()
        self.topics = topics

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.msg == "Topic %s not found in cluster metadata" and record.args
                    and record.args[0] in self.topics)


def _report(label: str, message: str) -> None:
    """A fatal error: rich text on a terminal; with plain or JSON logs, a log record like every other line (a log
    shipper gets it whole, not wrapped at 80 columns)."""
    if logs.configured_format() == "rich":
        console.print(f"[red]{escape(label)}[/red]: {escape(message)}")
    else:
        logging.getLogger("pipeline.cli").error("%s: %s", label, message)


def _load(path: Path) -> Config:
    try:
        return load_config(path)
    except ConfigError as exc:
        _report(f"configuration error in {path}", str(exc))
        raise typer.Exit(2) from None


def _fail(exc: Exception, code: int = 1) -> typer.Exit:
    """Report ``exc`` as one line for a person (its message, not its Python class) and return the exit to raise."""
    message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc  # KeyError's str() quotes its message
    _report("error", str(message))
    return typer.Exit(code)


def _database_problem(exc: Exception, cfg: Config) -> str:
    """One line for a database error (``store.db.describe_error``: the password masked and scrubbed)."""
    from pipeline.store.db import describe_error

    return f"cannot use the database {describe_error(exc, cfg.database.url)}"


@contextmanager
def _database_errors(cfg: Config) -> Iterator[None]:
    """A database that cannot be reached or opened (or fails a statement, or whose driver is not installed) ends the
    command with one line, exit 1."""
    from sqlalchemy.exc import SQLAlchemyError

    try:
        yield
    except (SQLAlchemyError, ImportError) as exc:
        raise _fail(TransientError(_database_problem(exc, cfg))) from None


def _check_database(cfg: Config) -> None:
    """Exit with one clear line unless the database can be reached and its schema is up to date (a SQLite file that
    does not exist is not created)."""
    from pipeline.store.db import make_engine, missing_sqlite_file, schema_problem

    missing = missing_sqlite_file(cfg.database.url)
    if missing is not None:
        raise _fail(TransientError(missing))
    with _database_errors(cfg):
        engine = make_engine(cfg.database.url)
        try:
            problem = schema_problem(engine)
        finally:
            engine.dispose()
    if problem:
        raise _fail(TransientError(problem))


@contextmanager
def _session(cfg: Config, *, write: bool = False) -> Iterator[Session]:
    """``session_scope`` on the configured database, after ``_check_database``; database errors as one line."""
    from pipeline.store.db import session_scope

    _check_database(cfg)
    with _database_errors(cfg), session_scope(cfg.database.url, write=write) as session:
        yield session


@app.callback()
def main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
    log_format: Annotated[str, typer.Option(
        "--log-format", envvar="SENSORWATCH_LOG_FORMAT",
        help="auto (rich on a terminal, plain otherwise), rich, plain (one UTC-stamped line per record) or json "
             "(one object per line).")] = "auto",
) -> None:
    """Configure logging for every command."""
    try:
        logs.configure(log_format, verbose=verbose, console=console)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--log-format (or SENSORWATCH_LOG_FORMAT)") from None


@app.command()
def run(
    config: ConfigOption,
    idle_stop: Annotated[float | None, typer.Option(
        help="Exit after this many seconds without records (waiting for the topic to exist included).")] = None,
) -> None:
    """Consume readings, score windows and write scores and alerts until SIGTERM/Ctrl-C."""
    from pipeline.runner import run_pipeline

    cfg = _load(config)
    _check_database(cfg)
    produced = {cfg.kafka.dead_letter_topic} | ({cfg.sinks.kafka.topic} if cfg.sinks.kafka else set())
    logging.getLogger("kafka.cluster").addFilter(_TopicsBeingCreated(produced))
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        with _database_errors(cfg):
            stats = run_pipeline(cfg, stop=stop, idle_stop_s=idle_stop, serve_metrics=True)
    except ConfigError as exc:  # e.g. kafka.security's TLS files do not load
        raise _fail(exc, 2) from None
    except (ModelError, TransientError) as exc:
        raise _fail(exc) from None
    logging.getLogger(__name__).info(
        "stopped: %d readings, %d windows scored, %d skipped, %d rejected %s, %d alerts opened; %d records replayed "
        "(processed before)", stats.readings, stats.windows_scored, stats.windows_skipped,
        sum(stats.rejected.values()), dict(stats.rejected), stats.alerts_opened, stats.replayed,
    )


@app.command()
def train(
    config: ConfigOption,
    csv_path: Annotated[Path, typer.Option("--csv", help="CSV of readings: ts, \\[asset,] one column per sensor.")],
    group: Annotated[str | None, typer.Option(help="Group to train (default: the only group).")] = None,
    activate: Annotated[bool, typer.Option(help="Make the new model the active one.")] = True,
) -> None:
    """Train a group's autoencoder on historical normal data, save the bundle and register the version. The CSV is
    read in pieces; beyond retrain.max_windows windows, every k-th block of each asset's windows is kept, as the
    nightly retrain keeps them."""
    from pipeline.history import windows_from_csv
    from pipeline.train import register_trained, train_group

    cfg = _load(config)
    if group is None and len(cfg.groups) > 1:
        raise _fail(ConfigError(f"--group is required: the config has {len(cfg.groups)} groups"), 2)
    _check_database(cfg)  # before training, not after it
    try:
        group_cfg = cfg.group(group) if group else cfg.groups[0]
        windows, thinning = windows_from_csv(csv_path, group_cfg, max_windows=cfg.retrain.max_windows)
        trained = train_group(windows, group_cfg, thinning=thinning)
    except (ConfigError, ValueError) as exc:
        raise _fail(exc, 2) from None
    with _session(cfg, write=True) as session:
        row = register_trained(session=session, trained=trained, group=group_cfg, model_dir=cfg.model_dir,
                               activate=activate)
    console.print(
        f"[green]trained[/green] {escape(row.version)}: {trained.windows_used} windows, threshold "
        f"{row.threshold:.4g} ({row.threshold_method}), {'active' if activate else 'candidate'}; bundle "
        f"{escape(row.artifact_path)}"
    )


@app.command()
def retrain(
    config: ConfigOption,
    group: Annotated[str | None, typer.Option(help="Only this group (default: every group).")] = None,
) -> None:
    """Retrain now on recent normal data and promote the candidate only if it passes the validation gate: the job
    the scheduler runs. Exit status 0 when every run was promoted, rejected or skipped, 1 if one failed, 3 if one was
    refused because another retrain of the group was running."""
    from pipeline.retrain import retrain_all

    cfg = _load(config)
    _check_database(cfg)
    try:
        with _database_errors(cfg):
            results = retrain_all(cfg, group=group, trigger="manual")
    except ConfigError as exc:
        raise _fail(exc, 2) from None
    except TransientError as exc:
        raise _fail(exc) from None
    colours = {"promoted": "green", "rejected": "yellow", "skipped": "yellow", "failed": "red", "refused": "red"}
    for result in results:
        colour = colours[result.outcome]
        console.print(f"[{colour}]retrain[/{colour}] {escape(result.summary())}", highlight=False)
    outcomes = {r.outcome for r in results}
    if "failed" in outcomes:
        raise typer.Exit(1)
    if "refused" in outcomes:
        raise typer.Exit(3)


@app.command("check")
def check_command(
    config: ConfigOption,
    kafka_timeout_s: Annotated[float, typer.Option(help="Seconds to wait for a Kafka broker.", min=0.5, max=300)
                               ] = 10.0,
    output: Annotated[str, typer.Option("--format", help="table or json.")] = "table",
) -> None:
    """Check a deployment before starting it (or while it runs): the configuration, the database and its schema,
    every group's active model, the running pipelines and whether they serve it, the model directory, the brokers,
    the topics and what the brokers let this principal do with them. Exit status 0 when nothing fails (warnings
    allowed), 1 when a check fails, 2 for an invalid configuration."""
    from pipeline.preflight import run_checks

    _choice(output, ("table", "json"), "--format")
    cfg = _load(config)
    logging.getLogger("kafka").setLevel(logging.CRITICAL)  # the kafka check reports what the client would log
    checks = run_checks(cfg, kafka_timeout_s=kafka_timeout_s)
    if output == "json":
        typer.echo(json.dumps([c.to_dict() for c in checks], indent=2))
    else:
        marks = {"ok": "[green]ok[/green]", "warn": "[yellow]warn[/yellow]", "fail": "[red]FAIL[/red]"}
        table = Table(title=f"sensorwatch check: {escape(str(config))}", title_justify="left")
        for column in ("", "check", "detail"):
            table.add_column(column)
        for c in checks:
            table.add_row(marks[c.status], c.name, escape(c.detail))
        _stdout().print(table)
    if any(c.status == "fail" for c in checks):
        raise typer.Exit(1)


@app.command("scheduler")
def scheduler_command(config: ConfigOption) -> None:
    """Run the retrain job on the schedule of the configuration's retrain section (cron, time zone, misfire grace,
    coalescing) and the retention job (db prune) on retention.cron, until SIGTERM/Ctrl-C; the schedules are kept in
    the database, so a restart resumes them."""
    from pipeline.scheduler import build_scheduler, stop_when_running
    from pipeline.store.db import make_engine

    cfg = _load(config)
    _check_database(cfg)
    engine = make_engine(cfg.database.url)
    try:
        try:
            scheduler = build_scheduler(cfg, config, engine=engine)
        except (ConfigError, ValueError) as exc:
            raise _fail(exc, 2) from None

        def stop(*_: object) -> None:  # not inside the handler: shutdown waits for a running retrain
            threading.Thread(target=stop_when_running, args=(scheduler,), name="scheduler-stop").start()

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, stop)
        logging.getLogger(__name__).info("scheduler started; database %s", cfg.database.safe_url)
        scheduler.start()
        logging.getLogger(__name__).info("scheduler stopped")
    finally:
        engine.dispose()


@db_app.command("upgrade")
def db_upgrade(config: ConfigOption, revision: str = "head") -> None:
    """Apply database migrations (run once per deployment and after every upgrade). They run in one transaction: an
    upgrade that fails leaves the database as it was."""
    from sqlalchemy.exc import SQLAlchemyError

    from pipeline.store.db import SchemaError, current_revision, make_engine, schema_problem, upgrade

    cfg = _load(config)
    with _database_errors(cfg):  # unreachable, or no driver: one line
        engine = make_engine(cfg.database.url)
        try:
            was_at = current_revision(engine)
            try:
                upgrade(cfg.database.url, revision)
            except SchemaError as exc:
                raise _fail(exc, 2) from None
            except SQLAlchemyError as exc:  # a migration failed (e.g. old rows break a new constraint)
                stays = current_revision(engine)  # readable: the database answers, so the migration itself failed
                raise _fail(TransientError(f"the upgrade failed and was rolled back, the database stays at revision "
                                           f"{stays or 'none'}: {_database_problem(exc, cfg)}")) from None
            now_at, newest = current_revision(engine), schema_problem(engine) is None
        finally:
            engine.dispose()
    moved = "already there" if now_at == was_at else f"upgraded from {was_at or 'an empty database'}"
    console.print(f"[green]database at {now_at}[/green]{' (the newest revision)' if newest else ''}, {moved}: "
                  f"{escape(cfg.database.safe_url)}")


@db_app.command("prune")
def db_prune(
    config: ConfigOption,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Count what would be deleted; delete nothing.")] = False,
) -> None:
    """Delete history older than the retention section: window scores and skipped windows older than
    retention.scores_days (each asset keeps its latest windows, which a restarted pipeline rebuilds its alert and
    drift state from), resolved alerts closed more than retention.alerts_days ago (when set), and the model bundles
    beyond retention.model_bundles per group (the newest retired, rejected and undecided ones stay). In short
    batches, safe beside running pipelines and safe to run again. `sensorwatch scheduler` runs it on retention.cron;
    without a scheduler, run it from cron."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from pipeline.retention import PrunePlan, prune_database

    cfg = _load(config)
    if not cfg.retention.enabled:
        console.print("retention.enabled is false: nothing is pruned")
        raise typer.Exit(2)
    _check_database(cfg)
    plan = PrunePlan.of(cfg, datetime.now(UTC))
    with _database_errors(cfg), Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                         TimeElapsedColumn(), console=console, disable=not console.is_terminal) as bar:
        def start(total: int) -> Callable[[str], None]:
            task = bar.add_task("counting" if dry_run else "pruning assets", total=total)
            return lambda _asset: bar.advance(task)

        result = prune_database(cfg, plan, dry_run=dry_run, progress=start)
    alerts = plan.alerts_before.isoformat(timespec="seconds") if plan.alerts_before else "never (alerts_days unset)"
    console.print(f"[green]{'dry run' if dry_run else 'pruned'}[/green]: {escape(result.summary())}; scores before "
                  f"{plan.scores_before.isoformat(timespec='seconds')} (each asset keeps its latest "
                  f"{plan.keep_latest} windows), resolved alerts before {alerts}", highlight=False)


def _when(value: str | None, now: datetime, option: str) -> datetime | None:
    from pipeline.alert_format import parse_when

    if value is None:
        return None
    try:
        return parse_when(value, now)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint=option) from None


def _utc_text(ms: int | None) -> str | None:
    """Epoch ms as ISO-8601 UTC to the second (``2026-01-02T03:04:05Z``); None stays None."""
    from pipeline.types import ms_to_datetime

    return None if ms is None else ms_to_datetime(ms).isoformat(timespec="seconds").replace("+00:00", "Z")


def _choice(value: str | None, allowed: tuple[str, ...], option: str) -> None:
    if value is not None and value not in allowed:
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(allowed)}", param_hint=option)


def _plain(*cells: object) -> list[Text]:
    """Table cells shown as written: names, comments and paths come from operators and the database, and a ``[``
    in them must not be read as markup (``[/red]`` in an acknowledgement broke every ``alerts list``)."""
    return [Text(str(cell)) for cell in cells]


def _stdout() -> Console:
    """Rich console on stdout; wide when not a terminal, so piped tables are not wrapped."""
    return Console(width=None if sys.stdout.isatty() else 200)


_LIST_COLUMNS = ("id", "asset", "group", "status", "severity", "opened_at", "last_seen_at", "closed_at", "duration_s",
                 "peak_score", "threshold", "peak_ratio", "windows", "top_sensors", "off_training", "model_version",
                 "acknowledged_by", "acknowledged_at", "ack_comment")


@alerts_app.command("list")
def alerts_list(
    config: ConfigOption,
    status: Annotated[str | None, typer.Option(help="open or resolved.")] = None,
    asset: Annotated[str | None, typer.Option(help="Only this asset.")] = None,
    group: Annotated[str | None, typer.Option(help="Only this asset group.")] = None,
    severity: Annotated[str | None, typer.Option(help="Only this severity (e.g. warning, critical).")] = None,
    since: Annotated[str | None, typer.Option(
        help="Only alerts active since: ISO-8601 (UTC if no zone), 'now', or a span back like 30m, 24h, 7d.")] = None,
    until: Annotated[str | None, typer.Option(help="Only alerts opened before this time (same forms).")] = None,
    acknowledged: Annotated[bool | None, typer.Option(
        "--acknowledged/--unacknowledged", help="Only acknowledged (or unacknowledged) alerts.")] = None,
    limit: Annotated[int, typer.Option(help="At most this many rows.", min=1)] = 50,
    output: Annotated[str, typer.Option("--format", help="table, json or csv.")] = "table",
) -> None:
    """List alerts, newest first."""
    from pipeline.alert_format import alert_dict, duration_text, to_csv
    from pipeline.store import repo

    _choice(output, ("table", "json", "csv"), "--format")
    _choice(status, ("open", "resolved"), "--status")
    now = datetime.now(UTC)
    start, end = _when(since, now, "--since"), _when(until, now, "--until")
    if start is not None and end is not None and end <= start:
        raise typer.BadParameter("--until must be after --since", param_hint="--until")
    cfg = _load(config)
    with _session(cfg) as session:
        rows = repo.list_alerts(session=session, status=status, asset=asset, group=group, severity=severity,
                                since=start, until=end, acknowledged=acknowledged, limit=limit)
    if not rows and asset is not None and asset not in cfg.asset_groups():
        console.print(f"[yellow]note[/yellow]: asset {escape(asset)!r} is in no group of {escape(str(config))} and "
                      "has no stored alerts (a typo?)")
    if not rows and group is not None and group not in {g.name for g in cfg.groups}:
        console.print(f"[yellow]note[/yellow]: group {escape(group)!r} is not in {escape(str(config))} and has no "
                      "stored alerts (a typo?)")
    if output == "json":
        typer.echo(json.dumps([alert_dict(r) for r in rows], indent=2))
        return
    records = [alert_dict(r, flat=True) for r in rows]
    if output == "csv":
        typer.echo(to_csv(records, _LIST_COLUMNS), nl=False)
        return
    table = Table(title=f"alerts ({len(records)})", title_justify="left")
    for column in ("id", "asset", "status", "severity", "opened (UTC)", "duration", "peak", "windows", "top sensors",
                   "ack"):
        table.add_column(column, no_wrap=column != "top sensors")
    for rec in records:
        table.add_row(*_plain(
            rec["id"], rec["asset"], rec["status"], rec["severity"],
            str(rec["opened_at"]).replace("T", " ").removesuffix("Z")[:19], duration_text(rec["duration_s"]),
            f"{rec['peak_score']:.4g} ({rec['peak_ratio']}x)", rec["windows"],
            rec["top_sensors"] + (f"; far outside training: {rec['off_training']}" if rec["off_training"] else ""),
            rec["acknowledged_by"] or "",
        ))
    _stdout().print(table)


@alerts_app.command("show")
def alerts_show(
    config: ConfigOption,
    alert_id: Annotated[int, typer.Argument(metavar="ID", help="Alert id (from 'alerts list').")],
    context: Annotated[int, typer.Option(help="Windows of history before and after the alert.")] = 6,
    max_rows: Annotated[int, typer.Option(help="At most this many history rows (the middle is elided).")] = 40,
    output: Annotated[str, typer.Option("--format", help="table or json.")] = "table",
) -> None:
    """One alert: its state, acknowledgement, top sensors, and the score history around it."""
    from datetime import timedelta

    from pipeline.alert_format import alert_dict, duration_text, elide, history_rows, off_training_text
    from pipeline.store import repo

    _choice(output, ("table", "json"), "--format")
    cfg = _load(config)
    with _session(cfg) as session:
        row = repo.get_alert(session=session, alert_id=alert_id)
        if row is None:
            raise _fail(KeyError(f"no alert with id {alert_id}"), 2)
        groups = {g.name: g for g in cfg.groups}
        group = groups.get(row.group_name)
        stride_s = group.window.stride * group.sampling_period_s if group else 60.0
        length_s = group.window.length * group.sampling_period_s if group else 0.0
        margin = timedelta(seconds=stride_s * context)
        first_end = row.opened_at + timedelta(seconds=length_s)  # the end of the alert's first window
        scores = repo.scores_between(session=session, asset=row.asset, start=first_end - margin,
                                     end=(row.closed_at or row.last_seen_at) + margin)
    alert = alert_dict(row)
    history = history_rows(scores, row)
    if output == "json":
        typer.echo(json.dumps({"alert": alert, "history": history}, indent=2))
        return
    out = _stdout()
    summary = Table.grid(padding=(0, 2))
    summary.add_column(style="bold")
    summary.add_column()
    ratio = f" ({alert['peak_ratio']}x threshold {alert['threshold']:.4g})" if alert["peak_ratio"] else ""
    for label, value in (
        ("asset", f"{alert['asset']} (group {alert['group']})"),
        ("status", f"{alert['status']}, severity {alert['severity']}"),
        ("opened", alert["opened_at"]),
        ("last seen", alert["last_seen_at"]),
        ("closed", alert["closed_at"] or "-"),
        ("duration", duration_text(alert["duration_s"])),
        ("peak score", f"{alert['peak_score']:.4g}{ratio}"),
        ("windows", str(alert["windows"])),
        ("model", alert["model_version"]),
        ("acknowledged", f"{alert['acknowledged_by']} at {str(alert['acknowledged_at'])[:19]}Z: "
         f"{alert['ack_comment'] or ''}" if alert["acknowledged_by"] else "no"),
    ):
        summary.add_row(label, escape(str(value)))  # names and comments are text, not markup
    out.print(f"[bold]alert #{alert['id']}[/bold]")
    out.print(summary)
    sensors = Table(title="top sensors (share of the alert's error)", title_justify="left")
    for column in ("#", "sensor", "share", "error", ""):
        sensors.add_column(column)
    for rank, item in enumerate(alert["top_sensors"], 1):
        share = float(item["share"])
        sensors.add_row(*_plain(rank, item["sensor"], f"{share:.1%}", f"{float(item['error']):.4g}",
                                "█" * max(round(share * 30), 1)))
    out.print(sensors)
    if alert["off_training"]:
        far = escape(off_training_text(alert["off_training"]))
        out.print(f"[bold]far outside training[/bold] (window mean vs the training data, in its standard deviations; "
                  f"the model may put their error on other sensors): {far}")
    if not history:
        pruned = cfg.retention.enabled and (row.closed_at or row.last_seen_at) < datetime.now(UTC) - timedelta(
            days=cfg.retention.scores_days)
        out.print("no score history: " + (f"its windows are older than retention.scores_days "
                                          f"({cfg.retention.scores_days:g}) and were pruned" if pruned
                                          else "no windows of the asset are stored around it"))
        return
    smoothing = any(item["smoothed"] is not None for item in history)  # the threshold applies to the EWMA then
    raised = any(item["aftermath_floor"] is not None for item in history)  # the aftermath rule raised the bar
    bar = "the bar (threshold or aftermath floor)" if raised else "threshold"
    table = Table(title=f"score history ({len(history)} windows; > = above {bar}, * = inside the alert)",
                  title_justify="left")
    columns = ("window end (UTC)", "", "score", *(("smoothed",) if smoothing else ()), "threshold",
               *(("aftermath floor",) if raised else ()), "ratio", "top sensor", "")
    for column in columns:
        table.add_column(column, no_wrap=True)
    for item in elide(history, max_rows):
        if item is None:
            table.add_row("...", *[""] * (len(columns) - 1))
            continue
        ratio_value = item["ratio"] or 0.0
        mark = (">" if item["above"] else " ") + ("*" if item["in_alert"] else " ")
        smoothed = (("-" if item["smoothed"] is None else f"{item['smoothed']:.4g}"),) if smoothing else ()
        floor = (("-" if item["aftermath_floor"] is None else f"{item['aftermath_floor']:.4g}"),) if raised else ()
        table.add_row(*_plain(str(item["window_end"]).replace("T", " ").removesuffix("Z")[:19], mark,
                              f"{item['score']:.4g}", *smoothed, f"{item['threshold']:.4g}", *floor,
                              f"{ratio_value:.2f}", f"{item['top_sensor']} {item['top_share']:.0%}",
                              "▇" * min(round(ratio_value * 10), 40)))
    out.print(table)


def _who(by: str) -> str:
    """The ``--by`` of a command that records who did it: not empty."""
    if not by.strip():
        raise typer.BadParameter("must not be empty", param_hint="--by")
    return by.strip()


@alerts_app.command("ack")
def alerts_ack(
    config: ConfigOption,
    alert_id: Annotated[int, typer.Argument(metavar="ID", help="Alert id (from 'alerts list').")],
    by: Annotated[str, typer.Option("--by", help="Who acknowledges (name or id).")],
    comment: Annotated[str | None, typer.Option(help="Why, what is being done.")] = None,
) -> None:
    """Acknowledge an alert (open or resolved): who, when, and a comment. A second ack replaces the first."""
    from pipeline.store import repo

    who = _who(by)
    cfg = _load(config)
    try:
        with _session(cfg, write=True) as session:
            row = repo.acknowledge_alert(session=session, alert_id=alert_id, by=who, comment=comment)
    except KeyError:
        raise _fail(KeyError(f"no alert with id {alert_id}"), 2) from None
    console.print(f"[green]alert #{row.id}[/green] ({escape(row.asset)}, {row.status}, {escape(row.severity)}) "
                  f"acknowledged by {escape(row.acknowledged_by or '')}")


@alerts_app.command("resolve")
def alerts_resolve(
    config: ConfigOption,
    alert_id: Annotated[int, typer.Argument(metavar="ID", help="Alert id (from 'alerts list --status open').")],
    by: Annotated[str, typer.Option("--by", help="Who resolves it (name or id).")],
    comment: Annotated[str | None, typer.Option(help="Why (recorded as the acknowledgement's comment).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Resolve it although its asset is still configured (an asset "
                                        "taken out of service, a feed that is gone for good).")] = False,
) -> None:
    """Resolve by hand an open alert of an asset that is no longer configured: no window will ever resolve it. It is
    closed at its last seen window, acknowledged by --by, and the alert sinks get its 'resolved' event. An asset
    still in the configuration is refused without --force: the pipeline resolves its alerts when its windows clear.
    With --force, a running pipeline drops the incident at the asset's next window, and if the asset's windows are
    still above the threshold, it opens a new alert."""
    from pipeline.sinks import configured_sinks, outbox_rows
    from pipeline.store import repo
    from pipeline.types import AlertEvent

    who = _who(by)
    cfg = _load(config)
    configured = cfg.asset_groups()
    try:
        with _session(cfg, write=True) as session:
            found = repo.get_alert(session=session, alert_id=alert_id)
            if found is not None and found.asset in configured and not force:
                raise _fail(ValueError(
                    f"alert #{alert_id}: asset {found.asset} is still configured (group "
                    f"{configured[found.asset].name}): the pipeline resolves its alerts when its windows clear "
                    "(--force resolves it anyway, e.g. for an asset taken out of service)"), 2)
            why = comment or ("asset taken out of service" if found is not None and found.asset in configured
                              else "asset no longer configured")
            row = repo.resolve_alert_by_hand(session=session, alert_id=alert_id, by=who,
                                             comment=f"resolved by hand: {why}")
            event = AlertEvent("resolved", repo.alert_record(row))
            repo.enqueue_outbox(session=session, rows=outbox_rows(configured_sinks(cfg), [event]),
                                now=datetime.now(UTC))
    except KeyError:
        raise _fail(KeyError(f"no alert with id {alert_id}"), 2) from None
    except ValueError as exc:
        raise _fail(exc, 2) from None
    console.print(f"[green]alert #{row.id}[/green] ({escape(row.asset)}, {escape(row.severity)}) resolved by "
                  f"{escape(row.acknowledged_by or '')}")


@models_app.command("list")
def models_list(
    config: ConfigOption,
    group: Annotated[str | None, typer.Option(help="Only this group.")] = None,
    output: Annotated[str, typer.Option("--format", help="table or json.")] = "table",
) -> None:
    """List registered model versions, newest first, with how many running pipeline processes serve each (the
    active one is served once they have reloaded: 'models serving' shows each process)."""
    from pipeline.serving import serving_counts, stale_after_s
    from pipeline.store import repo

    _choice(output, ("table", "json"), "--format")
    cfg = _load(config)
    with _session(cfg) as session:
        rows = repo.list_model_versions(session=session, group=group)
        served = serving_counts(repo.list_instances(session=session), repo.database_now(session=session),
                                stale_after_s(cfg.retrain.reload_interval_s))
    if output == "json":
        typer.echo(json.dumps([{"version": r.version, "group": r.group_name, "type": r.model_type, "status": r.status,
                                "created_at": r.created_at.isoformat(), "threshold": r.threshold,
                                "windows_used": r.windows_used, "bundle_deleted": r.bundle_deleted_at is not None,
                                "served_by": served[r.version]}
                               for r in rows], indent=2))
        return
    _stdout().print(models_table(rows, served))


def models_table(rows: Sequence[ModelVersion], served: Mapping[str, int] | None = None) -> Table:
    """The ``models list`` table; the version column (the id ``models activate`` takes) is never cut short,
    whatever the terminal's width. A version whose bundle retention deleted says so in its status. ``served``:
    version -> running pipeline processes serving it."""
    served = served or {}
    table = Table(title="model versions")
    table.add_column("version", no_wrap=True, min_width=max((len(r.version) for r in rows), default=7))
    for column in ("group", "type", "status", "served by", "created", "threshold", "windows"):
        table.add_column(column)
    for r in rows:
        status = f"{r.status}, bundle deleted" if r.bundle_deleted_at is not None else r.status
        count = served.get(r.version, 0)
        table.add_row(*_plain(r.version, r.group_name, r.model_type, status,
                              f"{count} process{'es' if count != 1 else ''}" if count else "",
                              r.created_at.isoformat(timespec="seconds"), f"{r.threshold:.4g}", r.windows_used))
    return table


@models_app.command("serving")
def models_serving(
    config: ConfigOption,
    output: Annotated[str, typer.Option("--format", help="table or json.")] = "table",
) -> None:
    """The running pipeline processes ('sensorwatch run'), each with the model version it serves per group and why
    it does not serve a group's active model (a refused bundle, ...). Each process writes this at start and at every
    model reload (retrain.reload_interval_s) and removes it when it stops; one not seen for two reload intervals and a
    minute stopped without a clean exit (killed, its host lost) or hangs."""
    from pipeline.serving import is_live, stale_after_s
    from pipeline.store import repo

    _choice(output, ("table", "json"), "--format")
    cfg = _load(config)
    stale_s = stale_after_s(cfg.retrain.reload_interval_s)
    with _session(cfg) as session:
        now = repo.database_now(session=session)  # the clock the processes' seen_at came from
        rows = repo.list_instances(session=session)
        active = {g: r.version for g, r in repo.active_model_versions(session=session).items()}

    def when(value: datetime) -> str:
        return value.isoformat(timespec="seconds").replace("+00:00", "Z")

    if output == "json":
        typer.echo(json.dumps([{"instance": r.instance, "consumer_group": r.consumer_group,
                                "started_at": when(r.started_at), "seen_at": when(r.seen_at),
                                "live": is_live(r, now, stale_s), "serving": r.serving, "unserved": r.unserved}
                               for r in rows], indent=2))
        return
    table = Table(title=f"pipeline processes ({len(rows)})", title_justify="left")
    for column in ("process", "consumer group", "started (UTC)", "last seen", "serving", "not served"):
        table.add_column(column, no_wrap=column in ("process", "started (UTC)"))
    for r in rows:
        ago = (now - r.seen_at).total_seconds()
        seen = f"{ago:.0f} s ago" + ("" if is_live(r, now, stale_s) else " (gone or hung)")
        serving = ", ".join(f"{g}={v}" + ("" if active.get(g) == v else f" (active: {active.get(g, 'none')})")
                            for g, v in sorted(r.serving.items()))
        unserved = "; ".join(f"{g}: {why}" for g, why in sorted(r.unserved.items()))
        table.add_row(*_plain(r.instance, r.consumer_group, r.started_at.strftime("%Y-%m-%d %H:%M:%S"), seen,
                              serving or "-", unserved or "-"))
    _stdout().print(table)


@models_app.command("activate")
def models_activate(config: ConfigOption, version: Annotated[str, typer.Argument(help="Version to activate.")]
                    ) -> None:
    """Make VERSION the active model of its group (also the way to roll back). The bundle is verified first; running
    pipelines switch to it within retrain.reload_interval_s."""
    from pipeline.registry import load_version
    from pipeline.store import repo

    cfg = _load(config)
    with _session(cfg, write=True) as session:
        found = repo.get_model_version(session=session, version=version)
        if found is None:
            raise _fail(ModelError(f"no model version {version!r}"), 2)
        try:
            if found.bundle_deleted_at is not None:
                raise repo.BundleDeleted(found)
            load_version(found, cfg.group(found.group_name), cfg.model_dir)
            row = repo.activate_model_version(session=session, version=version)
        except (ModelError, ConfigError, repo.BundleDeleted) as exc:
            raise _fail(exc, 2) from None
    console.print(f"[green]{escape(row.version)} is now active for group {escape(row.group_name)}[/green]")
    if cfg.retrain.enabled:
        console.print(f"[yellow]note[/yellow]: the scheduled retrain ({escape(cfg.retrain.cron)} "
                      f"{cfg.retrain.timezone}) may promote a new model over it; set retrain.enabled: false to keep "
                      "it until you decide")
    configured = cfg.group(row.group_name).model.type
    if row.model_type != configured:
        console.print(f"[yellow]note[/yellow]: {escape(row.version)} is a {row.model_type} model, the configuration's "
                      f"model.type is {configured}: the next retrain trains a {configured} model from scratch")


@models_app.command("show")
def models_show(
    config: ConfigOption,
    version: Annotated[str, typer.Argument(help="Version to show (from 'models list').")],
    output: Annotated[str, typer.Option("--format", help="table or json.")] = "table",
) -> None:
    """One model version: status, data range, windows used, threshold, metrics (false-alarm rates of candidate and
    active model when it came from a retrain), artifact path and checksum, and the retrain run that produced it."""
    from pipeline.store import repo

    _choice(output, ("table", "json"), "--format")
    cfg = _load(config)
    with _session(cfg) as session:
        row = repo.get_model_version(session=session, version=version)
        runs = repo.list_retrain_runs(session=session, candidate_version=version, limit=1)
    if row is None:
        raise _fail(ModelError(f"no model version {version!r}"), 2)

    def when(value: datetime | None) -> str | None:
        return value.isoformat().replace("+00:00", "Z") if value else None

    doc = {
        "version": row.version, "group": row.group_name, "model_type": row.model_type, "status": row.status,
        "reason": row.reason, "created_at": when(row.created_at), "activated_at": when(row.activated_at),
        "data_start": when(row.data_start), "data_end": when(row.data_end), "windows_used": row.windows_used,
        "threshold": row.threshold, "threshold_method": row.threshold_method, "config_hash": row.config_hash,
        "artifact_path": row.artifact_path, "checksum": row.checksum,
        "bundle_deleted_at": when(row.bundle_deleted_at), "metrics": row.metrics,
        "retrain_run": None if not runs else {
            "id": runs[0].id, "trigger": runs[0].trigger, "outcome": runs[0].outcome, "reason": runs[0].reason,
            "started_at": when(runs[0].started_at), "finished_at": when(runs[0].finished_at),
            "compared_with": runs[0].active_version,
        },
    }
    if output == "json":
        typer.echo(json.dumps(doc, indent=2, default=str))
        return
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    for key, value in doc.items():
        if key in ("metrics", "retrain_run"):
            continue
        grid.add_row(key, "-" if value is None else escape(str(value)))
    out = _stdout()
    out.print(grid)
    for title, part in (("metrics", doc["metrics"]), ("retrain run", doc["retrain_run"])):
        if part:
            table = Table(title=title, title_justify="left")
            table.add_column("key")
            table.add_column("value")
            for key, value in part.items():
                table.add_row(key, escape(f"{value:.6g}" if isinstance(value, float) else str(value)))
            out.print(table)


@models_app.command("runs")
def models_runs(
    config: ConfigOption,
    group: Annotated[str | None, typer.Option(help="Only this group.")] = None,
    limit: Annotated[int, typer.Option(help="At most this many runs.", min=1)] = 20,
) -> None:
    """Recent retrain runs, newest first: when, outcome (promoted, rejected, skipped, failed, refused) and why."""
    from pipeline.store import repo

    cfg = _load(config)
    with _session(cfg) as session:
        rows = repo.list_retrain_runs(session=session, group=group, limit=limit)
    table = Table(title=f"retrain runs ({len(rows)})", title_justify="left")
    for column in ("id", "group", "trigger", "started (UTC)", "seconds", "outcome", "candidate", "windows", "reason"):
        table.add_column(column, no_wrap=column != "reason")
    for r in rows:
        seconds = f"{(r.finished_at - r.started_at).total_seconds():.0f}" if r.finished_at else ""
        table.add_row(*_plain(r.id, r.group_name, r.trigger, r.started_at.strftime("%Y-%m-%d %H:%M:%S"), seconds,
                              r.outcome, r.candidate_version or "", r.windows_used or "", r.reason or ""))
    _stdout().print(table)


@sinks_app.command("status")
def sinks_status(
    config: ConfigOption,
    failed: Annotated[int, typer.Option(help="Also list this many of the newest failed events.", min=0)] = 0,
    output: Annotated[str, typer.Option("--format", help="table or json.")] = "table",
) -> None:
    """Per sink: events pending, delivered and failed in the outbox (finished ones are kept 7 days), the oldest
    pending event's age, and who delivers it (the pipeline process holding its lease)."""
    from pipeline.sinks import summarize_outbox
    from pipeline.store import repo

    _choice(output, ("table", "json"), "--format")
    cfg = _load(config)
    with _session(cfg) as session:
        summary = summarize_outbox(session, cfg, datetime.now(UTC))
        recent_failures = repo.outbox_events(session=session, status="failed", limit=failed) if failed else []
    rows = [{"sink": x.sink, "configured": x.label or "not configured", "pending": x.pending,
             "delivered": x.delivered, "failed": x.failed,
             "oldest_pending_s": None if x.oldest_pending_s is None else round(x.oldest_pending_s),
             "delivered_by": x.delivered_by} for x in summary]
    failures = [{"id": e.id, "sink": e.sink, "event": e.document.get("event"), "incident": e.document.get("incident"),
                 "attempts": e.attempts, "finished_at": e.finished_at.isoformat() if e.finished_at else None,
                 "error": e.last_error} for e in recent_failures]
    if output == "json":
        typer.echo(json.dumps({"sinks": rows, "failed": failures} if failed else {"sinks": rows}, indent=2))
        return
    if not rows:
        console.print(f"no alert sink is configured in {escape(str(config))} (sinks.kafka, sinks.webhook) and the "
                      "outbox is empty")
        return
    table = Table(title="alert sinks", title_justify="left")
    for column in ("sink", "configured", "pending", "delivered", "failed", "oldest pending", "delivered by"):
        table.add_column(column, no_wrap=True)
    for r in rows:
        age = "" if r["oldest_pending_s"] is None else f"{r['oldest_pending_s']} s"
        table.add_row(r["sink"], escape(str(r["configured"])), str(r["pending"]), str(r["delivered"]),
                      str(r["failed"]), age, escape(r["delivered_by"] or "no running pipeline"))
    _stdout().print(table)
    if failures:
        listing = Table(title=f"newest failed events ({len(failures)})", title_justify="left")
        for column in ("id", "sink", "event", "incident", "tries", "finished (UTC)", "error"):
            listing.add_column(column, no_wrap=column != "error")
        for f in failures:
            listing.add_row(str(f["id"]), f["sink"], str(f["event"]), escape(str(f["incident"])), str(f["attempts"]),
                            str(f["finished_at"] or "")[:19].replace("T", " "), escape(f["error"] or ""))
        _stdout().print(listing)


@sinks_app.command("retry")
def sinks_retry(
    config: ConfigOption,
    sink: Annotated[str | None, typer.Option(help="Only this sink: kafka or webhook.")] = None,
    event_id: Annotated[list[int] | None, typer.Option("--id", help="Only these outbox events (repeatable).")] = None,
) -> None:
    """Queue failed events again (all, one sink's, or some by id), due at once and in their original order: after a
    receiver's outage outlasted max_age_h, or once it accepts what it refused. A running pipeline delivers them."""
    from pipeline.store import repo

    _choice(sink, ("kafka", "webhook"), "--sink")
    cfg = _load(config)
    with _session(cfg, write=True) as session:
        count = repo.requeue_outbox(session=session, now=datetime.now(UTC), sink=sink, ids=event_id or None)
    console.print(f"{count} failed event(s) queued again" + ("" if count else " (none matched)"))


@app.command("drift")
def drift_show(
    config: ConfigOption,
    group: Annotated[str | None, typer.Option(help="Only this asset group.")] = None,
    output: Annotated[str, typer.Option("--format", help="table or json.")] = "table",
) -> None:
    """Show how far each drift-following asset has drifted from what its model expects: the residual offsets
    (standard deviations of the model's scaler) followed up to its latest scored window, largest first. Offsets
    near drift.max_offset, or growing from day to day on a sensor whose faults are slow drifts, deserve a look."""
    from pipeline.drift import offsets_report
    from pipeline.store import repo

    _choice(output, ("table", "json"), "--format")
    cfg = _load(config)
    if group is not None:
        try:
            cfg.group(group)
        except ConfigError as exc:
            raise _fail(exc, 2) from None
    groups = [g for g in cfg.groups if g.drift is not None and group in (None, g.name)]
    if group is not None and not groups:
        raise _fail(ConfigError(f"group {group!r} does not follow drift (groups[].drift) in {config}"), 2)
    if not groups:
        console.print(f"no group of {escape(str(config))} follows drift (groups[].drift)")
        if output == "json":
            typer.echo("[]")  # still a document for scripts
        return
    with _session(cfg) as session:
        latest = repo.recent_scores(session=session, assets=[a for g in groups for a in g.assets], limit=1)
    limits = {asset: g.drift_limit for g in groups for asset in g.assets}  # by the asset's group now
    rows = [offsets_report(repo.score_of(r[-1]), limits[asset]) for asset, r in sorted(latest.items())]
    if output == "json":
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(title=f"drift offsets ({len(rows)} assets; standard deviations)", title_justify="left")
    for column in ("asset", "group", "latest window (UTC)", "model", "largest offsets", "limit"):
        table.add_column(column, no_wrap=column != "largest offsets")
    for row in rows:
        offsets = row["offsets"]
        assert isinstance(offsets, dict)
        shown = ", ".join(f"{sensor} {value:+.2f}" for sensor, value in list(offsets.items())[:3]) or "none yet"
        limit = "-" if row["max_offset"] is None else f"{row['max_offset']:g}"
        table.add_row(*_plain(row["asset"], row["group"], str(row["window_end"])[:19].replace("T", " "),
                              row["model_version"], shown, limit))
    _stdout().print(table)


@app.command()
def report(
    config: ConfigOption,
    asset: Annotated[str, typer.Option(help="The asset to report on.")],
    out: Annotated[Path, typer.Option(help="HTML file to write.")],
    since: Annotated[str, typer.Option(help="Start: ISO-8601 (UTC if no zone), or a span back like 24h, 7d.")] = "24h",
    until: Annotated[str, typer.Option(help="End: ISO-8601, or 'now'.")] = "now",
    csv_path: Annotated[Path | None, typer.Option(
        "--csv", help="Optional CSV of raw readings (ts, \\[asset,] one column per sensor) to plot the signals.",
    )] = None,
) -> None:
    """Write a self-contained HTML report of one asset: score vs threshold, per-sensor error contributions (and raw
    signals from --csv), alert spans shaded, and each alert's top sensors."""
    from pipeline.report import load_report_data, write_report
    from pipeline.store import repo

    now = datetime.now(UTC)
    start, end = _when(since, now, "--since"), _when(until, now, "--until")
    assert start is not None and end is not None
    if end <= start:
        raise typer.BadParameter("--until must be after --since", param_hint="--until")
    cfg = _load(config)
    group = cfg.asset_groups().get(asset)
    try:
        with _session(cfg) as session:
            data = load_report_data(session=session, group=group, asset=asset, start=start, end=end,
                                    csv_path=csv_path, groups=cfg.groups)
            span = None if data.scores else repo.score_span(session=session, asset=asset)
    except ConfigError as exc:
        raise _fail(exc, 2) from None
    if group is None:  # taken out of the configuration: its history is still stored
        console.print(f"[yellow]note[/yellow]: asset {escape(asset)} is in no group of {escape(str(config))}: "
                      f"reported with the group of its stored windows ({escape(data.group)})")
    write_report(out, data)
    signals = f", raw signals of {len(data.signals)} from {csv_path.name}" if data.signals and csv_path else ""
    console.print(f"[green]wrote[/green] {escape(str(out))}: {len(data.scores)} windows, {len(data.alerts)} "
                  f"alert(s), {len(data.sensors)} sensors{escape(signals)}")
    if not data.scores:  # --since is counted back from now: history replayed or backfilled is older
        where = ("it has no window scores at all (is a pipeline consuming its readings?)" if span is None else
                 f"its windows end between {span[0].isoformat()} and {span[1].isoformat()}: give --since/--until "
                 "(ISO-8601) in that span")
        console.print(f"[yellow]warning[/yellow]: no window scores of {escape(asset)} between "
                      f"{start.isoformat(timespec='seconds')} and {end.isoformat(timespec='seconds')}; {escape(where)}")
    if csv_path and not data.signals:
        console.print(f"[yellow]warning[/yellow]: {escape(csv_path.name)} has no readings of {escape(asset)} between "
                      f"{start.isoformat()} and {end.isoformat()} for its sensors: no raw signals plotted")


@app.command()
def backtest(
    config: ConfigOption,
    csv_path: Annotated[Path, typer.Option("--csv", help="CSV of recorded readings: ts, \\[asset,] one column per "
                                                         "sensor (as for train).")],
    group: Annotated[str | None, typer.Option(help="Group to backtest (default: the only group); rows of other "
                                                   "assets are left out.")] = None,
    version: Annotated[str | None, typer.Option(help="Model version (default: the group's active one).")] = None,
    incidents: Annotated[Path | None, typer.Option(
        help="Known incidents to score the alerts against: JSON list or CSV with asset, start, end \\[, label] "
             "(simulate's ground truth works).")] = None,
    output: Annotated[str, typer.Option("--format", help="table or json.")] = "table",
    scores_out: Annotated[Path | None, typer.Option(help="Also write every judged window to this CSV.")] = None,
    report_dir: Annotated[Path | None, typer.Option(help="Also write one HTML report per asset here (score, "
                                                         "sensor errors, raw signals, alerts).")] = None,
) -> None:
    """What a model and the configured alert rules would have raised on recorded history: the pipeline's own
    windowing, scoring, drift following and alert rules run over the CSV in time order, writing nothing to the
    database or Kafka. Prints per asset the windows, the share judged anomalous and the alerts (per day), then each
    alert; with --incidents, which known incidents an alert caught (recall) and how many alerts matched one
    (precision); incidents of other assets or outside the history are left out. Tune thresholds and alert rules
    here before deploying them. The CSV is read in pieces when each asset's rows come in time order (else whole,
    held in memory)."""
    import pandas as pd
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from pipeline.alert_format import duration_text, off_training_text, sensors_text
    from pipeline.backtest import History, backtest_history, reports, score_incidents
    from pipeline.backtest import read_incidents as read_incident_file
    from pipeline.csv_format import data_rows
    from pipeline.history import read_in_time_order
    from pipeline.registry import load_version
    from pipeline.report import write_report
    from pipeline.store import repo
    from pipeline.types import Score, ms_to_datetime

    _choice(output, ("table", "json"), "--format")
    cfg = _load(config)
    if group is None and len(cfg.groups) > 1:
        raise _fail(ConfigError(f"--group is required: the config has {len(cfg.groups)} groups"), 2)
    try:
        group_cfg = cfg.group(group) if group else cfg.groups[0]
        known = read_incident_file(incidents) if incidents is not None else None
    except ConfigError as exc:
        raise _fail(exc, 2) from None
    with _session(cfg) as session:
        row = (repo.get_model_version(session=session, version=version) if version else
               repo.active_model_versions(session=session).get(group_cfg.name))
    if row is None:
        raise _fail(ModelError(f"no model version {version!r}" if version else
                               f"group {group_cfg.name!r} has no active model: give --version"), 2)
    if row.group_name != group_cfg.name:
        raise _fail(ModelError(f"model {row.version} is of group {row.group_name!r}, not {group_cfg.name!r}"), 2)
    try:
        detector = load_version(row, group_cfg, cfg.model_dir)
    except (ModelError, OSError) as exc:
        raise _fail(exc, 2) from None

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("rows"),
                   TimeElapsedColumn(), console=console, disable=output == "json" and not console.is_terminal)
    task = bar.add_task(f"backtest {row.version}", total=data_rows(csv_path))

    def judged(pieces: Iterable[pd.DataFrame]) -> History:
        """The backtest of the history in ``pieces`` (the bar from 0), its scores written to --scores-out as they
        come."""
        def write(scores: list[Score]) -> None:
            rows = [{"asset": s.asset, "window_start": ms_to_datetime(s.start_ms).isoformat(),
                     "window_end": ms_to_datetime(s.end_ms).isoformat(), "score": s.score, "level": s.level,
                     "threshold": s.threshold, "is_anomaly": s.is_anomaly, **s.sensor_errors} for s in scores]
            pd.DataFrame(rows).to_csv(sink, header=sink.tell() == 0, index=False)

        with ExitStack() as stack:
            sink = None
            if partial is not None:
                partial.parent.mkdir(parents=True, exist_ok=True)
                sink = stack.enter_context(partial.open("w", encoding="utf-8", newline=""))
            bar.reset(task)
            return backtest_history(pieces, cfg, group_cfg, detector, keep_scores=report_dir is not None,
                                    signals=report_dir is not None, on_scores=write if sink else None,
                                    advance=lambda n: bar.advance(task, n))

    # the scores go to a file beside --scores-out, which replaces it once the backtest is done: a failed one leaves
    # the previous file (or none), and --scores-out naming the history itself cannot empty it before it is read
    partial = scores_out.with_name(f".{scores_out.name}.part") if scores_out is not None else None
    try:
        with bar:
            history = read_in_time_order(csv_path, "backtest data", judged, lambda exc: console.print(
                f"[yellow]note[/yellow]: {escape(str(exc))}; the file is read whole instead (held in memory: sort a "
                "long history by time to backtest it piece by piece)"))
        for note in history.notes:
            console.print(f"[yellow]note[/yellow]: {escape(note)}")
        if not history.result.assets:
            raise ConfigError(f"{csv_path}: no complete window of group {group_cfg.name!r} in the data")
    except BaseException as exc:
        if partial is not None:
            partial.unlink(missing_ok=True)
        if isinstance(exc, ConfigError | ValueError):
            raise _fail(exc, 2) from None
        raise
    if partial is not None and scores_out is not None:
        partial.replace(scores_out)
    result = history.result
    summaries = result.assets
    caught = score_incidents(result, known) if known is not None else None
    if report_dir is not None:
        for data in reports(result, group_cfg, history.signals, csv_path.name):
            write_report(report_dir / f"{data.asset}.html", data)

    alerts = [{"n": i, "asset": a.asset, "severity": a.severity, "opened": _utc_text(a.opened_ms),
               "closed": _utc_text(a.closed_ms), "duration_s": ((a.closed_ms or a.last_seen_ms) - a.opened_ms) / 1000,
               "peak_multiple": a.peak_score / a.threshold if a.threshold > 0 else None,
               "top_sensors": a.top_sensors, "off_training": a.off_training or {}}
              for i, a in enumerate(result.alerts, start=1)]
    if output == "json":
        typer.echo(json.dumps({
            "group": result.group, "model_version": result.model_version, "threshold": result.threshold,
            "assets": [{"asset": x.asset, "first": _utc_text(x.first_ms), "last": _utc_text(x.last_ms),
                        "windows": x.windows, "anomalous": x.anomalous, "alerts": x.alerts,
                        "alerts_per_day": x.alerts_per_day} for x in summaries],
            "alerts": alerts,
            "incidents": None if caught is None else {
                "recall": caught.recall, "precision": caught.precision,
                "missed": [{"asset": s.asset, "start": _utc_text(s.start_ms), "end": _utc_text(s.end_ms),
                            "label": s.label} for s, hit in caught.caught if not hit],
                "left_out": len(known or ()) - len(caught.caught)},
        }, indent=2))
        return
    out = _stdout()
    table = Table(title=f"backtest of {result.model_version} on {csv_path.name} (threshold {result.threshold:.4g})",
                  title_justify="left")
    for column in ("asset", "from (UTC)", "to (UTC)", "windows", "anomalous", "alerts", "per day"):
        table.add_column(column, justify="right" if column in ("windows", "anomalous", "per day") else "left")
    for x in summaries:
        table.add_row(escape(x.asset), _utc_text(x.first_ms), _utc_text(x.last_ms), str(x.windows),
                      f"{x.anomalous / x.windows:.1%}",
                      ", ".join(f"{n} {s}" for s, n in x.alerts.items()) or "none",
                      f"{x.alerts_per_day:.2f}")
    out.print(table)
    if result.alerts:
        listed = Table(title="alerts", title_justify="left")
        for column in ("#", "asset", "severity", "opened (UTC)", "lasted", "peak", "top sensors"):
            listed.add_column(column, no_wrap=column in ("#", "opened (UTC)"))
        for a, doc in zip(result.alerts, alerts, strict=True):
            lasted = duration_text(doc["duration_s"]) + ("" if a.closed_ms is not None else " (open at the end)")
            peak = "-" if doc["peak_multiple"] is None else f"{doc['peak_multiple']:.2f}x"
            far = off_training_text(a.off_training)
            listed.add_row(str(doc["n"]), escape(a.asset), a.severity, doc["opened"], lasted, peak,
                           escape(sensors_text(a.top_sensors) + (f"; far outside training: {far}" if far else "")))
        out.print(listed)
    if caught is not None:
        missed = [s for s, hit in caught.caught if not hit]
        out.print(f"incidents: {len(caught.caught) - len(missed)} of {len(caught.caught)} caught (recall "
                  f"{caught.recall:.2f}); {len(result.alerts) - len(caught.false_alerts)} of {len(result.alerts)} "
                  f"alerts matched one (precision {caught.precision:.2f})")
        if len(known or ()) > len(caught.caught):
            out.print(f"  {len(known or ()) - len(caught.caught)} incident(s) of other assets or outside the history "
                      "left out")
        for s in missed:
            out.print(f"  missed: {escape(s.asset)} {_utc_text(s.start_ms)} to {_utc_text(s.end_ms)}"
                      + (f" ({escape(s.label)})" if s.label else ""))
    for path, what in ((scores_out, "window scores"), (report_dir, "reports")):
        if path is not None:
            console.print(f"{what}: {escape(str(path))}")


@app.command()
def replay(
    config: ConfigOption,
    csv_path: Annotated[Path, typer.Option("--csv", help="CSV of readings: ts, \\[asset,] one column per sensor (as "
                                                         "simulate writes and train reads).")],
    group: Annotated[str | None, typer.Option(help="Group whose first asset rows without an asset column are "
                                                   "(default: the only group).")] = None,
    speed: Annotated[float | None, typer.Option(help="Pace the records at this multiple of real time by their ts "
                                                     "(1: real time, 60: an hour a minute); default: as fast as "
                                                     "the brokers take them.", min=0.001)] = None,
) -> None:
    """Produce a CSV of recorded readings to the readings topic (kafka section of the configuration): one record per
    row in the message format, keyed by the asset, in time order, for a running pipeline to consume. For trials,
    demos and backfills. Sensors and assets not in the configuration, unreadable times and cells that are not
    numbers are left out, each counted in a note. The topic must exist (sensorwatch creates none)."""
    import time

    import numpy as np
    from kafka.errors import KafkaError
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from pipeline import kafka_io
    from pipeline.history import read_readings_csv, read_readings_pieces
    from pipeline.replay import Message, csv_messages, ingest_notes, messages_of, plan, send

    cfg = _load(config)
    try:
        grp = cfg.group(group) if group else None
        planned = plan(read_readings_pieces(csv_path, "replay data"), cfg, grp)
    except ConfigError as exc:
        raise _fail(exc, 2) from None
    for note in planned.omitted.notes():
        console.print(f"[yellow]note[/yellow]: {escape(note)}")
    if not planned.in_order:
        console.print("[yellow]note[/yellow]: the file is not in time order, so it is sorted whole in memory (about "
                      "1.1 KB a row); sort a long history by time to replay it as it is read")
    topic = cfg.kafka.topic
    try:
        if not kafka_io.topic_partitions(cfg.kafka, [topic], timeout_s=15)[topic]:
            raise _fail(TransientError(f"topic {topic} does not exist: create it, e.g. "
                                       f"{kafka_io.create_topic_command(cfg.kafka, topic)}"), 1)
        producer = kafka_io.make_producer(cfg.kafka, linger_ms=20, batch_size=256 * 1024)
    except (TransientError, KafkaError) as exc:
        raise _fail(exc, 1) from None
    ts = np.sort(planned.ts)  # as they are sent
    for note in ingest_notes(ts, cfg.ingest, round(time.time() * 1000), speed):
        console.print(f"[yellow]note[/yellow]: {escape(note)}")
    try:
        messages: Iterable[Message] = (
            messages_of(read_readings_pieces(csv_path, "replay data"), cfg, grp) if planned.in_order
            else csv_messages(read_readings_csv(csv_path, "replay data"), cfg, grp).messages)
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console, disable=not console.is_terminal) as bar:
            task = bar.add_task(f"replay to {topic}", total=len(ts))
            sent = send(producer, topic, messages, speed=speed, advance=lambda n: bar.advance(task, n))
    except (TransientError, KafkaError) as exc:
        raise _fail(exc, 1) from None
    except ConfigError as exc:  # the file changed since it was planned
        raise _fail(exc, 2) from None
    finally:
        producer.close()
    console.print(f"[green]sent[/green] {sent} readings of {len(planned.assets)} asset(s) to {escape(topic)}"
                  f" ({_utc_text(int(ts[0]))} to {_utc_text(int(ts[-1]))})")


@app.command()
def simulate(
    out: Annotated[Path, typer.Option(help="Directory for readings.csv and ground_truth.json.")],
    assets: Annotated[str, typer.Option(help="Comma-separated asset ids.")] = "pump-1,pump-2,pump-3",
    hours: Annotated[float, typer.Option(help="Hours of data per asset.", min=0.01)] = 24.0,
    period: Annotated[float, typer.Option(help="Sampling period in seconds.", min=0.001)] = 10.0,
    anomalies: Annotated[int, typer.Option(help="Injected anomalies per asset (0 for normal data).", min=0)] = 2,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 7,
    start: Annotated[str, typer.Option(help="First timestamp (ISO-8601, UTC).")] = "2026-01-01T00:00:00",
) -> None:
    """Write simulated multivariate readings (CSV) and the ground truth of injected anomalies (JSON)."""
    import pandas as pd

    from pipeline.simulate import simulate_fleet, write_ground_truth

    names = [a.strip() for a in assets.split(",") if a.strip()]
    if not names:
        raise typer.BadParameter("needs at least one asset id", param_hint="--assets")
    try:
        first = pd.Timestamp(start, tz="UTC")
    except ValueError:
        raise typer.BadParameter(f"{start!r} is not an ISO-8601 time", param_hint="--start") from None
    try:
        frames, truth = simulate_fleet(
            names, first, int(hours * 3600 / period), period, seed,
            anomalies_per_asset=anomalies, anomalous_assets=names if anomalies else [],
        )
    except ValueError as exc:  # too short for the anomalies asked for
        raise _fail(exc, 2) from None
    out.mkdir(parents=True, exist_ok=True)
    table = pd.concat([f.assign(asset=a) for a, f in frames.items()]).reset_index().sort_values(["ts", "asset"])
    table["ts"] = table["ts"].map(lambda t: t.isoformat())
    table.to_csv(out / "readings.csv", index=False)
    write_ground_truth(out / "ground_truth.json", truth)
    console.print(f"wrote {len(table)} readings of {len(names)} assets and {len(truth)} anomalies to "
                  f"{escape(str(out))}")


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



@app.command()
def evaluate(
    data: Annotated[Path, typer.Option(help="Dataset directory (SKAB layout: valve1/, other/, anomaly-free/).")],
    dataset: Annotated[str, typer.Option(help="Evaluation protocol; only 'skab'.")] = "skab",
    model: Annotated[str, typer.Option(help="Model type: dense, lstm, conv, sparse, contractive or vae.")] = "dense",
    output: Annotated[str, typer.Option(help="table or json.")] = "table",
    files: Annotated[int | None, typer.Option(help="Only the first N files (valve1/ then other/).", min=1)] = None,
    epochs: Annotated[int | None, typer.Option(help="Override the training epochs per file.", min=1)] = None,
    baselines: Annotated[bool, typer.Option(help="Also score flag-everything and river HalfSpaceTrees.")] = True,
    calibrate: Annotated[bool, typer.Option(help="Threshold headroom from anomaly-free.csv (normal data).")] = False,
    plot: Annotated[Path | None, typer.Option(help="Also write an HTML page plotting every file's score, labels "
                                                   "and flags here.")] = None,
    chain: Annotated[str, typer.Option(help="detector: the SKAB detector; pipeline: the streaming product's own "
                                            "chain (windower, training, scoring, alert engine).")] = "detector",
    aftermath: Annotated[bool | None, typer.Option(
        help="pipeline chain only: with the alert rule's aftermath (default: with).")] = None,
    drift: Annotated[bool | None, typer.Option(help="pipeline chain only: with drift following (default: with).")
                     ] = None,
    score_steps: Annotated[int | None, typer.Option(
        help="Score each window by its last N of 20 rows (20: the whole window; default: the recipe's for the model "
             "type, as the report's settings show).", min=1, max=20)] = None,
) -> None:
    """Run a detection benchmark: train on each file's first 400 rows, flag the rest causally, report F1/FAR/MAR."""
    from models.autoencoders import MODEL_TYPES
    from pipeline.skab import evaluate_skab

    if dataset != "skab":
        raise typer.BadParameter(f"unknown dataset {dataset!r} (have: skab)", param_hint="--dataset")
    if model not in MODEL_TYPES:
        raise typer.BadParameter(f"unknown model type {model!r} (have: {', '.join(MODEL_TYPES)})",
                                 param_hint="--model")
    if output not in ("table", "json"):
        raise typer.BadParameter("--output must be table or json", param_hint="--output")
    _choice(chain, ("detector", "pipeline"), "--chain")
    try:
        report = evaluate_skab(data, model, limit=files, baselines=baselines, calibrate=calibrate,
                               progress=output == "table" or console.is_terminal,
                               overrides={k: v for k, v in (("epochs", epochs), ("score_steps", score_steps)) if v},
                               plot=plot, chain=chain,
                               aftermath=aftermath, drift=drift)
    except (FileNotFoundError, ValueError) as exc:
        raise _fail(exc, 2) from None
    for note in report["notes"]:
        console.print(f"[yellow]note[/yellow]: {escape(note)}")
    if plot is not None:
        console.print(f"plots: {escape(str(report['plot']))}")
    if output == "json":
        typer.echo(json.dumps(report, indent=2))
        return
    table = Table(title=f"SKAB, {chain} chain ({report['files']} files, point-wise, summed over test rows)")
    for column in ("detector", "F1", "FAR", "MAR", "train s"):
        table.add_column(column, justify="left" if column == "detector" else "right")
    for row in [report, *report["baselines"]]:
        table.add_row(row["model"], f"{row['f1']:.3f}", f"{row['far']:.2%}", f"{row['mar']:.2%}",
                      f"{row['train_seconds']:.1f}")
    Console().print(table)


def _one_paragraph_summaries(*apps: typer.Typer) -> None:
    """Command listings show each command's first docstring paragraph as one flowing line (typer's rich help keeps
    its line breaks there, which wraps it raggedly); the command's own help is left as written."""
    for sub in apps:
        for info in sub.registered_commands:
            if info.short_help is None and info.callback is not None:
                doc = inspect.getdoc(info.callback) or ""
                info.short_help = " ".join(doc.split("\n\n")[0].split()) or None


_one_paragraph_summaries(app, db_app, alerts_app, models_app, sinks_app)

if __name__ == "__main__":
    app()
