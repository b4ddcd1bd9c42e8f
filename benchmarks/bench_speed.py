"""Speed of PatchCore on this machine: today's code (a git revision) against the working tree, in one run.

ELPV cells (the ``elpv-dataset`` package) and EfficientNet-Lite0 (its weights ship in a package), as
configs/elpv.yaml sets them up. Phases, each for both codes unless said otherwise:

- extraction: train images from PNG through a DataLoader (as ``fit`` reads them): images/s end to end
  and for backbone + patch features alone; the new code also with ``precision="bf16"``;
- fit: extraction + coreset + index, what ``PatchCore.fit`` times, run in full by each code on the same
  train images (today's code in its own process);
- search: the pruned exact index on the fitted bank, over the test images' patches (32 images per call, as
  ``predict`` calls it); the new code in bf16 (where the CPU has native bf16) and float32; FAISS flat for
  scale; exactness against float64 brute force on a sample of patches;
- predict: ``Predictor.predict`` on the test PNG files, end to end (decode, backbone, search, maps);
- cli (``--skip-cli`` leaves it out): the figures as a user meets them, each code through its own
  ``patchcore`` command line with the shipped ``configs/elpv.yaml``: ``train`` of the object with evaluation
  off (wall clock, and the phases from its summary.json), then ``predict`` on the test PNGs (wall clock
  including the model load; JSON lines, no heatmaps) with the model as trained (``pruned``) and with the same
  bank searched by FAISS flat (the reference's search);
- ``--auroc-only``: image AUROC of fp32 against bf16 extraction (fit + predict of the whole object each).

Today's code runs in a child process on ``git archive <rev> src`` (default: the merge base with main), so
both sides run on the same machine within minutes of each other. Ratios are new / today in this run. Every
figure in the table is measured in the run that prints it, except the column "reference code, quoted", which
repeats figures measured by others (its source is printed under the table); the reference's own search kind,
FAISS flat, is measured in every run (the "flat" rows).

    .venv/bin/python benchmarks/bench_speed.py                          # mono, 224 px
    .venv/bin/python benchmarks/bench_speed.py --train-limit 64 --test-limit 32 --skip-today   # quick
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import cpu_flags, elpv_split, load_average

ROOT = Path(__file__).resolve().parent
REPO = ROOT.parent
BACKBONE = "efficientnet-lite0"
LAYERS = ["_blocks.4", "_blocks.10"]
# Quoted, not measured by this script: the reference implementation's predict rate as issue 10's author measured it
# on this kind of machine, and its greedy loop as benchmarks/bench_elpv.py measured it on 2026-11-23.
REFERENCE = {"predict_images_per_second": 3.3, "greedy_ms_per_pick": 66.4}
REFERENCE_SOURCE = "issue 10's author (predict) and benchmarks/results/elpv_mono_224_2026-11-23.txt (greedy loop)"

TARGETS = {
    "predict_images_per_second": 30.0,
    "extract_fp32_images_per_second": 60.0,
    "extract_bf16_images_per_second": 120.0,
    "fit_seconds_mono": 20.0,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--object", choices=("mono", "poly"), default="mono")
    parser.add_argument("--train-limit", type=int, default=None, metavar="N", help="first N train images")
    parser.add_argument("--test-limit", type=int, default=None, metavar="N", help="first N test images")
    parser.add_argument("--baseline-rev", default=None, help="today's code (default: merge-base HEAD main)")
    parser.add_argument("--skip-today", action="store_true", help="new code only")
    parser.add_argument("--skip-cli", action="store_true", help="leave out the command-line figures")
    parser.add_argument(
        "--cli-override", action="append", default=[], metavar="KEY=VALUE",
        help="extra config override for the command-line train (a quick check: model.imagesize=64 ...)",
    )  # fmt: skip
    parser.add_argument(
        "--extract-limit",
        type=int,
        default=96,
        metavar="N",
        help="train images timed for bf16 and today's extraction (the new fp32 pass reads all: it builds the bank)",
    )
    parser.add_argument(
        "--reuse",
        default=None,
        metavar="DIR",
        help="a folder with model.pt (and test_features.npy) of an earlier run of this script: skip the fit "
        "(and the test extraction); extraction is then timed on --extract-limit images only",
    )
    parser.add_argument(
        "--auroc-only",
        action="store_true",
        help="only the image AUROC of fp32 against bf16 extraction (fit + predict of the whole object each)",
    )
    parser.add_argument(
        "--exact-sample", type=int, default=784, help="patches checked vs float64 brute force"
    )
    parser.add_argument("--search-images", type=int, default=64, metavar="N",
                        help="test images whose patches time the search phase (FAISS flat is slow)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    parser.add_argument("--out", default=str(ROOT / "results"), help="folder for the JSON and text table")
    parser.add_argument("--role", default="new", help=argparse.SUPPRESS)  # internal: "today" in the child
    parser.add_argument("--shared", default=None, help=argparse.SUPPRESS)  # internal: files from the parent
    return parser.parse_args(argv)


# --------------------------------------------------------------------------- helpers (both codes)


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def split(args: argparse.Namespace):
    return elpv_split(args.object, args.train_limit, args.test_limit)


def make_model(args: argparse.Namespace, **overrides) -> Any:
    from patchcore import PatchCore

    settings = dict(
        backbone=BACKBONE, layers=LAYERS, resize=256, imagesize=224, percentage=0.1, index_kind="pruned",
        device="cpu", batch_size=args.batch_size, seed=0,
    )  # fmt: skip
    import inspect

    if "extract_chunk" in inspect.signature(PatchCore.__init__).parameters:
        # The shipped config's chunking, where the code has it (today's revision may not).
        from _common import elpv_model_settings

        settings["extract_chunk"] = elpv_model_settings().get("extract_chunk")
    settings.update(overrides)
    return PatchCore(**settings)


def loader(model: Any, samples: list, args: argparse.Namespace):
    from torch.utils.data import DataLoader

    from patchcore.data import ImageDataset, collate_samples

    return DataLoader(
        ImageDataset(samples, model.transform), batch_size=args.batch_size, shuffle=False,
        num_workers=args.workers, collate_fn=collate_samples,
    )  # fmt: skip


def extract(model: Any, samples: list, args: argparse.Namespace) -> tuple[dict, np.ndarray]:
    """Patch features of ``samples`` through the model's own feature path, timed end to end and alone."""
    features = model._patch_features()
    warm = torch.zeros(2, 3, 224, 224)
    features(warm)  # lazy builds (weights, aggregator) outside the timings
    rows_all, compute_s, n = [], 0.0, 0
    start = time.perf_counter()
    for batch in loader(model, samples, args):
        t0 = time.perf_counter()
        rows, _ = features(batch["image"])
        rows_all.append(rows.numpy())
        compute_s += time.perf_counter() - t0
        n += len(batch["image"])
    seconds = time.perf_counter() - start
    return {
        "images": n,
        "seconds": round(seconds, 3),
        "images_per_second": round(n / seconds, 2),
        "compute_images_per_second": round(n / compute_s, 2),
        "load_average": load_average(),
    }, np.concatenate(rows_all)


