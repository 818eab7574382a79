"""``sensorwatch scheduler``: APScheduler 3.x runs the retrain job on the ``retrain.cron`` schedule, and the
retention job (``pipeline.retention``) on ``retention.cron``.

The retrain job is kept in the SQL database (APScheduler's SQLAlchemyJobStore on the configured URL, table
``scheduler_jobs`` from migration 0003) under a stable id, so a restarted scheduler finds its schedule. On start the
job is written with ``replace_existing``; when the stored job already has the same trigger and arguments, its stored
next run time is kept, so a run missed while the scheduler was down still fires on start if it is within
``misfire_grace_time_s`` (several missed runs fire once when ``coalesce``). One instance at a time
(``max_instances=1``); each run also takes the per-group database lock of ``pipeline.retrain``, so two schedulers or a
manual ``sensorwatch retrain`` never train a group twice at once. The job reloads the configuration file on every run.
The retention job is kept the same way (``PRUNE_JOB_ID``); a prune missed while the scheduler was down runs once when
it is back, however late. Both jobs share one worker thread, so they never run at the same time.
"""

from __future__ import annotations

import contextlib
import logging
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.job import Job
from apscheduler.jobstores.base import JobLookupError
from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
from apscheduler.schedulers.base import BaseScheduler
from apscheduler.schedulers.blocking import BlockingScheduler
from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.combining import OrTrigger
from apscheduler.triggers.cron import CronTrigger
from sqlalchemy import Engine

from pipeline.config import Config, load_config
from pipeline.cron import CronSchedule
from pipeline.errors import ConfigError

log = logging.getLogger(__name__)

JOB_ID = "sensorwatch-retrain"
JOB_FUNC = "pipeline.scheduler:scheduled_retrain"
PRUNE_JOB_ID = "sensorwatch-prune"
PRUNE_JOB_FUNC = "pipeline.scheduler:scheduled_prune"
JOBS_TABLE = "scheduler_jobs"
_DAY_NAMES = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")


def cron_trigger(expression: str, timezone: str) -> BaseTrigger:
    """A trigger that fires like the cron ``expression`` (five fields or a macro) in ``timezone``.

    Built from ``pipeline.cron``'s parse, so weekdays mean what they mean in crontab (0 and 7 are Sunday; APScheduler
    3.x's own ``from_crontab`` reads 0 as Monday) and, as in Vixie cron, a day matching either day-of-month or
    day-of-week fires when both are restricted. ValueError for a bad expression or time zone.
    """
    c = CronSchedule.parse(expression)
    zone = ZoneInfo(timezone)

    def values(chosen: frozenset[int], low: int, high: int) -> str:
        return "*" if chosen == frozenset(range(low, high + 1)) else ",".join(str(v) for v in sorted(chosen))

    common = {"minute": values(c.minutes, 0, 59), "hour": values(c.hours, 0, 23),
              "month": values(c.months, 1, 12), "timezone": zone}
    days = values(c.days, 1, 31)
    weekdays = "*" if len(c.weekdays) == 7 else ",".join(_DAY_NAMES[d] for d in sorted(c.weekdays))
    if c.any_day or c.any_weekday:
        return CronTrigger(day=days, day_of_week=weekdays, **common)
    return OrTrigger([CronTrigger(day=days, **common), CronTrigger(day_of_week=weekdays, **common)])


def _kept_next_run(store: SQLAlchemyJobStore, job_id: str, func: str, trigger: BaseTrigger, args: list[str]
                   ) -> datetime | None:
    """The stored job's next run time when it has the same function, trigger and arguments; else None."""
    try:
        stored: Job | None = store.lookup_job(job_id)
    except Exception as exc:  # an unreadable stored job is simply replaced
        log.warning("stored job %s unreadable (%s: %s); replacing it", job_id, type(exc).__name__, exc)
        return None
    if stored is None or stored.func_ref != func or list(stored.args) != args:
        return None
    return stored.next_run_time if repr(stored.trigger) == repr(trigger) else None


