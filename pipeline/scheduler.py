"""``sensorwatch scheduler``: APScheduler 3.x runs the retrain job on the ``retrain.cron`` schedule, and the
retention job (``pipeline.retention``) on ``retention.cron``.

The retrain job is kept in the SQL database (``ConfiguredJobStore``, APScheduler's SQLAlchemyJobStore layout on the
configured URL, table ``scheduler_jobs`` from migration 0003) under a stable id, so a restarted scheduler finds its
schedule. Nothing stored is unpickled or run as written: a row holds only its next run time and a JSON fingerprint of
the job (function, arguments, trigger); what runs is always the job this process configured. On start the job is
written with ``replace_existing``; when the stored job has the same fingerprint, its stored next run time is kept,
so a run missed while the scheduler was down still fires on start if it is within ``misfire_grace_time_s`` (several
missed runs fire once when ``coalesce``). One instance at a time (``max_instances=1``); each run also takes the
per-group database lock of ``pipeline.retrain``, so two schedulers or a manual ``sensorwatch retrain`` never train a
group twice at once, and each run knows the scheduled time it is for (``current_firing``), so two schedulers on one
database train a group once per firing. The job runs in a child process (``pipeline.retrain_job``), which reloads the
configuration file on every run; training's memory goes with it.
The retention job is kept the same way (``PRUNE_JOB_ID``); a prune missed while the scheduler was down runs once when
it is back, however late. Both jobs share one worker thread, so they never run at the same time.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from apscheduler.executors.base import run_job
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.job import Job
from apscheduler.jobstores.base import ConflictingIdError, JobLookupError
from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
from apscheduler.schedulers.base import BaseScheduler
from apscheduler.schedulers.blocking import BlockingScheduler
from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.combining import OrTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.util import datetime_to_utc_timestamp, utc_timestamp_to_datetime
from sqlalchemy import Engine, and_, select
from sqlalchemy.exc import IntegrityError

from pipeline import logs
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


class ConfiguredJobStore(SQLAlchemyJobStore):
    """APScheduler's SQL job store without pickle: a row's ``job_state`` is JSON holding the job's fingerprint
    (function reference, arguments, trigger), and jobs are rebuilt from the ones this process added, with the row's
    next run time. A row that is not such JSON (written by an older sensorwatch, or by anyone with write access to
    the database) is never deserialised: its job is replaced when this process adds it, and ignored until then."""

    def __init__(self, *, engine: Engine, tablename: str) -> None:
        super().__init__(engine=engine, tablename=tablename)
        self._templates: dict[str, dict[str, Any]] = {}

    @staticmethod
    def fingerprint(func: str, args: Sequence[object], trigger: BaseTrigger) -> str:
        """What identifies a job's schedule: its function, arguments and trigger."""
        return json.dumps({"func": func, "args": [str(a) for a in args], "trigger": repr(trigger)}, sort_keys=True)

    def _state(self, job: Job) -> bytes:
        self._templates[job.id] = job.__getstate__()
        return json.dumps({"version": 1, "fingerprint": self.fingerprint(job.func_ref, job.args, job.trigger)}
                          ).encode()

    def add_job(self, job: Job) -> None:
        insert = self.jobs_t.insert().values(id=job.id, next_run_time=datetime_to_utc_timestamp(job.next_run_time),
                                             job_state=self._state(job))
        with self.engine.begin() as connection:
            try:
                connection.execute(insert)
            except IntegrityError:
                raise ConflictingIdError(job.id) from None

    def update_job(self, job: Job) -> None:
        update = (self.jobs_t.update()
                  .values(next_run_time=datetime_to_utc_timestamp(job.next_run_time), job_state=self._state(job))
                  .where(self.jobs_t.c.id == job.id))
        with self.engine.begin() as connection:
            if connection.execute(update).rowcount == 0:
                raise JobLookupError(job.id)

    def stored_next_run(self, job_id: str, fingerprint: str) -> datetime | None:
        """The stored next run time of ``job_id`` when its row carries ``fingerprint``; else None."""
        query = select(self.jobs_t.c.job_state, self.jobs_t.c.next_run_time).where(self.jobs_t.c.id == job_id)
        with self.engine.begin() as connection:
            row = connection.execute(query).first()
        if row is None:
            return None
        try:
            stored = json.loads(row.job_state)["fingerprint"]
        except (ValueError, TypeError, KeyError):  # UnicodeDecodeError is a ValueError
            log.warning("stored job %s was not written by this version (an older one pickled it); it is replaced, "
                        "not read", job_id)
            return None
        return utc_timestamp_to_datetime(row.next_run_time) if stored == fingerprint else None

    def get_next_run_time(self) -> datetime | None:
        """The earliest next run of the jobs this process added (another id's row, which it never runs or advances,
        would keep the scheduler waking up to an overdue time it cannot serve: a busy loop)."""
        if not self._templates:
            return None
        query = (select(self.jobs_t.c.next_run_time)
                 .where(self.jobs_t.c.next_run_time.is_not(None), self.jobs_t.c.id.in_(list(self._templates)))
                 .order_by(self.jobs_t.c.next_run_time).limit(1))
        with self.engine.begin() as connection:
            return utc_timestamp_to_datetime(connection.execute(query).scalar())

    def lookup_job(self, job_id: str) -> Job | None:
        query = select(self.jobs_t.c.id, self.jobs_t.c.next_run_time).where(self.jobs_t.c.id == job_id)
        with self.engine.begin() as connection:
            row = connection.execute(query).first()
        return None if row is None else self._job(row.id, row.next_run_time)

    def _get_jobs(self, *conditions: Any) -> list[Job]:
        query = select(self.jobs_t.c.id, self.jobs_t.c.next_run_time).order_by(self.jobs_t.c.next_run_time)
        if conditions:
            query = query.where(and_(*conditions))
        with self.engine.begin() as connection:
            rows = connection.execute(query).all()
        return [job for row in rows if (job := self._job(row.id, row.next_run_time)) is not None]

    def _job(self, job_id: str, next_run_time: float | None) -> Job | None:
        """The job this process added under ``job_id``, due at the row's ``next_run_time``; None for another id."""
        template = self._templates.get(job_id)
        if template is None:
            return None
        job = Job.__new__(Job)
        job.__setstate__({**template, "next_run_time": utc_timestamp_to_datetime(next_run_time)})
        job._scheduler = self._scheduler
        job._jobstore_alias = self._alias
        return job


