"""Deleting history older than the configuration's ``retention`` (``sensorwatch db prune``; ``sensorwatch scheduler``
runs it nightly).

Window scores and skipped windows go asset by asset, through the (asset, window_end) indexes, in batches of
``retention.batch_rows`` with one short transaction each, so pipelines writing at the same time wait at most for one
batch. Each asset keeps what a restarted pipeline rebuilds its state from (``PrunePlan``): its latest
``keep_latest`` windows (the alert engine's restore, the drift offsets of the latest one) and the windows within
``keep_span`` of its latest one (the aftermath rule's look-back), however old, so an asset that has been silent for
longer than the retention comes back with its state. Resolved alerts go by their closing time; open alerts never.
A prune that stops half way (a crash, a database error) has deleted only whole batches and can simply run again.

Model bundles (``retention.model_bundles``): per group, all but the N retired versions active most recently, all but
the newest N rejected or failed candidates and all but the newest N undecided ones (a day old: a retrain in progress
is younger) lose their bundle directory (``prune_bundles``); the registry row stays, marked, as the version's
history. A bundle is deleted only when its ``metadata.json`` names that version, only its own files go, and the row is
marked (committed) before the files go, so a version being activated at the same moment keeps its bundle
(``repo.mark_bundle_deleted``).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from models.bundle import METADATA, WEIGHTS
from pipeline.alerting import AlertEngine
from pipeline.config import Config
from pipeline.registry import bundle_path
from pipeline.store import repo

log = logging.getLogger(__name__)

LEFTOVER_DAYS = 7  # rows marked this recently whose bundle files are still found: deleted again


@dataclass(frozen=True)
class PrunePlan:
    """What a prune deletes: scores and skipped windows ending before ``scores_before`` (each asset keeping its latest
    ``keep_latest`` windows and those within ``keep_span`` of its latest one), resolved alerts closed before
    ``alerts_before`` (None: none), ``batch_rows`` rows per transaction."""

    scores_before: datetime
    alerts_before: datetime | None
    keep_latest: int
    keep_span: timedelta
    batch_rows: int
    model_bundles: int | None = None

    @classmethod
    def of(cls, config: Config, now: datetime) -> PrunePlan:
        """The plan of ``config.retention`` at ``now`` (what the alert engine restores from, for the groups of
        ``config``)."""
        r = config.retention
        engine = AlertEngine(config.groups)
        look_back_ms = max((engine.aftermath_lookback_ms(g.name) or 0) for g in config.groups)
        return cls(scores_before=now - timedelta(days=r.scores_days),
                   alerts_before=None if r.alerts_days is None else now - timedelta(days=r.alerts_days),
                   keep_latest=engine.history_windows(), keep_span=timedelta(milliseconds=look_back_ms),
                   batch_rows=r.batch_rows, model_bundles=r.model_bundles)


@dataclass
class PruneResult:
    """Rows deleted (or, for a dry run, that would be) per table, over ``assets`` assets."""

    dry_run: bool
    scores: int = 0
    skipped: int = 0
    alerts: int = 0
    bundles: int = 0
    assets: int = 0
    seconds: float = 0.0
    per_asset: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        verb = "would delete" if self.dry_run else "deleted"
        return (f"{verb} {self.scores} window scores and {self.skipped} skipped windows of {self.assets} assets, "
                f"{self.alerts} resolved alerts, {self.bundles} model bundles, in {self.seconds:.1f} s")


def prune(sessions: sessionmaker[Session], plan: PrunePlan, *, assets: list[str], dry_run: bool = False,
          advance: Callable[[str], None] | None = None) -> PruneResult:
    """Delete what ``plan`` says of ``assets``' history, and the old resolved alerts (counted, not deleted, when
    ``dry_run``). ``advance`` is called after each asset (a progress bar). Database errors propagate; what was
    deleted before stays deleted."""
    started = time.monotonic()
    result = PruneResult(dry_run=dry_run, assets=len(assets))
    for asset in assets:
        with sessions() as session:
            bound = repo.scores_prune_bound(session=session, asset=asset, before=plan.scores_before,
                                            keep_latest=plan.keep_latest, keep_span=plan.keep_span)
        if bound is not None:
            gone = _in_batches(sessions, plan, dry_run, repo.delete_scores_before, asset=asset, before=bound)
            result.scores += gone
            if gone:
                result.per_asset[asset] = gone
        result.skipped += _in_batches(sessions, plan, dry_run, repo.delete_skipped_before, asset=asset,
                                      before=plan.scores_before)
        if advance is not None:
            advance(asset)
    if plan.alerts_before is not None:
        result.alerts = _in_batches(sessions, plan, dry_run, repo.delete_resolved_alerts_before,
                                    before=plan.alerts_before)
    result.seconds = time.monotonic() - started
    log.info("retention: %s (scores before %s, alerts before %s)", result.summary(), plan.scores_before.isoformat(),
             plan.alerts_before.isoformat() if plan.alerts_before else "never")
    return result


def _in_batches(sessions: sessionmaker[Session], plan: PrunePlan, dry_run: bool, delete: Callable[..., int],
                **where: object) -> int:
    """Call ``delete(session=..., limit=plan.batch_rows, dry_run=dry_run, **where)`` in a transaction of its own
    until it deletes fewer than a batch (once for a dry run, which counts everything); the total."""
    total = 0
    while True:
        with sessions.begin() as session:
            n = delete(session=session, limit=plan.batch_rows, dry_run=dry_run, **where)
        total += n
        if dry_run or n < plan.batch_rows:
            return total


def prune_assets(session: Session, config: Config) -> list[str]:
    """The assets a prune visits: every asset the pipeline has windowed, and every configured one."""
    return sorted(set(repo.history_assets(session=session)) | set(config.asset_groups()))


def prune_database(config: Config, plan: PrunePlan, *, dry_run: bool = False,
                   progress: Callable[[int], Callable[[str], None]] | None = None) -> PruneResult:
    """``prune`` on ``config``'s database, every asset of ``prune_assets``, then ``prune_bundles`` under
    ``config.model_dir`` (when ``plan.model_bundles`` is set): what ``sensorwatch db prune`` and the scheduler's job
    run. ``progress(total assets)`` returns the per-asset callback (a progress bar)."""
    from pipeline.store.db import make_engine, make_sessionmaker

    engine = make_engine(config.database.url)
    try:
        sessions = make_sessionmaker(engine)
        with sessions() as session:
            assets = prune_assets(session, config)
        result = prune(sessions, plan, assets=assets, dry_run=dry_run,
                       advance=progress(len(assets)) if progress is not None else None)
        if plan.model_bundles is not None:
            result.bundles = prune_bundles(sessions, config.model_dir, keep=plan.model_bundles, dry_run=dry_run)
        return result
    finally:
        engine.dispose()


def prune_bundles(sessions: sessionmaker[Session], model_dir: Path, *, keep: int, dry_run: bool = False,
                  now: datetime | None = None) -> int:
    """Delete the bundles ``repo.bundle_prune_candidates`` lists (``keep`` per group and kind), marking each row
    first; the number of bundles deleted (for a dry run, that would be). A bundle that is not found is left unmarked
    (a model volume not mounted must not lose its history); one whose metadata names another version is left alone,
    with a warning; one whose files cannot be deleted is unmarked again (it is whole, and may still be activated).
    The files of rows marked in the last ``LEFTOVER_DAYS`` are deleted again when found (a run that died between
    marking and deleting), and bundle staging directories left by a save that died (``.<version>.*``, a day old)
    go too. Database errors propagate; file errors are logged and tried again on the next run."""
    stamp = now or datetime.now(UTC)
    with sessions() as session:
        doomed = [(r.id, r.version, bundle_path(r, model_dir))
                  for r in repo.bundle_prune_candidates(session=session, keep=keep, now=stamp)]
        leftover = [] if dry_run else [
            (r.version, bundle_path(r, model_dir))
            for r in repo.bundle_deleted_versions(session=session, since=stamp - timedelta(days=LEFTOVER_DAYS))]
    deleted = 0
    for version_id, version, path in doomed:
        if not _bundle_of(path, version):
            continue
        if dry_run:
            deleted += 1
            continue
        with sessions.begin() as session:
            if not repo.mark_bundle_deleted(session=session, version_id=version_id, now=stamp):
                continue  # activated (or marked) meanwhile
        if _delete_bundle(path, version):
            deleted += 1
        elif _bundle_of(path, version, quiet=True) and (path / WEIGHTS).exists():
            with sessions.begin() as session:
                repo.unmark_bundle_deleted(session=session, version_id=version_id)
    for version, path in leftover:
        if _bundle_of(path, version, quiet=True):
            deleted += int(_delete_bundle(path, version))
    if not dry_run:
        _delete_stale_staging(Path(model_dir), stamp)
    if deleted:
        log.info("retention: %s %d model bundle(s) (keeping %d of each kind per group: retired, rejected, "
                 "undecided)", "would delete" if dry_run else "deleted", deleted, keep)
    return deleted


def _delete_stale_staging(model_dir: Path, now: datetime) -> None:
    """Remove the staging directories (``<group>/.<version>.*``, holding only bundle files) that a save which died
    left behind, once a day old (a save in progress is never that old)."""
    cutoff = (now - timedelta(days=1)).timestamp()
    for staging in model_dir.glob("*/.*.*"):
        try:
            if not staging.is_dir() or staging.stat().st_mtime > cutoff:
                continue
            if any(item.name not in (WEIGHTS, METADATA) for item in staging.iterdir()):
                continue
            for name in (WEIGHTS, METADATA):
                (staging / name).unlink(missing_ok=True)
            staging.rmdir()
            log.info("retention: deleted %s, left by a bundle save that did not finish", staging)
        except OSError as exc:
            log.warning("retention: could not delete %s: %s", staging, exc)


def _bundle_of(path: Path, version: str, *, quiet: bool = False) -> bool:
    """Whether ``path`` holds the bundle of ``version`` (its metadata says so)."""
    try:
        named = json.loads((path / METADATA).read_text(encoding="utf-8")).get("version")
    except FileNotFoundError:
        if path.exists() and not quiet:
            log.warning("retention: %s has no %s: not deleted as model %s's bundle", path, METADATA, version)
        return False
    except (OSError, ValueError, AttributeError) as exc:
        log.warning("retention: %s: cannot read its %s (%s): not deleted", path, METADATA, exc)
        return False
    if named != version:
        log.warning("retention: %s holds model %r, not %s: not deleted", path, named, version)
        return False
    return True


def _delete_bundle(path: Path, version: str) -> bool:
    """Remove a bundle's own files and then its directory when nothing else is left in it; False on an error."""
    try:
        for name in (WEIGHTS, METADATA):  # metadata last: a half-deleted bundle is still recognised next time
            (path / name).unlink(missing_ok=True)
        if not any(path.iterdir()):
            path.rmdir()
        else:
            log.warning("retention: model %s's bundle files deleted; %s holds other files and stays", version, path)
    except OSError as exc:
        log.warning("retention: could not delete model %s's bundle at %s (tried again next time): %s", version, path,
                    exc)
        return False
    return True
