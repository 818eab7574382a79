"""Two pre-registered variants of the SKAB detector, each designed before it was scored, and scored once.

A. Seed ensemble (variance reduction): K = 5 networks (seeds 0..4) trained on the same windows; their per-sensor
   reconstruction errors are averaged before the per-sensor normaliser and the threshold are fitted. Everything else
   is the shipped ``default_settings``. No tuning.
B. CUSUM decision (detects persistent shifts sooner at an equal false-alarm rate): on r_t = score / threshold (the
   shipped threshold, multiplier 3), S_t = 0 on rows the aftermath rule suppresses (r_t < a x peak_t), else
   S_t = min(max(0, S_{t-1} + r_t - k), h + D); a row is flagged when S_t > h. The baseline freezes on flagged rows
   as shipped. (k, h, D, aftermath a, baseline span) come from the label-free rule of ``skab_label_free.py``
   (its synthetic files and ``choose``, unchanged) over a 540-setting grid per model, run in lockstep: one model per
   normal segment, every (file, setting) stream advanced together so one forward pass per chunk serves them all.

    python benchmarks/skab_variants.py grid --model dense [--check]   # B's synthetic grid and pick
    python benchmarks/skab_variants.py look --variant ensemble|cusum [--models dense,lstm,conv]   # the SKAB looks

Results (picks and every SKAB look) go to benchmarks/skab_variants.json; see benchmarks/README.md. Both ran before
variant C (``skab_recent_rows.py``) and score the whole window (``score_steps=None``), as they did then.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import track
from skab_label_free import KINDS, choose, normal_segments, synthetic_files

from models.autoencoders import Autoencoder, build_model
from models.drift import causal_rolling_mean
from models.sequence_detector import SequenceDetector, SequenceSettings, default_settings
from models.training import fit, reconstruction_errors, seed_everything
from pipeline.skab import TRAIN_ROWS, Confusion, confusion, evaluate_files, load_skab

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "skab_variants.json"
K = (0.5, 0.75, 1.0, 1.5)
H = (0, 2, 5, 10, 20)
CAP = (1, 5, 20)
AFTERMATH = (0.2, 0.3, 0.5)
SPANS = (75, 150, 300)


class EnsembleSequenceDetector(SequenceDetector):
    """Variant A: ``members`` networks (seeds ``settings.seed + i``) whose per-sensor errors are averaged."""

    def __init__(self, settings: SequenceSettings, members: int = 5) -> None:
        super().__init__(settings)
        self.members = members
        self.networks: list[Autoencoder] = []

    def _fit_networks(self, windows: np.ndarray, *, progress: bool) -> None:
        s = self.settings
        self.networks = []
        for i in range(self.members):
            seed_everything(s.seed + i)
            network = build_model(s.model_type, s.window, windows.shape[2], s.hyperparameters)
            fit(network, windows, epochs=s.epochs, batch_size=s.batch_size, learning_rate=s.learning_rate,
                validation_fraction=s.validation_fraction, patience=s.patience, seed=s.seed + i, progress=progress,
                description=f"training {s.model_type} member {i}")
            self.networks.append(network)
        self.model = self.networks[0]

    def _errors(self, windows: np.ndarray) -> np.ndarray:
        steps = self.settings.score_steps
        return np.mean([reconstruction_errors(n, windows, last_steps=steps)[1] for n in self.networks], axis=0)


@dataclass(frozen=True)
class Cusum:
    """Variant B's decision constants: reference ``k``, decision interval ``h``, cap excess ``cap`` (S <= h + cap)."""

    k: float = 1.0
    h: float = 0.0
    cap: float = 5.0


class CusumSequenceDetector(SequenceDetector):
    """Variant B: the capped CUSUM decision, with the aftermath rule as veto and reset."""

    def __init__(self, settings: SequenceSettings, cusum: Cusum) -> None:
        super().__init__(settings)
        self.cusum = cusum

    def _decider(self) -> Any:
        s, c = self.settings, self.cusum
        decay = 0.5 ** (1.0 / s.aftermath_half_life) if s.aftermath_half_life else 1.0
        peak = total = 0.0

        def decide(ratio: float) -> bool:
            nonlocal peak, total
            peak = max(peak * decay, ratio)
            total = 0.0 if ratio < s.aftermath_relative * peak else min(max(0.0, total + ratio - c.k), c.h + c.cap)
            return total > c.h

        return decide