def build_scheduler(config: Config, config_path: Path, *, engine: Engine, trigger: BaseTrigger | None = None,
                    prune_trigger: BaseTrigger | None = None) -> BlockingScheduler:
    """A blocking scheduler whose SQL job store holds the retrain job (under ``JOB_ID``, when ``retrain.enabled``)
    and the retention job (under ``PRUNE_JOB_ID``, when ``retention.enabled``), each added or updated.

    ``trigger`` and ``prune_trigger`` replace the configured cron schedules (tests use short ones). ``engine`` is the
    database the job store lives in (the caller disposes of it). The stored job of a part that is disabled is
    removed; ConfigError when both are.
    """
    rc, keep = config.retrain, config.retention
    store = SQLAlchemyJobStore(engine=engine, tablename=JOBS_TABLE)
    for enabled, job_id in ((rc.enabled, JOB_ID), (keep.enabled, PRUNE_JOB_ID)):
        if not enabled:
            with contextlib.suppress(JobLookupError):
                store.remove_job(job_id)
    if not rc.enabled and not keep.enabled:
        raise ConfigError("retrain.enabled and retention.enabled are both false: nothing to schedule (the stored "
                          "jobs, if any, were removed)")
    scheduler = BlockingScheduler(jobstores={"default": store}, executors={"default": ThreadPoolExecutor(1)},
                                  timezone=ZoneInfo(rc.timezone))
    args = [str(Path(config_path).resolve())]
    if rc.enabled:
        _add_job(scheduler, store, JOB_ID, JOB_FUNC, trigger or cron_trigger(rc.cron, rc.timezone), args,
                 name="retrain on recent normal data", coalesce=rc.coalesce,
                 misfire_grace_time=rc.misfire_grace_time_s)
    if keep.enabled:
        log.info("retention: window scores older than %g days are deleted on %s %s%s (the retention section; "
                 "retention.enabled: false turns this off)", keep.scores_days, keep.cron, keep.timezone,
                 f", resolved alerts older than {keep.alerts_days:g} days" if keep.alerts_days else "")
        _add_job(scheduler, store, PRUNE_JOB_ID, PRUNE_JOB_FUNC,
                 prune_trigger or cron_trigger(keep.cron, keep.timezone), args,
                 name="delete history older than the retention", coalesce=True, misfire_grace_time=None)
    return scheduler


def _add_job(scheduler: BlockingScheduler, store: SQLAlchemyJobStore, job_id: str, func: str, trigger: BaseTrigger,
             args: list[str], *, name: str, coalesce: bool, misfire_grace_time: int | None) -> None:
    kept = _kept_next_run(store, job_id, func, trigger, args)
    scheduler.add_job(func, trigger, args=args, id=job_id, name=name, replace_existing=True, max_instances=1,
                      coalesce=coalesce, misfire_grace_time=misfire_grace_time,
                      **({"next_run_time": kept} if kept else {}))
    log.info("%s job %s on %s: %s", name, job_id, trigger,
             f"keeping the stored next run at {kept.isoformat()}" if kept else "schedule written")


def stop_when_running(scheduler: BaseScheduler) -> None:
    """Shut ``scheduler`` down, waiting for a running retrain to finish (call from any thread but the scheduler's)."""
    if scheduler.running:
        log.info("stopping the scheduler (a running retrain finishes first)")
        scheduler.shutdown(wait=True)


def scheduled_retrain(config_path: str) -> None:
    """The scheduled job: reload the configuration and retrain every group (outcomes are logged and recorded)."""
    from pipeline.retrain import retrain_all

    try:
        config = load_config(config_path)
    except ConfigError as exc:
        log.error("scheduled retrain not started: configuration %s: %s", config_path, exc)
        return
    for result in retrain_all(config, trigger="schedule"):
        log.info("scheduled retrain %s", result.summary())


def scheduled_prune(config_path: str) -> None:
    """The scheduled retention job: reload the configuration and delete history older than its retention (the
    outcome is logged)."""
    from pipeline.retention import PrunePlan, prune_database
    from pipeline.store.db import describe_error

    try:
        config = load_config(config_path)
    except ConfigError as exc:
        log.error("scheduled prune not started: configuration %s: %s", config_path, exc)
        return
    if not config.retention.enabled:
        log.info("scheduled prune skipped: retention.enabled is false")
        return
    try:
        prune_database(config, PrunePlan.of(config, datetime.now(UTC)))
    except Exception as exc:  # the next night tries again; whole batches deleted so far stay deleted
        log.error("scheduled prune failed: %s", describe_error(exc, config.database.url))
