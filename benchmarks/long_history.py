"""Long histories: time and peak memory of ``train``, ``backtest`` and ``replay`` on a CSV of weeks of a fleet, read
in pieces (the file in time order) and read whole (the same rows shuffled, which those commands sort in memory).

    python benchmarks/long_history.py [--assets 8] [--days 28] [--skip-replay]

Simulates the history with ``sensorwatch simulate`` (and a day of normal data to train the backtested model on), then
runs each command as its own process and reads its peak resident memory. ``replay`` goes to a local Kafka broker (or
KAFKA_BOOTSTRAP_SERVERS). Prints one JSON line with the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from _infra import kafka

# runs the CLI in this process and prints its peak resident memory (KB) as the last line on stderr
_PEAK = ("import resource, sys\nfrom pipeline.cli import app\nsys.argv = ['sensorwatch', *sys.argv[1:]]\n"
         "try:\n    app()\nexcept SystemExit as exc:\n    code = exc.code\nelse:\n    code = 0\n"
         "print(f'PEAK_KB={resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}', file=sys.stderr)\n"
         "sys.exit(code)\n")


def _run(*args: str) -> dict[str, Any]:
    """``sensorwatch ARGS`` in a process of its own: its wall time and peak memory (GB); fails loudly."""
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", _PEAK, *args], capture_output=True, text=True, check=False)
    seconds = time.monotonic() - started
    if done.returncode != 0:
        raise SystemExit(f"sensorwatch {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    peak_kb = int(done.stderr.rsplit("PEAK_KB=", 1)[1].split()[0])
    return {"seconds": round(seconds, 1), "peak_gb": round(peak_kb / 1024**2, 2), "stdout": done.stdout,
            "stderr": done.stderr}


def _figures(run: dict[str, Any]) -> dict[str, Any]:
    return {"seconds": run["seconds"], "peak_gb": run["peak_gb"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--assets", type=int, default=8)
    parser.add_argument("--days", type=float, default=28)
    parser.add_argument("--skip-replay", action="store_true", help="no broker: train and backtest only")
    args = parser.parse_args()
    assets = ",".join(f"pump-{i + 1}" for i in range(args.assets))
    with tempfile.TemporaryDirectory(prefix="sw-long-") as tmp:
        root = Path(tmp)
        for out, hours, anomalies, start in (("normal", 24, 0, "2026-02-01T00:00:00"),
                                             ("history", args.days * 24, max(1, round(args.days / 4)),
                                              "2026-03-01T00:00:00")):
            _run("simulate", "--out", str(root / out), "--assets", assets, "--hours", str(hours), "--anomalies",
                 str(anomalies), "--start", start, "--seed", "5")
        history = root / "history" / "readings.csv"
        shuffled = root / "shuffled.csv"
        frame = pd.read_csv(history)
        rows = len(frame)
        frame.sample(frac=1.0, random_state=1).to_csv(shuffled, index=False)
        del frame
        broker = kafka() if not args.skip_replay else contextlib.nullcontext(("localhost:9092", {}))
        with broker as (bootstrap, security):
            topic = f"long-history-{time.time_ns()}"
            config = root / "plant.yaml"
            raw = yaml.safe_load((Path(__file__).parent.parent / "config" / "example.yaml").read_text())
            raw["groups"][0]["assets"] = assets.split(",")
            raw["groups"][0]["model"]["epochs"] = 1
            raw.update({"database": {"url": f"sqlite:///{root / 'sw.db'}"}, "model_dir": str(root / "models"),
                        "kafka": {**raw["kafka"], "bootstrap_servers": bootstrap, "topic": topic,
                                  "security": security}})
            config.write_text(yaml.safe_dump(raw))
            c = ("--config", str(config))
            _run("db", "upgrade", *c)
            _run("train", *c, "--csv", str(root / "normal" / "readings.csv"))  # the model the backtests use
            out: dict[str, Any] = {"assets": args.assets, "days": args.days, "rows": rows,
                                   "csv_mb": round(history.stat().st_size / 1e6)}
            train = _run("train", *c, "--csv", str(history), "--no-activate")
            out["train_in_pieces"] = {**_figures(train), "thinned": "kept every" in train["stderr"]}
            for name, path in (("in_pieces", history), ("whole", shuffled)):
                run = _run("backtest", *c, "--csv", str(path), "--format", "json")
                doc = json.loads(run["stdout"])
                out[f"backtest_{name}"] = {**_figures(run), "windows": sum(a["windows"] for a in doc["assets"]),
                                           "alerts": len(doc["alerts"])}
            if not args.skip_replay:
                from pipeline import kafka_io
                from pipeline.config import load_config

                kafka_io.ensure_topics(load_config(config).kafka, [topic], partitions=4)
                for name, path in (("in_pieces", history), ("whole", shuffled)):
                    out[f"replay_{name}"] = _figures(_run("replay", *c, "--csv", str(path)))
        print(json.dumps(out))


if __name__ == "__main__":
    main()