# -- B's label-free grid ---------------------------------------------------------------------------------------------
def grid() -> list[dict[str, Any]]:
    """The 540 CUSUM settings, then one reference row: the shipped decision (aftermath 0.3, span 150)."""
    rows: list[dict[str, Any]] = [{"k": k, "h": h, "cap": c, "aftermath_relative": a, "baseline_span": s}
                                  for k, h, c, a, s in itertools.product(K, H, CAP, AFTERMATH, SPANS)]
    rows.append({"k": None, "h": None, "cap": None, "aftermath_relative": 0.3, "baseline_span": 150})
    return rows


def _errors_batched(model: Autoencoder, windows: np.ndarray, batch: int = 8192) -> np.ndarray:
    model.eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(windows), batch):
            x = torch.from_numpy(np.ascontiguousarray(windows[i : i + batch], dtype=np.float32))
            out.append((model(x) - x).pow(2).mean(dim=1).numpy())
    return np.concatenate(out).astype(np.float64)


def stream_all(det: SequenceDetector, values: list[np.ndarray], settings: list[dict[str, Any]]) -> np.ndarray:
    """Flags ``[files, settings, T]`` of every (file, setting) stream of ``det``'s fitted network, in lockstep.

    The same computation as ``SequenceDetector._stream`` (chunks, baseline frozen on flagged rows) with the decision
    of each setting; ``grid --check`` compares it with the detectors themselves.
    """
    s = det.settings
    if s.score_steps is not None:
        raise ValueError("the lockstep grid scores the whole window, as this study ran (score_steps=None)")
    assert det.scaler is not None and det.model is not None and det.sensor_scale is not None
    nf, ns = len(values), len(settings)
    length, n_sensors = values[0].shape
    smoothed = np.stack([causal_rolling_mean(v, s.smooth) for v in values])
    file_of = np.repeat(np.arange(nf), ns)
    n = nf * ns

    def column(key: str) -> np.ndarray:
        return np.tile([np.nan if c[key] is None else c[key] for c in settings], nf)

    k, h, cap = column("k"), column("h"), column("cap")
    shipped = np.isnan(k)
    a = np.tile([c["aftermath_relative"] for c in settings], nf)
    w = np.tile([1.0 / c["baseline_span"] for c in settings], nf)
    mean, std = det.scaler.mean, det.scaler.std
    baseline = np.tile(mean, (n, 1))
    peak, total = np.zeros(n), np.zeros(n)
    flags = np.zeros((n, length), dtype=bool)
    for begin in range(s.smooth - 1 + s.window - 1, length, s.chunk):
        stop = min(begin + s.chunk, length)
        c = stop - begin
        segment = smoothed[file_of, begin - s.window + 1 : stop]
        shifted = (segment - (baseline - mean)[:, None, :] - mean) / std
        windows = np.lib.stride_tricks.sliding_window_view(shifted, s.window, axis=1)
        windows = windows.transpose(0, 1, 3, 2).reshape(n * c, s.window, n_sensors)
        ratios = ((_errors_batched(det.model, windows) / det.sensor_scale).mean(axis=1) / det.threshold).reshape(n, c)
        for j in range(c):
            t, r = begin + j, ratios[:, j]
            peak = np.maximum(peak, r)
            suppressed = r < a * peak
            total = np.where(suppressed, 0.0, np.minimum(np.maximum(0.0, total + r - k), h + cap))
            flagged = np.where(shipped, (r > 1.0) & ~suppressed, total > h)
            flags[:, t] = flagged
            follow = ~flagged
            baseline[follow] += w[follow, None] * (smoothed[file_of[follow], t] - baseline[follow])
    return flags.reshape(nf, ns, length)


def _detector_for(base: SequenceSettings, setting: dict[str, Any]) -> SequenceDetector:
    settings = replace(base, aftermath_relative=setting["aftermath_relative"], baseline_span=setting["baseline_span"])
    if setting["k"] is None:
        return SequenceDetector(settings)
    return CusumSequenceDetector(settings, Cusum(setting["k"], setting["h"], setting["cap"]))