_running = threading.local()


def current_firing() -> datetime | None:
    """The scheduled time the job running on this thread is for (the latest one, when missed runs coalesce); None
    outside a scheduled job. Two schedulers on one database both fire it: the retrain runs one of them."""
    return getattr(_running, "firing", None)


class _FiringExecutor(ThreadPoolExecutor):
    """APScheduler's thread pool executor, telling each job which scheduled time it runs for (``current_firing``)."""

    def _do_submit_job(self, job: Job, run_times: list[datetime]) -> None:
        def run(*args: Any) -> Any:
            _running.firing = max(run_times)
            try:
                return run_job(*args)
            finally:
                _running.firing = None

        def callback(future: Future[Any]) -> None:
            exc = future.exception()
            if exc is not None:
                self._run_job_error(job.id, exc, exc.__traceback__)
            else:
                self._run_job_success(job.id, future.result())

        self._pool.submit(run, job, job._jobstore_alias, run_times, self._logger.name).add_done_callback(callback)


def build_scheduler(config: Config, config_path: Path, *, engine: Engine, trigger: BaseTrigger | None = None,
                    prune_trigger: BaseTrigger | None = None) -> BlockingScheduler:
    """A blocking scheduler whose SQL job store holds the retrain job (under ``JOB_ID``, when ``retrain.enabled``)
    and the retention job (under ``PRUNE_JOB_ID``, when ``retention.enabled``), each added or updated.

    ``trigger`` and ``prune_trigger`` replace the configured cron schedules (tests use short ones). ``engine`` is the
    database the job store lives in (the caller disposes of it). The stored job of a part that is disabled is
    removed; ConfigError when both are.
    """
    rc, keep = config.retrain, config.retention
    store = ConfiguredJobStore(engine=engine, tablename=JOBS_TABLE)
    for enabled, job_id in ((rc.enabled, JOB_ID), (keep.enabled, PRUNE_JOB_ID)):
        if not enabled:
            with contextlib.suppress(JobLookupError):
                store.remove_job(job_id)
    if not rc.enabled and not keep.enabled:
        raise ConfigError("retrain.enabled and retention.enabled are both false: nothing to schedule (the stored "
                          "jobs, if any, were removed)")
    scheduler = BlockingScheduler(jobstores={"default": store}, executors={"default": _FiringExecutor(1)},
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


def _add_job(scheduler: BlockingScheduler, store: ConfiguredJobStore, job_id: str, func: str, trigger: BaseTrigger,
             args: list[str], *, name: str, coalesce: bool, misfire_grace_time: int | None) -> None:
    kept = store.stored_next_run(job_id, store.fingerprint(func, args, trigger))
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
    """The scheduled job: retrain every group in a child process (``pipeline.retrain_job``, which reloads the
    configuration and logs and records each outcome) and wait for it. The child is in a session of its own, so a
    Ctrl-C meant for the scheduler does not cut a retrain short: the scheduler's shutdown waits for it."""
    command = [sys.executable, "-m", "pipeline.retrain_job", config_path, "--log-format", logs.configured_format()]
    firing = current_firing()
    if firing is not None:
        command += ["--firing", firing.isoformat()]
    if logging.getLogger().isEnabledFor(logging.DEBUG):
        command.append("--verbose")
    done = subprocess.run(command, start_new_session=True, check=False)
    problem = child_problem(done.returncode)
    if problem:
        log.error("scheduled retrain: %s", problem)


def child_problem(returncode: int) -> str | None:
    """What the retrain process's exit status says went wrong (None: every run promoted, rejected or skipped; a
    failed or refused run was logged by the child)."""
    if returncode in (0, 1, 3):
        return None
    if returncode < 0:
        name = signal.Signals(-returncode).name if -returncode in signal.valid_signals() else str(-returncode)
        why = " (out of memory?)" if returncode == -signal.SIGKILL else ""
        return (f"the retrain process was killed by {name}{why}; the scheduler goes on, and the next retrain of each "
                "group records an unfinished run as abandoned once its lock has expired")
    return f"the retrain process exited with status {returncode}"


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
