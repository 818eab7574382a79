"""The demo's detection figures at every hour of the simulated day, offline (no broker, no database).

``make demo`` streams the 12 simulated hours ending at the last UTC midnight, so its verdict is the same on every run.
The simulated pumps have a daily cycle, though, so that one verdict says little about the other 23 end hours. This
runs the demo's chain for each end hour: simulate a normal day, train the demo's model (``pipeline.demo``'s
config), simulate the 12 test hours with the demo's injected anomalies, cut windows, score them and feed the scores
to the alert engine, then score the alerts against the ground truth (event level, as the demo does).

    python benchmarks/demo_hours.py [--hours 12] [--assets 4] [--seed 11] [--aftermath off|0.3,21600]
                                    [--drift off|3600] [--score-steps whole|N] [--output demo_hours.json]

``--aftermath RELATIVE,HALF_LIFE_S`` sets the alert rule's aftermath (``alert.aftermath``; the demo's is 0.3,21600),
``--aftermath off`` runs the rule without it. ``--drift SPAN_S`` sets drift following (``drift.span_s``; the demo's
is 3600), ``--drift off`` runs without it. ``--score-steps N`` scores each window by its last N steps
(``model.score_steps``), ``--score-steps whole`` by all of them.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.progress import track
from rich.table import Table

from pipeline.alerting import AlertEngine
from pipeline.config import AftermathConfig, DriftConfig, GroupConfig
from pipeline.demo import PERIOD_S, demo_config
from pipeline.drift import DriftTracker, score_and_judge
from pipeline.evaluation import Span, score_events
from pipeline.history import windows_from_frame
from pipeline.simulate import simulate_fleet
from pipeline.train import train_group
from pipeline.types import datetime_to_ms


def _frame(frames: dict[str, pd.DataFrame]) -> pd.DataFrame:
    return pd.concat([f.assign(asset=a) for a, f in frames.items()]).reset_index()


def run_hour(end: datetime, *, hours: float, n_assets: int, seed: int, model_dir: Path,
             aftermath: AftermathConfig | str | None = "demo", drift: DriftConfig | str | None = "demo",
             score_steps: int | str | None = "demo") -> dict[str, object]:
    """The demo's chain for the test stretch ending at ``end``: event recall/precision and the false alerts.
    ``aftermath``: the alert rule's, ``drift``: the group's drift following, ``score_steps``: the model's (None:
    without / the whole window; "demo": the demo's)."""
    assets = [f"pump-{i + 1}" for i in range(n_assets)]
    cfg = demo_config(bootstrap="unused:9092", database_url="sqlite://", model_dir=model_dir, assets=assets,
                      run_id="hours")
    group = cfg.groups[0]
    if aftermath != "demo":
        group = group.model_copy(update={"alert": group.alert.model_copy(update={"aftermath": aftermath})})
    if drift != "demo":
        group = group.model_copy(update={"drift": drift})
    if score_steps != "demo":  # validated as the YAML would be (window.stride..window.length)
        raw = group.model_dump()
        raw["model"]["score_steps"] = score_steps
        group = GroupConfig.model_validate(raw)
    test_periods = int(hours * 3600 / PERIOD_S)
    train_periods = int(24 * 3600 / PERIOD_S)
    test_start = pd.Timestamp(end - timedelta(hours=hours))
    train_start = test_start - pd.Timedelta(seconds=train_periods * PERIOD_S)
    normal, _ = simulate_fleet(assets, train_start, train_periods, PERIOD_S, seed, anomalous_assets=[])
    trained = train_group(windows_from_frame(_frame(normal), group), group, progress=False)
    detector = trained.detector
    frames, truth = simulate_fleet(assets, test_start, test_periods, PERIOD_S, seed + 1,
                                   anomalous_assets=assets[:-1], anomalies_per_asset=2)
    _, events = score_and_judge(windows_from_frame(_frame(frames), group), {group.name: detector},
                                AlertEngine([group]), DriftTracker([group]))
    alerts: dict[tuple[str, int], Span] = {}  # the latest state of each incident
    for event in events:
        a = event.alert
        alerts[(a.asset, a.opened_ms)] = Span(a.asset, a.opened_ms, a.last_seen_ms)
    truth_spans = [Span(t.asset, datetime_to_ms(t.start.to_pydatetime()), datetime_to_ms(t.end.to_pydatetime()),
                        t.kind) for t in truth]
    result = score_events(truth_spans, list(alerts.values()))
    return {"end_hour_utc": end.hour, "anomalies": len(truth_spans), "caught": sum(h for _, h in result.caught),
            "alerts": len(alerts), "false_alerts": len(result.false_alerts), "recall": round(result.recall, 3),
            "precision": round(result.precision, 3), "threshold": round(detector.threshold, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hours", type=float, default=12.0, help="test hours per run (the demo's 12)")
    parser.add_argument("--assets", type=int, default=4, help="simulated pumps (the demo's 4)")
    parser.add_argument("--seed", type=int, default=11, help="simulation seed (the demo's 11)")
    parser.add_argument("--date", default="2026-01-01", help="UTC date whose 24 end hours are run")
    parser.add_argument("--aftermath", metavar="off|RELATIVE,HALF_LIFE_S",
                        help="the alert rule's aftermath: off, or e.g. 0.3,3600 (default: the demo's, 0.3,21600)")
    parser.add_argument("--drift", metavar="off|SPAN_S",
                        help="drift following: off, or drift.span_s (default: the demo's, 3600)")
    parser.add_argument("--score-steps", metavar="whole|N",
                        help="the model's score_steps: whole (the whole window), or N of its 30 steps "
                             "(default: the demo's)")
    parser.add_argument("--output", type=Path, help="write the rows as JSON here")
    args = parser.parse_args()
    aftermath: AftermathConfig | str | None = "demo"
    if args.aftermath == "off":
        aftermath = None
    elif args.aftermath:
        relative, half_life_s = (float(x) for x in args.aftermath.split(","))
        aftermath = AftermathConfig(relative=relative, half_life_s=half_life_s)
    drift: DriftConfig | str | None = "demo"
    if args.drift == "off":
        drift = None
    elif args.drift:
        drift = DriftConfig(span_s=float(args.drift))
    score_steps: int | str | None = "demo"
    if args.score_steps:
        score_steps = None if args.score_steps == "whole" else int(args.score_steps)
    day = datetime.fromisoformat(args.date).replace(tzinfo=UTC)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for hour in track(range(24), description="end hours"):
            rows.append(run_hour(day + timedelta(hours=hour), hours=args.hours, n_assets=args.assets,
                                 seed=args.seed, model_dir=Path(tmp), aftermath=aftermath,
                                 drift=drift, score_steps=score_steps))
    table = Table("end hour (UTC)", "caught", "alerts", "false", "recall", "precision", "threshold")
    for r in rows:
        table.add_row(f"{r['end_hour_utc']:02d}:00", f"{r['caught']}/{r['anomalies']}", str(r["alerts"]),
                      str(r["false_alerts"]), f"{r['recall']:.2f}", f"{r['precision']:.2f}", f"{r['threshold']:.4f}")
    caught = sum(int(r["caught"]) for r in rows)
    injected = sum(int(r["anomalies"]) for r in rows)
    raised = sum(int(r["alerts"]) for r in rows)
    false = sum(int(r["false_alerts"]) for r in rows)
    passing = sum(r["recall"] >= 0.8 and r["precision"] >= 0.8 for r in rows)
    console = Console()
    console.print(table)
    console.print(f"all hours: caught {caught}/{injected} ({caught / injected:.3f}), false alerts {false}/{raised} "
                  f"(precision {(raised - false) / max(raised, 1):.3f}); demo target met at {passing}/24 end hours")
    if args.output:
        args.output.write_text(json.dumps({"rows": rows, "caught": caught, "injected": injected, "alerts": raised,
                                           "false_alerts": false, "passing_hours": passing}, indent=2))


if __name__ == "__main__":
    main()