def fit_stats(stats: Any) -> dict[str, Any]:
    """Coreset / index seconds and sizes from a fitted model's statistics (a dict in older revisions)."""
    get = stats.get if isinstance(stats, dict) else (lambda key: getattr(stats, key, None))
    return {"coreset_seconds": get("coreset_seconds"), "index_seconds": get("index_seconds"),
            "bank": get("memory_size"), "patches": get("n_patches")}  # fmt: skip


def search_timing(
    index: Any, queries: np.ndarray, per_call: int, repeats: int = 2
) -> tuple[float, np.ndarray, np.ndarray]:
    """Seconds for all queries (per call, the fastest of ``repeats``: the machine is shared, and other
    processes only ever add time), and the nearest neighbours."""
    distances, nearest = np.empty(len(queries), np.float32), np.empty(len(queries), np.int64)
    seconds = 0.0
    for start in range(0, len(queries), per_call):
        fastest = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            d, i = index.search(queries[start : start + per_call], 1)
            fastest = min(fastest, time.perf_counter() - t0)
        seconds += fastest
        distances[start : start + len(d)], nearest[start : start + len(d)] = d[:, 0], i[:, 0]
    return seconds, distances, nearest


def predict_phase(model_path: str, samples: list) -> tuple[dict, np.ndarray]:
    from patchcore.deploy.inference import Predictor

    predictor = Predictor.load(model_path, device="cpu")
    predictor.predict([samples[0].image_path])  # lazy builds (extractor, index, numba) outside the timing
    paths = [s.image_path for s in samples]
    start = time.perf_counter()
    records = predictor.predict(paths)
    seconds = time.perf_counter() - start
    return {
        "images": len(paths),
        "seconds": round(seconds, 3),
        "images_per_second": round(len(paths) / seconds, 2),
        "load_average": load_average(),
    }, np.array([r.score for r in records])


