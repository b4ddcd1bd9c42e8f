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
updates, a ``fit`` from scratch on the goods the stream was taught (start + the taught images: the fair
"refit on the same goods"), and a full ``fit`` on every good image the stream saw (start + stream), each
calibrated the same way. ``--until radius 0.1 40`` runs one stream per update rule from the same start model
(per update: rows added, the new patches' largest distance to the bank before and after); ``--teach all``
teaches every line image (a diagnostic: the rule without the choice of images); ``--no-full-refit`` skips
the slowest step. Prints a table and writes everything as JSON into benchmarks/results/.

    PYTHONPATH=src .venv/bin/python benchmarks/bench_line.py                  # mono and poly, 224 px
    PYTHONPATH=src .venv/bin/python benchmarks/bench_line.py --objects mono --imagesize 64 \\
        --stream-limit 20 --test-limit 40 --calibration-images 20 --rate 0.05   # a quick check that it runs
    PYTHONPATH=src .venv/bin/python benchmarks/bench_line.py --objects poly --until radius 0.1 40  # the rules
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
from patchcore.engine.updates import UpdateRule
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
    parser.add_argument(
        "--until", nargs="+", type=_until, default=["radius"], metavar="RULE",
        help="partial_fit's rule, one stream each from the same start: radius, a fraction (0.1) or a count (40)",
    )  # fmt: skip
    parser.add_argument(
        "--teach", choices=("alarms", "all"), default="alarms",
        help="teach the false alarms (the operator's loop) or every line image (a diagnostic)",
    )  # fmt: skip
    parser.add_argument(
        "--no-full-refit", action="store_true",
        help="skip the full refit on every good seen (the slowest step; deterministic for a given seed)",
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


def _until(text: str) -> str | float | int:
    """``radius``, a fraction (a number with a point, in (0, 1]) or a row count (an integer >= 1)."""
    if text == "radius":
        return text
    try:
        value: float | int = float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not 'radius', a fraction or a count: {text!r}") from None
    try:
        UpdateRule.parse(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def _model(args: argparse.Namespace) -> PatchCore:
    resize = round(args.imagesize * 256 / 224)
    settings = {**MODEL, "resize": resize, "imagesize": args.imagesize, "device": args.device, "seed": args.seed}
    return PatchCore(**settings)


def _percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def _figures(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, Any]:
    good = labels == 0
    return {
        "image_auroc": round(100 * float(image_auroc(labels, scores)), 2),
        "false_alarm_rate_test_goods": round(float(np.mean(scores[good] > threshold)), 4),
        "detection_rate_test_defects": round(float(np.mean(scores[~good] > threshold)), 4),
        "threshold": threshold,
    }


def _radius(model: PatchCore) -> float | None:
    space = model.coreset_space_
    return None if space is None else round(float(space.radius), 5)


def _refit(
    args: argparse.Namespace, goods: list[str], held: list[str], test_paths: list[str], labels: np.ndarray
) -> tuple[PatchCore, dict[str, Any]]:
    """A ``fit`` from scratch on ``goods``, calibrated on the held-out goods like the start model."""
    t0 = time.perf_counter()
    refit = _model(args).fit(goods)
    seconds = time.perf_counter() - t0
    refit.calibration_ = calibrate(Predictor(refit), held, args.rate, source="held-out goods")
    figures = _figures(refit.score(test_paths), labels, refit.calibration_.image_threshold)
    return refit, {
        **figures, "images": len(goods), "bank": len(refit.memory_bank_), "fit_seconds": round(seconds, 1),
        "covering_radius": _radius(refit),
    }  # fmt: skip


def _stream(
    start_model: PatchCore, until: str | float | int, stream: list[str], args: argparse.Namespace, name: str
) -> tuple[PatchCore, dict[str, Any], list[str]]:
    """The line: every stream image is scored with the start threshold; a false alarm (or, with ``--teach
    all``, every image) is taught with ``partial_fit(until=until)``. Returns the model, the figures and
    the taught images."""
    model = PatchCore.from_state_dict(start_model.state_dict(), device=args.device)
    model.calibration_ = start_model.calibration_
    threshold = model.calibration_.image_threshold
    flagged: list[int] = []
    latencies: list[float] = []
    updates: list[dict[str, Any]] = []
    taught: list[str] = []
    bank_sizes: list[int] = []
    refused: list[str] = []
    t_stream = time.perf_counter()
    for i, path in enumerate(stream):
        score = float(model.score([path])[0])
        alarm = score > threshold
        flagged.append(int(alarm))
        if alarm or args.teach == "all":
            t1 = time.perf_counter()
            try:
                record = model.partial_fit(
                    [path], note=f"line image {i}: {'false alarm, ' if alarm else ''}score {score:.4g}", until=until
                )
            except UpdateRefused as exc:  # the guard: a good image scoring above 2x the highest good score
                refused.append(f"{path}: {exc}")
            else:
                latencies.append(time.perf_counter() - t1)
                taught.append(path)
                updates.append({
                    "line_image": i, "score": round(score, 3), "rows_added": record.rows_added,
                    "distance_before": round(record.radius_before, 5), "distance_after": round(record.radius_after, 5),
                })  # fmt: skip
        bank_sizes.append(len(model.memory_bank_))
        if (i + 1) % 50 == 0:
            print(f"  {name} until={until}: {i + 1}/{len(stream)} line images, {sum(flagged)} false alarms, "
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
        probe_rows.append(copy.partial_fit([path], force=True, until=until).rows_added)
        probe.append(time.perf_counter() - t1)
    rows = [u["rows_added"] for u in updates]
    return model, {
        "until": str(UpdateRule.parse(until)),
        "false_alarms": int(sum(flagged)),
        "false_alarms_per_100": [int(sum(flagged[k : k + 100])) for k in range(0, len(flagged), 100)],
        "block_sizes": [len(flagged[k : k + 100]) for k in range(0, len(flagged), 100)],
        "updates": len(latencies),
        "refused_by_guard": refused,
        "update_latency_p50_s": _percentile(latencies, 50),
        "update_latency_p95_s": _percentile(latencies, 95),
        "update_latency_max_s": max(latencies) if latencies else None,
        "rows_added": int(sum(rows)),
        "rows_added_per_update_p50": _percentile(rows, 50),
        "per_update": updates,
        "bank_start": len(start_model.memory_bank_),
        "bank_end": len(model.memory_bank_),
        "bank_every_50": bank_sizes[49::50],
        "seconds": round(stream_seconds, 1),
        "latency_probe": {
            "updates": len(probe),
            "p50_s": _percentile(probe, 50),
            "p95_s": _percentile(probe, 95),
            "max_s": max(probe) if probe else None,
            "rows_added_p50": _percentile(probe_rows, 50),
        },
    }, taught


def run_object(obj: Any, args: argparse.Namespace) -> dict[str, Any]:
    goods = [str(s.image_path) for s in obj.train]
    n_start = max(1, int(len(goods) * args.start_fraction))
    start, held = goods[:n_start], goods[n_start : n_start + args.calibration_images]
    stream = goods[n_start + len(held) :][: args.stream_limit]
    test = obj.test
    if args.test_limit is not None and args.test_limit < len(test):
        test = [test[int(i)] for i in np.linspace(0, len(test) - 1, args.test_limit)]
    test_paths = [str(s.image_path) for s in test]
    labels = np.asarray([int(s.is_anomalous) for s in test])
    print(f"{obj.name}: start {len(start)}, calibration {len(held)}, stream {len(stream)}, test {len(test)}",
          file=sys.stderr, flush=True)  # fmt: skip

    t0 = time.perf_counter()
    start_model = _model(args).fit(start)
    fit_start_seconds = time.perf_counter() - t0
    start_model.calibration_ = calibrate(Predictor(start_model), held, args.rate, source="held-out goods")
    threshold = start_model.calibration_.image_threshold
    no_updates = _figures(start_model.score(test_paths), labels, threshold)

    runs: list[dict[str, Any]] = []
    for until in args.until:
        model, line, taught = _stream(start_model, until, stream, args, obj.name)
        scores = model.score(test_paths)
        streamed = _figures(scores, labels, threshold)
        recalibrated, note = refresh_calibration(Predictor(model))
        assert recalibrated is not None
        # The fair comparison: a fit from scratch on the goods this stream was taught (start + taught).
        if len(taught) == len(stream):
            same = None  # every stream image taught: the full refit below is that fit
        else:
            _, same = _refit(args, start + taught, held, test_paths, labels)
        runs.append({
            "until": line["until"],
            "stream": line,
            "recalibration": note,
            "streamed_start_threshold": streamed,
            "streamed_recalibrated": _figures(scores, labels, recalibrated.image_threshold),
            "refit_same_goods": same,
        })  # fmt: skip

    full_model, full = (None, None) if args.no_full_refit else _refit(args, start + stream, held, test_paths, labels)
    same_projection = (
        full_model is not None and start_model.coreset_space_ is not None and full_model.coreset_space_ is not None
        and np.array_equal(start_model.coreset_space_.projection, full_model.coreset_space_.projection)
    )  # fmt: skip
    for run in runs:
        same = run["refit_same_goods"] or full
        streamed_auroc = run["streamed_start_threshold"]["image_auroc"]
        run["bank_vs_start"] = round(run["stream"]["bank_end"] / run["stream"]["bank_start"], 3)
        run["bank_vs_refit_same_goods"] = None if same is None else round(run["stream"]["bank_end"] / same["bank"], 3)
        run["bank_vs_full_refit"] = None if full is None else round(run["stream"]["bank_end"] / full["bank"], 3)
        run["auroc_gap_vs_refit_same_goods_points"] = (
            None if same is None else round(streamed_auroc - same["image_auroc"], 2)
        )
        run["auroc_gap_vs_full_refit_points"] = None if full is None else round(streamed_auroc - full["image_auroc"], 2)
    return {
        "object": obj.name,
        "images": {"start": len(start), "calibration": len(held), "stream": len(stream), "test": len(test)},
        "teach": args.teach,
        "fit_start_seconds": round(fit_start_seconds, 2),
        "threshold_start": threshold,
        "bank_start": len(start_model.memory_bank_),
        "covering_radius_start": _radius(start_model),
        "covering_radius_full_refit": None if full_model is None else _radius(full_model),
        "same_projection_start_and_refit": bool(same_projection),
        "no_updates": no_updates,
        "full_refit": full,
        "runs": runs,
    }


def _cell(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _count(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else str(value)


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| object | until | line images | false alarms per 100 (blocks) | updates (rows, p50 per update) "
        "| latency p50 / p95 s (probe p50 / p95) | bank start -> end (x start) | refit same goods: images, bank "
        "| full refit: images, bank | AUROC streamed / no updates / refit same goods / full refit "
        "| false-alarm rate test goods streamed / no updates / same goods / full |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        none = r["no_updates"]
        full = r["full_refit"] or {"images": "n/a", "bank": "n/a", "image_auroc": "n/a", "false_alarm_rate_test_goods": "n/a"}
        for run in r["runs"]:
            s, lp = run["stream"], run["stream"]["latency_probe"]
            same = run["refit_same_goods"] or full
            lines.append(
                f"| {r['object']} | {run['until']} | {r['images']['stream']} "
                f"| {' '.join(map(str, s['false_alarms_per_100']))} "
                f"| {s['updates']} ({s['rows_added']:,}, {s['rows_added_per_update_p50'] or 0:.0f}) "
                f"| {_cell(s['update_latency_p50_s'])} / {_cell(s['update_latency_p95_s'])} "
                f"({_cell(lp['p50_s'])} / {_cell(lp['p95_s'])}, n={lp['updates']}) "
                f"| {s['bank_start']:,} -> {s['bank_end']:,} ({run['bank_vs_start']:.2f}x) "
                f"| {same['images']}, {_count(same['bank'])} | {full['images']}, {_count(full['bank'])} "
                f"| {run['streamed_start_threshold']['image_auroc']} / {none['image_auroc']} / "
                f"{same['image_auroc']} / {full['image_auroc']} "
                f"| {run['streamed_start_threshold']['false_alarm_rate_test_goods']} / "
                f"{none['false_alarm_rate_test_goods']} / {same['false_alarm_rate_test_goods']} / "
                f"{full['false_alarm_rate_test_goods']} |"
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
    path = args.out / f"line_{'_'.join(args.objects)}{'_all' if args.teach == 'all' else ''}_{stamp}.json"
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
                     "calibration_images": args.calibration_images, "rate": args.rate, "device": args.device,
                     "until": [str(UpdateRule.parse(u)) for u in args.until], "teach": args.teach},
        "machine": machine,
        "results": results,
        "total_seconds": round(time.perf_counter() - began, 1),
        "table": table(results),
    }  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
