"""The scheduler's retrain job, run in a process of its own: ``python -m pipeline.retrain_job CONFIG [--firing ISO]``.

The scheduler starts one per firing and waits for it (``scheduler.scheduled_retrain``). Training's memory (PyTorch,
the recent windows) goes back to the system when the process ends, instead of staying with the long-lived scheduler,
and a retrain that crashes or is killed (out of memory) leaves the scheduler running: its run is recorded as
abandoned by the next retrain of the group, once its lock has expired. Exit status 0 when every run was promoted,
rejected or skipped, 1 when one failed or could not start, 3 when one was refused (another retrain held the group).
SIGTERM does not cut a run short (the scheduler's stop waits for it); SIGKILL does.
"""

from __future__ import annotations

import argparse
import logging
import signal
from datetime import datetime
from types import FrameType

from rich.console import Console
from sqlalchemy.exc import SQLAlchemyError

from pipeline import logs
from pipeline.config import load_config
from pipeline.errors import ConfigError, TransientError
from pipeline.store.db import describe_error

log = logging.getLogger("pipeline.scheduler")


def _finish_first(signum: int, _frame: FrameType | None) -> None:
    """SIGTERM: go on. A service manager that signals every process of the service (systemd's default
    KillMode=control-group) reaches this one too; the scheduler's stop waits for the run, which would otherwise
    die unrecorded with its group's lock held for ``retrain.lock_ttl_s``. SIGKILL still ends it."""
    log.warning("%s: the retrain finishes first (the scheduler's stop waits for it; SIGKILL ends it now)",
                signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    """Retrain every configured group for the scheduled time ``--firing``; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.retrain_job", description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="the configuration file (read again on every run)")
    parser.add_argument("--firing", type=datetime.fromisoformat, default=None,
                        help="the scheduled time (ISO 8601) the run is for")
    parser.add_argument("--log-format", default="auto", choices=logs.FORMATS)
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logs.configure(args.log_format, verbose=args.verbose, console=Console(stderr=True))
    signal.signal(signal.SIGTERM, _finish_first)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        log.error("scheduled retrain not started: configuration %s: %s", args.config, exc)
        return 1
    from pipeline.retrain import retrain_all

    try:
        results = retrain_all(config, trigger="schedule", firing=args.firing)
    except (ConfigError, TransientError) as exc:
        log.error("scheduled retrain not started: %s", exc)
        return 1
    except (SQLAlchemyError, ImportError) as exc:  # the database went away, or its driver is not installed: the URL
        log.error("scheduled retrain failed: %s", describe_error(exc, config.database.url))  # masked, password scrubbed
        return 1
    except Exception:  # logged in the configured format (a bare traceback on stderr would not be), status 1
        log.exception("scheduled retrain failed")
        return 1
    for result in results:
        log.info("scheduled retrain %s", result.summary())
    outcomes = {r.outcome for r in results}
    return 1 if "failed" in outcomes else 3 if "refused" in outcomes else 0


if __name__ == "__main__":
    raise SystemExit(main())