# --------------------------------------------------------------------------- today's code (child)


def run_today(args: argparse.Namespace) -> dict[str, Any]:
    """Extraction, search and predict with whatever ``patchcore`` is importable (today's tree)."""
    from patchcore.engine.index import MemoryBankIndex

    shared = Path(args.shared)
    train, test = split(args)
    import patchcore

    result: dict[str, Any] = {"load_average_start": load_average(), "patchcore_module": patchcore.__file__}
    say(f"today: extraction of {min(len(train), args.extract_limit)} train images")
    result["extract_fp32"], _ = extract(make_model(args), train[: args.extract_limit], args)
    if not args.reuse:
        say(f"today: fit on {len(train)} train images")
        model = make_model(args)
        start = time.perf_counter()
        model.fit(loader(model, train, args))
        result["fit"] = {"seconds": round(time.perf_counter() - start, 3), **fit_stats(model.stats_)}
    model_file = str(shared / "model.pt")
    if not args.reuse:
        # Its own fit (the same bank: same features, same picks); a file the new code wrote may carry
        # parameters today's code does not know.
        model_file = str(shared / "model_today.pt")
        model.save(model_file)
    from patchcore import PatchCore

    bank = PatchCore.load(model_file).memory_bank_
    queries = np.load(shared / "test_features.npy")
    per_image = queries.shape[0] // len(test)
    n_search = min(len(test), args.search_images)
    queries = queries[: per_image * n_search]
    index_start = time.perf_counter()
    index = MemoryBankIndex(bank, kind="pruned")
    index.search(queries[:per_image], 1)  # numba compile / cache load
    result["index_build_seconds"] = round(time.perf_counter() - index_start, 3)
    seconds, distances, nearest = search_timing(index, queries, per_image * args.batch_size)
    result["search"] = {"ms_per_image": round(1000 * seconds / n_search, 2), "images": n_search}
    say("today: predict")
    np.save(shared / "today_nearest.npy", nearest)
    result["predict"], scores = predict_phase(model_file, test)
    np.save(shared / "today_scores.npy", scores)
    result["load_average_end"] = load_average()
    return result


def today_tree(rev: str, into: Path) -> Path:
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "src"], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into / "src"


# --------------------------------------------------------------------------- new code (parent)