def run_grid(data: Path, model: str, *, seeds: int, check: bool) -> dict[str, Any] | None:
    """B's synthetic grid for ``model`` and its pick (None with ``check``: only compare lockstep with detectors)."""
    skab = load_skab(data)
    segments = normal_segments(data, skab[0].sensors)
    files = synthetic_files(segments, seeds)
    settings = grid()
    base = default_settings(model, score_steps=None)
    if check:
        det = SequenceDetector(base).fit(segments[3][:TRAIN_ROWS])
        chosen = [f for f in files if f.segment == 3]
        picks = [settings[-1], settings[0], settings[137], settings[300], settings[539]]
        flags = stream_all(det, [f.values for f in chosen], picks)
        for i, f in enumerate(chosen):
            for j, setting in enumerate(picks):
                reference = _detector_for(base, setting)
                reference.scaler, reference.model = det.scaler, det.model
                reference.sensor_scale, reference.threshold = det.sensor_scale, det.threshold
                if not np.array_equal(reference.flags(f.values), flags[i, j]):
                    raise AssertionError(f"lockstep flags differ from the detector's: {f.kind} {setting}")
        print(f"lockstep flags equal the detectors' on {len(chosen)} files x {len(picks)} settings")
        return None
    started = time.perf_counter()
    totals = [Confusion() for _ in settings]
    per_kind = [dict.fromkeys(KINDS, Confusion()) for _ in settings]
    for index, segment in enumerate(track(segments, description=f"grid {model}")):
        det = SequenceDetector(base).fit(segment[:TRAIN_ROWS])
        chosen = [f for f in files if f.segment == index]
        flags = stream_all(det, [f.values for f in chosen], settings)
        for i, f in enumerate(chosen):
            for j in range(len(settings)):
                cm = confusion(flags[i, j, TRAIN_ROWS:], f.labels[TRAIN_ROWS:])
                totals[j] = totals[j] + cm
                per_kind[j][f.kind] = per_kind[j][f.kind] + cm
    rows = [{**c, "multiplier": base.multiplier, **totals[j].to_dict(),
             "per_kind": {kind: v.to_dict() for kind, v in per_kind[j].items()}} for j, c in enumerate(settings)]
    pick = choose(rows[:-1])
    return {"model": model, "synthetic_files": len(files), "seconds": round(time.perf_counter() - started, 1),
            "pick": {k: v for k, v in pick.items() if k != "per_kind"},
            "shipped_decision": {k: v for k, v in rows[-1].items() if k != "per_kind"},
            "within_0.005_of_pick": sum(r["f1"] >= pick["f1"] - 0.005 and r["far"] <= 0.10 for r in rows[:-1])}


def run_look(data: Path, variant: str, model: str, pick: dict[str, Any] | None) -> dict[str, Any]:
    """One SKAB evaluation of ``variant`` for ``model`` (B: with its grid ``pick``)."""
    files = load_skab(data)
    if variant == "ensemble":
        settings = default_settings(model, score_steps=None)
        extra: dict[str, Any] = {"members": 5}
        result = evaluate_files(files, lambda: EnsembleSequenceDetector(settings, members=5), model=model,
                                settings={**settings.describe(), **extra}, progress=True)
    else:
        if pick is None:
            raise ValueError(f"no grid pick for {model}: run `grid --model {model}` first")
        settings = default_settings(model, score_steps=None, aftermath_relative=pick["aftermath_relative"],
                                    baseline_span=pick["baseline_span"])
        cusum = Cusum(pick["k"], pick["h"], pick["cap"])
        extra = {"cusum": cusum.__dict__}
        result = evaluate_files(files, lambda: CusumSequenceDetector(settings, cusum), model=model,
                                settings={**settings.describe(), **extra}, progress=True)
    doc = result.to_dict()
    return {"variant": variant, "model": model, "f1": doc["f1"], "far": doc["far"], "mar": doc["mar"],
            "train_seconds": doc["train_seconds"], **extra}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=HERE.parent.parent / "shared" / "datasets" / "skab")
    commands = parser.add_subparsers(dest="command", required=True)
    g = commands.add_parser("grid", help="variant B's label-free grid for one model")
    g.add_argument("--model", default="dense")
    g.add_argument("--seeds", type=int, default=2, help="injections per segment and kind (skab_label_free's 2)")
    g.add_argument("--check", action="store_true", help="only check the lockstep flags against the detectors")
    look = commands.add_parser("look", help="score a variant on SKAB (once per model)")
    look.add_argument("--variant", choices=("ensemble", "cusum"), required=True)
    look.add_argument("--models", default="dense,lstm,conv")
    args = parser.parse_args()
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"picks": {}, "looks": []}
    if args.command == "grid":
        outcome = run_grid(args.data, args.model, seeds=args.seeds, check=args.check)
        if outcome is None:
            return
        results["picks"][args.model] = outcome
        print(f"pick {outcome['pick']}")
    else:
        for model in args.models.split(","):
            row = run_look(args.data, args.variant, model, results["picks"].get(model, {}).get("pick"))
            results["looks"] = [r for r in results["looks"] if (r["variant"], r["model"]) != (args.variant, model)]
            results["looks"].append(row)
            print(f"{model} {args.variant}: F1 {row['f1']:.3f}, FAR {100 * row['far']:.2f}%, "
                  f"MAR {100 * row['mar']:.2f}%, training {row['train_seconds']:.1f} s")
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
