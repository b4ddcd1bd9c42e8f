"""The operator's loop on ELPV (issue 19): a model fitted on a narrow start learns on the line.

For each object (mono, poly): fit on the first ``--start-fraction`` of the training goods (file order),
calibrate at ``--rate`` false alarms on the next ``--calibration-images`` training goods (held out), then
stream the remaining training goods as line images, one by one: each image the model flags (score above the
threshold) is a false alarm, and gets "good" feedback, ``partial_fit`` of that image (the default rule: until
its patches lie within the covering radius recorded at fit). The threshold is not recomputed during the
stream (a bank that only grows can only lower good scores: its bound still holds).

Reports false alarms per 100 line images over time, update latency (p50 / p95, extraction included), the
bank size, and on the test split the image AUROC and the false-alarm rate on test goods of: the streamed
model (with the start threshold, and re-calibrated on the same held-out goods), the start model with no
updates, and a full ``fit`` on every good image the stream saw (start + stream), calibrated the same way.
Prints a table and writes everything as JSON into benchmarks/results/.

    PYTHONPATH=src .venv/bin/python benchmarks/bench_line.py                  # mono and poly, 224 px
    PYTHONPATH=src .venv/bin/python benchmarks/bench_line.py --objects mono --imagesize 64 \\
        --stream-limit 20 --test-limit 40 --calibration-images 20 --rate 0.05   # a quick check that it runs
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import elpv_model_settings

from patchcore import PatchCore
from patchcore import __version__ as patchcore_version
from patchcore.data import load_elpv
from patchcore.deploy.calibration import calibrate, refresh_calibration
from patchcore.deploy.inference import Predictor
from patchcore.engine.model import UpdateRefused
from patchcore.evaluation.metrics import image_auroc
from patchcore.fileio import atomic_write_json

ROOT = Path(__file__).resolve().parent
MODEL = elpv_model_settings()  # configs/elpv.yaml's model section


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="ELPV: fit on a narrow start, stream the other goods with feedback on false alarms.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--objects", nargs="+", choices=("mono", "poly"), default=["mono", "poly"])
    parser.add_argument("--imagesize", type=int, default=224, help="centre crop; resize = imagesize * 256 / 224")
    parser.add_argument("--start-fraction", type=float, default=0.1, help="training goods the start model sees")
    parser.add_argument("--calibration-images", type=int, default=100, help="held-out goods after the start")
    parser.add_argument("--rate", type=float, default=0.01, help="false-alarm rate the threshold is set at")
    parser.add_argument("--stream-limit", type=int, default=None, metavar="N", help="first N stream images")
    parser.add_argument("--test-limit", type=int, default=None, metavar="N", help="N test images (spread)")
    parser.add_argument(
        "--latency-probe", type=int, default=20, metavar="N",
        help="also time one-image updates of the start model on N stream images (the stream may raise few)",
    )  # fmt: skip
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "results", help="folder for the JSON")
    args = parser.parse_args(argv)
    if not 0 < args.start_fraction < 1:
        parser.error(f"--start-fraction must be in (0, 1), got {args.start_fraction}")
    if not 0 < args.rate < 1:
        parser.error(f"--rate must be in (0, 1), got {args.rate}")
    if args.calibration_images < 1:
        parser.error("--calibration-images must be >= 1")
    return args


def _model(args: argparse.Namespace) -> PatchCore:
    resize = round(args.imagesize * 256 / 224)
    settings = {**MODEL, "resize": resize, "imagesize": args.imagesize, "device": args.device, "seed": args.seed}
    return PatchCore(**settings)


def _percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def _test_figures(model: PatchCore, test: list[Any], labels: np.ndarray, threshold: float) -> dict[str, Any]:
    scores = model.score([str(s.image_path) for s in test])
    good = labels == 0
    return {
        "image_auroc": round(100 * float(image_auroc(labels, scores)), 2),
        "false_alarm_rate_test_goods": round(float(np.mean(scores[good] > threshold)), 4),
        "detection_rate_test_defects": round(float(np.mean(scores[~good] > threshold)), 4),
        "threshold": threshold,
    }


def run_object(obj: Any, args: argparse.Namespace) -> dict[str, Any]:
    goods = [str(s.image_path) for s in obj.train]
    n_start = max(1, int(len(goods) * args.start_fraction))
    start, held = goods[:n_start], goods[n_start : n_start + args.calibration_images]
    stream = goods[n_start + len(held) :][: args.stream_limit]
    test = obj.test
    if args.test_limit is not None and args.test_limit < len(test):
        test = [test[int(i)] for i in np.linspace(0, len(test) - 1, args.test_limit)]
    labels = np.asarray([int(s.is_anomalous) for s in test])
    print(f"{obj.name}: start {len(start)}, calibration {len(held)}, stream {len(stream)}, test {len(test)}",
          file=sys.stderr, flush=True)  # fmt: skip

    t0 = time.perf_counter()
    model = _model(args).fit(start)
    fit_start_seconds = time.perf_counter() - t0
    model.calibration_ = calibrate(Predictor(model), held, args.rate, source="held-out goods")
    threshold = model.calibration_.image_threshold
    start_bank = len(model.memory_bank_)
    start_model = PatchCore.from_state_dict(model.state_dict(), device=args.device)

    flagged: list[int] = []
    latencies: list[float] = []
    rows_added: list[int] = []
    bank_sizes: list[int] = []
    refused: list[str] = []
    t_stream = time.perf_counter()
    for i, path in enumerate(stream):
        score = float(model.score([path])[0])
        alarm = score > threshold
        flagged.append(int(alarm))
        if alarm:
            t1 = time.perf_counter()
            try:
                record = model.partial_fit([path], note=f"line image {i}: false alarm, score {score:.4g}")
            except UpdateRefused as exc:  # the guard: a good image scoring above 2x the highest good score
                refused.append(f"{path}: {exc}")
            else:
                latencies.append(time.perf_counter() - t1)
                rows_added.append(record.rows_added)
        bank_sizes.append(len(model.memory_bank_))
        if (i + 1) % 50 == 0:
            print(f"  {obj.name}: {i + 1}/{len(stream)} line images, {sum(flagged)} false alarms, "
                  f"bank {len(model.memory_bank_)}", file=sys.stderr, flush=True)  # fmt: skip
    stream_seconds = time.perf_counter() - t_stream

    # Latency of one-image updates, whatever the stream raised: each of N stream images taught to a copy
    # of the start model (extraction, scoring, the coreset's continuation and the index's growth).
    probe: list[float] = []
    probe_rows: list[int] = []
    for path in stream[: args.latency_probe]:
        copy = PatchCore.from_state_dict(start_model.state_dict(), device=args.device)
        copy.score([path])  # builds the extractor and the index first, as a running station has them
        t1 = time.perf_counter()
        probe_rows.append(copy.partial_fit([path], force=True).rows_added)
        probe.append(time.perf_counter() - t1)
    per_100 = [int(sum(flagged[k : k + 100])) for k in range(0, len(flagged), 100)]
    per_100_sizes = [len(flagged[k : k + 100]) for k in range(0, len(flagged), 100)]

    streamed = _test_figures(model, test, labels, threshold)
    recalibrated, note = refresh_calibration(Predictor(model))
    assert recalibrated is not None
    streamed_recalibrated = _test_figures(model, test, labels, recalibrated.image_threshold)
    no_updates = _test_figures(start_model, test, labels, threshold)

    t0 = time.perf_counter()
    refit = _model(args).fit(start + stream)
    refit_seconds = time.perf_counter() - t0
    refit.calibration_ = calibrate(Predictor(refit), held, args.rate, source="held-out goods")
    full_refit = _test_figures(refit, test, labels, refit.calibration_.image_threshold)
    return {
        "object": obj.name,
        "images": {"start": len(start), "calibration": len(held), "stream": len(stream), "test": len(test)},
        "fit_start_seconds": round(fit_start_seconds, 2),
        "threshold_start": threshold,
        "stream": {
            "false_alarms": int(sum(flagged)),
            "false_alarms_per_100": per_100,
            "block_sizes": per_100_sizes,
            "updates": len(latencies),
            "refused_by_guard": refused,
            "update_latency_p50_s": _percentile(latencies, 50),
            "update_latency_p95_s": _percentile(latencies, 95),
            "update_latency_max_s": max(latencies) if latencies else None,
            "rows_added": int(sum(rows_added)),
            "rows_added_per_update_p50": _percentile(rows_added, 50),
            "bank_start": start_bank,
            "bank_end": len(model.memory_bank_),
            "bank_every_50": bank_sizes[49::50],
            "seconds": round(stream_seconds, 1),
        },
        "latency_probe": {
            "updates": len(probe),
            "p50_s": _percentile(probe, 50),
            "p95_s": _percentile(probe, 95),
            "max_s": max(probe) if probe else None,
            "rows_added_p50": _percentile(probe_rows, 50),
        },
        "recalibration": note,
        "test": {
            "streamed_start_threshold": streamed,
            "streamed_recalibrated": streamed_recalibrated,
            "no_updates": no_updates,
            "full_refit": {**full_refit, "bank": len(refit.memory_bank_), "fit_seconds": round(refit_seconds, 1)},
        },
        "bank_vs_refit": round(len(model.memory_bank_) / len(refit.memory_bank_), 3),
        "auroc_gap_vs_refit_points": round(streamed["image_auroc"] - full_refit["image_auroc"], 2),
    }


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| object | line images | false alarms per 100 (blocks) | updates | latency p50 / p95 (s), probe p50 / p95 "
        "| bank start "
        "-> end (refit) | AUROC streamed / no updates / refit | false-alarm rate test goods streamed / no "
        "updates / refit |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        s, t = r["stream"], r["test"]
        p50 = "n/a" if s["update_latency_p50_s"] is None else f"{s['update_latency_p50_s']:.3f}"
        p95 = "n/a" if s["update_latency_p95_s"] is None else f"{s['update_latency_p95_s']:.3f}"
        lp = r["latency_probe"]
        probe = "n/a" if lp["p50_s"] is None else f"{lp['p50_s']:.3f} / {lp['p95_s']:.3f} (n={lp['updates']})"
        lines.append(
            f"| {r['object']} | {r['images']['stream']} | {' '.join(map(str, s['false_alarms_per_100']))} "
            f"| {s['updates']} | {p50} / {p95}, {probe} | {s['bank_start']} -> {s['bank_end']} "
            f"({t['full_refit']['bank']}) | {t['streamed_start_threshold']['image_auroc']} / "
            f"{t['no_updates']['image_auroc']} / {t['full_refit']['image_auroc']} | "
            f"{t['streamed_start_threshold']['false_alarm_rate_test_goods']} / "
            f"{t['no_updates']['false_alarm_rate_test_goods']} / {t['full_refit']['false_alarm_rate_test_goods']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    began = time.perf_counter()
    machine = {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    objects = {o.name: o for o in load_elpv(objects=args.objects)}
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H%M")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"line_{'_'.join(args.objects)}_{stamp}.json"
    results: list[dict[str, Any]] = []
    for name in args.objects:
        results.append(run_object(objects[name], args))
        machine["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
        atomic_write_json(path, _document(args, argv, machine, results, began))  # each object as it ends
    out = _document(args, argv, machine, results, began)
    text = table(results)
    print(text)
    print(f"load average at start {machine['load_average_at_start']}, at end {machine['load_average_at_end']}")
    atomic_write_json(path, {**out, "table": text})
    print(path)
    return 0


def _document(
    args: argparse.Namespace, argv: list[str] | None, machine: dict[str, Any], results: list[dict[str, Any]],
    began: float,
) -> dict[str, Any]:
    return {
        "benchmark": "bench_line",
        "patchcore": patchcore_version,
        "command": " ".join(["benchmarks/bench_line.py", *(argv if argv is not None else sys.argv[1:])]),
        "settings": {**MODEL, "imagesize": args.imagesize, "start_fraction": args.start_fraction,
                     "calibration_images": args.calibration_images, "rate": args.rate, "device": args.device},
        "machine": machine,
        "results": results,
        "total_seconds": round(time.perf_counter() - began, 1),
        "table": table(results),
    }  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