def float64_nearest(bank: np.ndarray, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest bank vector of each query in float64: candidates within 1e-9 relative of the float64
    expansion's minimum, then their sums of squared differences (exact ordering of near-ties)."""
    b = torch.from_numpy(bank).double()
    b_sq = (b * b).sum(1)
    out_d, out_i = np.empty(len(queries)), np.empty(len(queries), np.int64)
    for start in range(0, len(queries), 64):
        q = torch.from_numpy(queries[start : start + 64]).double()
        expansion = (q * q).sum(1, keepdim=True) + b_sq - 2 * q @ b.T
        low = expansion.min(1, keepdim=True).values
        for row in range(len(q)):
            near = torch.nonzero(expansion[row] <= low[row] + 1e-9 * (q[row] @ q[row] + b_sq.max())).flatten()
            exact = ((b[near] - q[row]) ** 2).sum(1)
            best = int(torch.argmin(exact))  # first on ties: candidates are in index order
            out_i[start + row], out_d[start + row] = int(near[best]), float(exact[best])
    return out_d, out_i


def run_new(args: argparse.Namespace, shared: Path) -> dict[str, Any]:
    from patchcore.engine.search.pruned_kernel import cpu_bf16_matmul

    train, test = split(args)
    result: dict[str, Any] = {"load_average_start": load_average(), "cpu_bf16": cpu_bf16_matmul()}
    model = make_model(args)
    reuse = Path(args.reuse) if args.reuse else None
    fp32_images = train[: args.extract_limit] if reuse else train
    say(f"new: extraction fp32 of {len(fp32_images)} train images")
    result["extract_fp32"], features = extract(model, fp32_images, args)
    say(f"new: extraction bf16 of {min(len(train), args.extract_limit)} train images")
    result["extract_bf16"], _ = extract(make_model(args, precision="bf16"), train[: args.extract_limit], args)
    if reuse:
        return run_new_reused(args, shared, reuse, result, train, test)
    say("new: coreset + index")

    # Fit = extraction (timed above) + coreset + index, as PatchCore.fit_features does them.
    start = time.perf_counter()
    model.fit_features(
        features,
        {"n_images": len(train), "n_rows": len(features), "patch_grid": [28, 28], "input_size": [224, 224]},
    )
    fit_rest = time.perf_counter() - start
    result["fit"] = {
        "extract_seconds": result["extract_fp32"]["seconds"],
        **fit_stats(model.stats_),
        # The extraction pass above read every train image through the same DataLoader fit uses.
        "seconds": round(result["extract_fp32"]["seconds"] + fit_rest, 3),
    }
    model_file = shared / "model.pt"
    model.save(model_file)

    say(f"new: test features of {len(test)} images, search")
    _, queries = extract(model, test, args)
    np.save(shared / "test_features.npy", queries)
    return search_and_predict(args, shared, model.memory_bank_, queries, result, test)


def run_new_reused(args, shared: Path, reuse: Path, result: dict, train: list, test: list) -> dict[str, Any]:
    """Search and predict on the model (and test features) an earlier run left in ``reuse``."""
    import shutil

    from patchcore import PatchCore

    shutil.copy(reuse / "model.pt", shared / "model.pt")
    model = PatchCore.load(shared / "model.pt", device="cpu")
    result["fit"] = {"reused": str(reuse), **fit_stats(model.stats_)}
    features_file = reuse / "test_features.npy"
    per_image = int(np.prod(model.patch_grid_))
    if features_file.is_file() and np.load(features_file, mmap_mode="r").shape[0] >= per_image * len(test):
        queries = np.ascontiguousarray(np.load(features_file, mmap_mode="r")[: per_image * len(test)])
    else:
        _, queries = extract(model, test, args)
    np.save(shared / "test_features.npy", queries)
    say(f"new: search over {len(test)} test images")
    return search_and_predict(args, shared, model.memory_bank_, queries, result, test)


def search_and_predict(args, shared: Path, bank: np.ndarray, queries: np.ndarray, result: dict, test: list):
    from patchcore.engine.index import MemoryBankIndex

    model_file = shared / "model.pt"
    per_image = len(queries) // len(test)
    per_call = per_image * args.batch_size
    n_search = min(len(test), args.search_images)
    queries = queries[: per_image * n_search]
    search: dict[str, Any] = {}
    nearest_by = {}
    for name, kind, precision in (
        ("flat", "flat", "auto"),
        ("pruned_fp32", "pruned", "fp32"),
        ("pruned_bf16", "pruned", "bf16"),
    ):
        t0 = time.perf_counter()
        index = MemoryBankIndex(bank, kind=kind, search_precision=precision)
        index.search(queries[:per_image], 1)
        build = time.perf_counter() - t0
        seconds, distances, nearest = search_timing(index, queries, per_call)
        nearest_by[name] = (distances, nearest)
        search[name] = {
            "ms_per_image": round(1000 * seconds / n_search, 2),
            "images": n_search,
            "build_seconds": round(build, 3),
        }
        if kind == "pruned":
            search[name]["exact_fraction"] = round(index.searcher.kernel.last_exact_fraction, 5)
    # Exactness on a sample of patches spread over the test set: float64 brute force.
    rng = np.random.default_rng(0)
    sample = np.sort(rng.choice(len(queries), min(args.exact_sample, len(queries)), replace=False))
    truth_d, truth_i = float64_nearest(bank, queries[sample])
    for name in ("pruned_fp32", "pruned_bf16", "flat"):
        d, i = nearest_by[name]
        search[name]["same_neighbour_fraction"] = float(np.mean(i[sample] == truth_i))
        scale = np.maximum(np.sqrt(truth_d), 1e-12)
        search[name]["max_relative_score_error"] = float(
            np.max(np.abs(np.sqrt(d[sample]) - np.sqrt(truth_d)) / scale)
        )
    result["search"] = search
    result["search"]["exact_sample"] = int(len(sample))

    say("new: predict")
    result["predict"], scores = predict_phase(str(model_file), test)
    np.save(shared / "new_scores.npy", scores)
    result["load_average_end"] = load_average()
    return result


def run_auroc(args: argparse.Namespace) -> dict[str, Any]:
    """Image AUROC with fp32 and with bf16 extraction: each a whole fit and a prediction of every test image
    (through ``PatchCore.predict`` on a DataLoader, as ``patchcore train`` evaluates)."""
    from patchcore.evaluation.metrics import image_auroc

    train, test = split(args)
    labels = np.array([s.label != "good" for s in test], dtype=int)
    result: dict[str, Any] = {"object": args.object, "train_images": len(train), "test_images": len(test)}
    scores = {}
    for precision in ("fp32", "bf16"):
        say(f"auroc: fit + predict with precision={precision}")
        model = make_model(args, precision=precision)
        start = time.perf_counter()
        model.fit(loader(model, train, args))
        prediction = model.predict(loader(model, test, args), return_maps=False)
        scores[precision] = prediction.image_scores
        result[precision] = {"image_auroc": image_auroc(labels, prediction.image_scores),
                             "seconds": round(time.perf_counter() - start, 1),
                             "search_precision": model._search_index().search_precision}  # fmt: skip
    result["change"] = result["bf16"]["image_auroc"] - result["fp32"]["image_auroc"]
    result["max_relative_image_score_change"] = float(
        np.max(np.abs(scores["bf16"] - scores["fp32"]) / scores["fp32"])
    )
    result["load_average_end"] = load_average()
    return result


# --------------------------------------------------------------------------- report


def ratio(a: float | None, b: float | None) -> str:
    return "" if not a or not b else f"x{a / b:.2f}"


def table(report: dict[str, Any]) -> str:
    new, today = report["new"], report.get("today") or {}

    def row(figure, t, n, r="", target="", ref=""):
        return f"| {figure} | {t} | {n} | {r} | {target} | {ref} |"

    def rate_row(figure, key, t, n, target="", ref="", today_column=True):
        """A rate (higher is better) of the new code, against today's (an empty dict: not measured)."""
        return row(figure, t.get(key, "") if today_column else "", n[key], ratio(n[key], t.get(key)), target, ref)

    lines = [
        f"ELPV {report['object']}, {report['train_images']} train / {report['test_images']} test images, 224 px; "
        f"CPU {report['machine']['cpu']} ({report['machine']['cores']} cores; bf16 flags: "
        f"{', '.join(report['machine']['bf16_flags']) or 'none'}); load average start {new['load_average_start']} "
        f"end {new['load_average_end']}",
        "",
        row("figure", "today", "new", "new/today", "target", "reference code, quoted"),
        row("---", "---:", "---:", "---:", "---:", "---:"),
    ]
    te, ne, nb = today.get("extract_fp32", {}), new["extract_fp32"], new["extract_bf16"]
    lines += [
        rate_row("extraction fp32, img/s end to end (PNG)", "images_per_second", te, ne, ">= 60"),
        rate_row("extraction fp32, img/s backbone + patch features", "compute_images_per_second", te, ne),
        # bf16 is new: its ratio is to today's fp32.
        rate_row("extraction bf16 (opt-in), img/s end to end", "images_per_second", te, nb, ">= 120",
                 today_column=False),
        rate_row("extraction bf16, img/s backbone + patch features", "compute_images_per_second", te, nb,
                 today_column=False),
    ]  # fmt: skip
    fit, today_fit = new["fit"], today.get("fit", {})
    # Only fits run in this run are shown (--reuse runs none for either code).
    lines.append(
        row("fit s (extract + coreset + index)", today_fit.get("seconds", ""), fit.get("seconds", ""),
            ratio(today_fit.get("seconds"), fit.get("seconds")), "<= 35")
    )  # fmt: skip
    lines.append(
        row("  of which coreset s", today_fit.get("coreset_seconds", ""), fit.get("coreset_seconds", ""),
            ratio(today_fit.get("coreset_seconds"), fit.get("coreset_seconds")), "")
    )  # fmt: skip
    s = new["search"]
    ts = today.get("search", {}).get("ms_per_image")
    for name, label in (
        ("pruned_bf16", "search pruned bf16, ms/img"),
        ("pruned_fp32", "search pruned fp32, ms/img"),
        ("flat", "search FAISS flat, ms/img"),
    ):
        lines.append(
            row(
                label + f" (exact fraction {s[name].get('exact_fraction', 1.0)})",
                ts if name != "flat" else "",
                s[name]["ms_per_image"],
                ratio(ts, s[name]["ms_per_image"]) if name != "flat" else "",
            )
        )
    for name in ("pruned_bf16", "pruned_fp32"):
        lines.append(
            row(
                f"  {name}: same neighbour as float64 brute force ({s['exact_sample']} patches); max rel. score error",
                "",
                f"{s[name]['same_neighbour_fraction']:.4f}; {s[name]['max_relative_score_error']:.1e}",
                "",
                "1.0; <= 1e-5",
            )
        )
    lines.append(
        rate_row("predict img/s end to end (Predictor, PNG)", "images_per_second", today.get("predict", {}),
                 new["predict"], ">= 30", REFERENCE["predict_images_per_second"])
    )  # fmt: skip
    for code_row in cli_rows(report, row):
        lines.append(code_row)
    if "score_max_abs_diff_today_vs_new" in report:
        lines.append(
            row(
                "predict: max |image score new - today|",
                "",
                f"{report['score_max_abs_diff_today_vs_new']:.2e}",
                "",
                "",
            )
        )
    lines += ["", f"Reference code, quoted (not measured in this run): {REFERENCE_SOURCE}."]
    return "\n".join(lines)


def cli_rows(report: dict[str, Any], row: Any) -> list[str]:
    """Rows of the command-line phase: train wall clock and phases, predict img/s pruned and FAISS flat."""
    cli = report.get("cli") or {}
    new, today = cli.get("new") or {}, cli.get("today") or {}
    if not new:
        return []

    def get(side: dict, *keys: str) -> Any:
        for key in keys:
            side = side.get(key, {}) if isinstance(side, dict) else {}
        return side if side != {} else ""

    lines = []
    for label, keys, target, higher in (
        ("CLI train s (wall clock, evaluation off)", ("train", "wall_seconds"), "<= 35", False),
        ("  extract s (summary.json)", ("train", "extract_seconds"), "", False),
        ("  coreset s (summary.json)", ("train", "coreset_seconds"), "", False),
        ("  index s (summary.json)", ("train", "index_seconds"), "", False),
        ("CLI predict img/s, as trained (incl. model load)", ("predict", "images_per_second"), ">= 15", True),
        ("CLI predict img/s, FAISS flat on the same bank", ("predict_flat", "images_per_second"), "", True),
        ("  as trained / flat (same run)", ("predict", "over_flat"), ">= 5", True),
    ):
        t, n = get(today, *keys), get(new, *keys)
        r = (ratio(n, t) if higher else ratio(t, n)) if t != "" and n != "" else ""
        lines.append(row(label, t, n, r, target))
    return lines


def run_cli(code_src: Path, workdir: Path, args: argparse.Namespace, config: Path | None = None) -> dict[str, Any]:
    """One code's ``patchcore train`` (the shipped ELPV config, one object, evaluation off) and ``patchcore
    predict`` on the object's test PNGs, as a user runs them: wall clock of each command."""
    env = dict(os.environ, PYTHONPATH=str(code_src))
    cli = [sys.executable, "-m", "patchcore.app.cli"]
    out = workdir / "results"
    config = config or REPO / "configs" / "elpv.yaml"  # today's code: its own revision's shipped config
    train_cmd = [*cli, "train", "-c", str(config), "--no-progress",
                 f"output_dir={out}", f"data.objects=[{args.object}]", "evaluation.enabled=false",
                 *args.cli_override]  # fmt: skip
    say(f"cli ({code_src}): patchcore train {args.object}")
    result: dict[str, Any] = {"load_average_start": load_average()}
    start = time.perf_counter()
    subprocess.run(train_cmd, check=True, env=env, cwd=workdir, capture_output=True)
    wall = time.perf_counter() - start
    (summary,) = list(out.rglob("summary.json"))
    stats = json.loads(summary.read_text())["objects"][0].get("stats", {})
    result["train"] = {"wall_seconds": round(wall, 2), "load_average": load_average(),
                       **{k: stats.get(k) for k in ("extract_seconds", "coreset_seconds", "index_seconds")}}  # fmt: skip
    (model_file,) = list(out.rglob(f"patchcore_{args.object}.pt"))
    # The same bank searched by FAISS flat: a copy with index_kind changed (a search setting keeps the fit).
    flat_file = workdir / "flat.pt"
    subprocess.run([sys.executable, "-c", "import sys; from patchcore import PatchCore; "
                    "m = PatchCore.load(sys.argv[1]); m.set_params(index_kind='flat'); m.save(sys.argv[2])",
                    str(model_file), str(flat_file)], check=True, env=env)  # fmt: skip
    _, test = split(args)
    images = [str(s.image_path) for s in test]
    for key, model_path in (("predict", model_file), ("predict_flat", flat_file)):
        say(f"cli ({code_src}): patchcore predict {len(images)} images ({key})")
        pred_out = workdir / key
        start = time.perf_counter()
        subprocess.run([*cli, "predict", "--model", str(model_path), *images, "--out", str(pred_out),
                        "--no-heatmaps", "--device", "cpu"], check=True, env=env, cwd=workdir,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
        seconds = time.perf_counter() - start
        result[key] = {"images": len(images), "wall_seconds": round(seconds, 2),
                       "images_per_second": round(len(images) / seconds, 2), "load_average": load_average()}  # fmt: skip
    result["predict"]["over_flat"] = round(
        result["predict"]["images_per_second"] / result["predict_flat"]["images_per_second"], 2
    )
    result["load_average_end"] = load_average()
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(0)
    if args.role == "today":
        result = run_today(args)
        Path(args.shared, "today.json").write_text(json.dumps(result))
        return 0
    started = dt.datetime.now(dt.UTC)
    if args.auroc_only:
        report = {"benchmark": "bench_speed --auroc-only", "started_utc": started.isoformat(timespec="seconds"),
                  "command": " ".join([Path(sys.executable).name, *sys.argv]), "load_average_start": load_average(),
                  **run_auroc(args)}  # fmt: skip
        text = (f"ELPV {args.object}: image AUROC fp32 {report['fp32']['image_auroc']:.4f}, bf16 extraction "
                f"{report['bf16']['image_auroc']:.4f} (change {report['change']:+.4f}); largest relative image "
                f"score change {report['max_relative_image_score_change']:.2e}")  # fmt: skip
        return write(args, started, report, text, "auroc")
    with tempfile.TemporaryDirectory(prefix="bench-speed-") as tmp:
        shared = Path(tmp)
        new = run_new(args, shared)
        today = None
        if not args.skip_today:
            rev = (
                args.baseline_rev
                or subprocess.run(
                    ["git", "-C", str(REPO), "merge-base", "HEAD", "main"],
                    check=True,
                    capture_output=True,
                    text=True,
                ).stdout.strip()
            )
            src = today_tree(rev, shared)
            env = dict(os.environ, PYTHONPATH=str(src))
            child = [sys.executable, __file__, "--role", "today", "--shared", str(shared), "--object", args.object,
                     "--batch-size", str(args.batch_size), "--workers", str(args.workers),
                     "--extract-limit", str(args.extract_limit), "--search-images", str(args.search_images)]  # fmt: skip
            if args.train_limit is not None:
                child += ["--train-limit", str(args.train_limit)]
            if args.test_limit is not None:
                child += ["--test-limit", str(args.test_limit)]
            if args.reuse:
                child += ["--reuse", args.reuse]
            subprocess.run(child, check=True, env=env, cwd=tmp)
            today = json.loads((shared / "today.json").read_text())
            today["revision"] = rev
        cli: dict[str, Any] = {}
        if not args.skip_cli:
            (shared / "cli_new").mkdir()
            cli["new"] = run_cli(REPO / "src", shared / "cli_new", args)
            if today is not None:
                (shared / "cli_today").mkdir()
                today_config = shared / "elpv_today.yaml"
                today_config.write_bytes(subprocess.run(
                    ["git", "-C", str(REPO), "show", f"{rev}:configs/elpv.yaml"], check=True, capture_output=True
                ).stdout)  # fmt: skip
                cli["today"] = run_cli(src, shared / "cli_today", args, today_config)
        train, test = split(args)
        report: dict[str, Any] = {
            "benchmark": "bench_speed",
            "started_utc": started.isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "object": args.object,
            "train_images": len(train),
            "test_images": len(test),
            "machine": {
                "cpu": platform.processor() or platform.machine(),
                "cores": os.cpu_count(),
                "torch_threads": torch.get_num_threads(),
                "bf16_flags": cpu_flags(),
                "torch": torch.__version__,
            },
            "reference_code": REFERENCE,
            "targets": TARGETS,
            "reference_source": REFERENCE_SOURCE,
            "new": new,
            "today": today,
            "cli": cli,
        }
        if today is not None:
            report["score_max_abs_diff_today_vs_new"] = float(
                np.max(np.abs(np.load(shared / "today_scores.npy") - np.load(shared / "new_scores.npy")))
            )
    return write(args, started, report, table(report), "speed")


def write(
    args: argparse.Namespace, started: dt.datetime, report: dict[str, Any], text: str, kind: str
) -> int:
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{kind}_{args.object}_{started.strftime('%Y-%m-%dT%H%M')}"
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2, default=float))
    (out / f"{stem}.txt").write_text(text + "\n")
    print(f"\nwrote {out / stem}.json and .txt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
