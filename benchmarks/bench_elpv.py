"""Benchmark PatchCore on the ELPV solar cells that ship in the ``elpv-dataset`` package.

One process, one run: feature extraction, the coreset (the reference implementation's greedy loop, run op
for op, against our fused and pruned loops on the same projected features and start points), the memory-bank
index (exact flat against approximate IVF and HNSW, with their recall), prediction end to end through
``PatchCore.predict``, and the peak memory of a training run (``PatchCore.fit`` in a fresh subprocess) on the
real train set and on a synthetic set several times larger. Every ratio compares figures from this one run.
Prints a table and writes everything as JSON. See benchmarks/README.md.

    .venv/bin/python benchmarks/bench_elpv.py                       # mono, 224 px, everything
    .venv/bin/python benchmarks/bench_elpv.py --imagesize 64 --train-limit 20 --test-limit 10 \\
        --baseline-picks 20 --synthetic-factor 2                    # a quick check that it runs
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import cpu_model, elpv_split, meminfo_gib
from torch.utils.data import DataLoader, Dataset

from patchcore import PatchCore
from patchcore import __version__ as patchcore_version
from patchcore.data import ImageDataset, collate_samples
from patchcore.engine.coreset import (
    ApproximateGreedyCoreset,
    coreset_size,
    covering_radius,
    greedy_select,
    prefix_bound_data,
    project,
    reference_greedy_select,
    start_distances,
)
from patchcore.engine.index import INDEX_KINDS, MemoryBankIndex, ivf_nlist
from patchcore.engine.records import FitStats
from patchcore.engine.store import FeatureStore
from patchcore.evaluation.metrics import image_auroc
from patchcore.fileio import atomic_write_json

ROOT = Path(__file__).resolve().parent
BACKBONE = "efficientnet-lite0"
LAYERS = ("_blocks.4", "_blocks.10")  # configs/elpv.yaml


# --------------------------------------------------------------------------- options


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Time extraction, coreset, index and prediction of PatchCore on ELPV; peak fit memory.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--object", choices=("mono", "poly"), default="mono", help="ELPV cell type")
    parser.add_argument(
        "--imagesize", type=int, default=224, help="centre crop; resize = round(imagesize * 256 / 224)"
    )
    parser.add_argument("--train-limit", type=int, default=None, metavar="N", help="first N train images")
    parser.add_argument("--test-limit", type=int, default=None, metavar="N", help="first N test images")
    parser.add_argument(
        "--baseline-picks",
        type=int,
        default=300,
        metavar="N",
        help="greedy picks on which the reference loop, the fused and the pruned loop are timed",
    )
    parser.add_argument(
        "--full-fused",
        action="store_true",
        help="also run the fused loop for the whole coreset and compare covering radii (slow: ~10 min)",
    )
    parser.add_argument("--percentage", type=float, default=0.1, help="coreset fraction")
    parser.add_argument("--nprobe", type=int, default=8, help="IVF cells visited per query")
    parser.add_argument("--ef-search", type=int, default=64, help="HNSW search candidates")
    parser.add_argument("--batch-size", type=int, default=32, help="images per backbone pass")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch, FAISS (OpenMP) and numba threads; default: each library's own default",
    )
    parser.add_argument(
        "--synthetic-factor",
        type=int,
        default=5,
        metavar="K",
        help="the memory run's synthetic train set is K times the real one (0 or 1: skip it)",
    )
    parser.add_argument(
        "--synthetic-percentage",
        type=float,
        default=0.02,
        help="coreset fraction of the synthetic memory run (smaller than --percentage to keep it short)",
    )
    parser.add_argument("--skip-memory", action="store_true", help="skip the peak-memory subprocess runs")
    parser.add_argument("--work-dir", default=None, help="where features are streamed (default: system temp)")
    parser.add_argument(
        "--out", default=None, help="JSON file (default benchmarks/out/elpv_<object>_<size>.json)"
    )
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)  # internal: one fit, as JSON
    args = parser.parse_args(argv)
    for name in ("train_limit", "test_limit"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.baseline_picks < 1:
        parser.error("--baseline-picks must be >= 1")
    if args.synthetic_factor < 0:
        parser.error("--synthetic-factor must be >= 0")
    for name in ("percentage", "synthetic_percentage"):
        if not 0.0 < getattr(args, name) <= 1.0:
            parser.error(f"--{name.replace('_', '-')} must be in (0, 1]")
    if args.out is None:
        args.out = str(ROOT / "out" / f"elpv_{args.object}_{args.imagesize}.json")
    return args


def resize_for(imagesize: int) -> int:
    return round(imagesize * 256 / 224)


# --------------------------------------------------------------------------- machine


def set_threads(threads: int | None) -> None:
    if threads is None:
        return
    import faiss

    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    try:
        import numba

        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    except ImportError:  # pragma: no cover - numba is optional
        pass


def machine_info() -> dict[str, Any]:
    import faiss

    info: dict[str, Any] = {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_total_gib": meminfo_gib("MemTotal"),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        # Another job on the CPUs skews every timing (OpenMP threads wait for busy cores): flagged here.
        "busy_at_start": os.getloadavg()[0] > 0.5 * (os.cpu_count() or 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "patchcore": patchcore_version,
        "torch": str(torch.__version__),
        "torch_threads": torch.get_num_threads(),
        "faiss": str(getattr(faiss, "__version__", "unknown")),
        "faiss_omp_threads": faiss.omp_get_max_threads(),
        "faiss_blas_threshold": int(getattr(faiss.cvar, "distance_compute_blas_threshold", -1)),
        "numpy": np.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        import numba

        info["numba"] = numba.__version__
        info["numba_threads"] = numba.get_num_threads()
    except ImportError:  # pragma: no cover
        info["numba"] = None
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        )
        info["git_commit"] = commit.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["git_commit"] = None
    return info


# --------------------------------------------------------------------------- data


def model_for(args: argparse.Namespace, percentage: float) -> PatchCore:
    """The estimator as configs/elpv.yaml sets it up, at the benchmark's image size."""
    return PatchCore(
        backbone=BACKBONE,
        layers=list(LAYERS),
        resize=resize_for(args.imagesize),
        imagesize=args.imagesize,
        percentage=percentage,
        device=args.device,
        batch_size=args.batch_size,
        seed=args.seed,
        work_dir=args.work_dir,
    )


def split(args: argparse.Namespace):
    return elpv_split(args.object, args.train_limit, args.test_limit)


class PerturbedTrainSet(Dataset):
    """``factor`` copies of the train images, loaded on access: copy 0 as it is, the others with a small
    per-item random brightness shift and gaussian noise (so their features differ). Nothing is held in RAM."""

    def __init__(self, samples, transform, factor: int, sigma: float = 0.05, seed: int = 0):
        self.base = ImageDataset(samples, transform)
        self.factor = factor
        self.sigma = sigma
        self.seed = seed

    def __len__(self) -> int:
        return self.factor * len(self.base)

    def __getitem__(self, index: int) -> dict[str, Any]:
        copy, source = divmod(index, len(self.base))
        item = self.base[source]
        if copy:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
            image = item["image"]
            shift = (torch.rand(1, generator=generator) - 0.5) * 0.2
            item["image"] = image + shift + self.sigma * torch.randn(image.shape, generator=generator)
        item["index"] = index
        return item


def make_loader(dataset: Dataset, batch_size: int, workers: int) -> DataLoader:
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=collate_samples
    )


# --------------------------------------------------------------------------- phases


def extract(model: PatchCore, loader: DataLoader, store: FeatureStore) -> dict[str, Any]:
    """Stream patch features of every batch to ``store`` through the model's own feature path."""
    features = model._patch_features()  # backbone + patch aggregation, exactly what fit/predict use
    device = model.torch_device
    n_images, feature_seconds, grid, input_size = 0, 0.0, None, None
    start = time.perf_counter()
    for batch in loader:
        images = batch["image"]
        t0 = time.perf_counter()
        rows, grid = features(images.to(device, non_blocking=True))
        rows = rows.cpu().numpy()
        feature_seconds += time.perf_counter() - t0
        store.append(rows)
        n_images += len(images)
        input_size = tuple(images.shape[-2:])
    seconds = time.perf_counter() - start
    return {
        "images": n_images,
        "patches": int(store.n_rows),
        "feature_dim": int(store.dim or 0),
        "patch_grid": list(grid),
        "input_size": list(input_size),
        "seconds": round(seconds, 3),
        "images_per_second": round(n_images / seconds, 2),
        "backbone_seconds": round(feature_seconds, 3),
        "backbone_images_per_second": round(n_images / feature_seconds, 2),
    }


def _timed(function, *args, **kwargs):
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - start


def _leading_identical(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    differ = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(differ[0]) if len(differ) else n


def coreset_phase(args: argparse.Namespace, features: np.ndarray, seed: int) -> tuple[dict, np.ndarray]:
    """Projection, start distances and the greedy loop, as ``PatchCore.fit`` draws them from its seed."""
    n, dim = features.shape
    rng = np.random.default_rng(seed)
    sampler = ApproximateGreedyCoreset(percentage=args.percentage)
    start = time.perf_counter()
    z = project(features, sampler.projection(dim, rng))
    projection_s = time.perf_counter() - start
    start_points = sampler.start_points(n, rng)
    d0, start_s = _timed(start_distances, z, start_points)
    n_select = coreset_size(n, args.percentage)
    picks = min(args.baseline_picks, n_select)

    # numba compiles (or loads its cache) on first use: warm it up on a few rows, outside every timing.
    warm = z[: min(n, 4096)].clone()
    greedy_select(
        warm, min(2, len(warm)), start_distances(warm, np.arange(min(len(warm), 2))), method="pruned"
    )

    reference_init, reference_init_s = _timed(reference_greedy_select, z, 0, start_points)
    reference, reference_s = _timed(reference_greedy_select, z, picks, start_points)
    reference_per_pick = max(reference_s - reference_init_s, 0.0) / picks
    fused, fused_s = _timed(greedy_select, z, picks, d0.clone(), method="fused")
    _, pruned_setup_s = _timed(prefix_bound_data, z)
    pruned_stats: dict = {}
    pruned, pruned_s = _timed(greedy_select, z, picks, d0.clone(), method="pruned", stats=pruned_stats)
    pruned_per_pick = max(pruned_s - pruned_setup_s, 0.0) / picks

    full_stats: dict = {}
    indices, full_s = _timed(greedy_select, z, n_select, d0.clone(), method="pruned", stats=full_stats)
    reference_full_estimate = reference_init_s + reference_per_pick * n_select
    result: dict[str, Any] = {
        "patches": n,
        "projected_dim": int(z.shape[1]),
        "coreset_size": n_select,
        "percentage": args.percentage,
        "projection_seconds": round(projection_s, 3),
        "start_distances_seconds": round(start_s, 3),
        "first_picks": {
            "picks": picks,
            "reference_init_seconds": round(reference_init_s, 4),
            "reference_ms_per_pick": round(1000 * reference_per_pick, 4),
            "fused_ms_per_pick": round(1000 * fused_s / picks, 4),
            "pruned_setup_seconds": round(pruned_setup_s, 4),
            "pruned_ms_per_pick": round(1000 * pruned_per_pick, 4),
            "pruned_exact_fraction": round(pruned_stats.get("exact_fraction", 1.0), 6),
            "speedup_fused_vs_reference": _ratio(reference_per_pick, fused_s / picks),
            "speedup_pruned_vs_reference": _ratio(reference_per_pick, pruned_per_pick),
            "speedup_pruned_vs_fused": _ratio(fused_s / picks, pruned_per_pick),
            "leading_identical_pruned_vs_reference": _leading_identical(pruned, reference),
            "leading_identical_fused_vs_reference": _leading_identical(fused, reference),
            "identical_pruned_vs_reference": bool(np.array_equal(pruned, reference)),
        },
        "full": {
            "method": full_stats.get("method"),
            "seconds": round(full_s, 3),
            "ms_per_pick": round(1000 * full_s / n_select, 4),
            "exact_fraction": round(full_stats.get("exact_fraction", 1.0), 6),
            "first_picks_match_the_timed_run": bool(np.array_equal(indices[:picks], pruned)),
            "reference_estimated_seconds": round(reference_full_estimate, 1),
            "speedup_vs_reference_estimate": _ratio(reference_full_estimate, full_s),
            "coreset_seconds_as_in_fit": round(projection_s + start_s + full_s, 3),
        },
    }
    del reference_init
    if args.full_fused:
        fused_full, fused_full_s = _timed(greedy_select, z, n_select, d0.clone(), method="fused")
        result["full_fused"] = {
            "seconds": round(fused_full_s, 3),
            "ms_per_pick": round(1000 * fused_full_s / n_select, 4),
            "speedup_pruned_vs_fused": _ratio(fused_full_s, full_s),
            "leading_identical_pruned_vs_fused": _leading_identical(indices, fused_full),
            "same_set": bool(np.array_equal(np.sort(indices), np.sort(fused_full))),
            "covering_radius_pruned": round(covering_radius(z, indices), 6),
            "covering_radius_fused": round(covering_radius(z, fused_full), 6),
        }
    return result, indices


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 2) if b > 0 else None


def _x(ratio: float | None) -> str:
    return "n/a" if ratio is None else f"x{ratio}"


def index_phase(
    args: argparse.Namespace,
    bank: np.ndarray,
    queries: np.ndarray,
    per_image: int,
    labels: np.ndarray,
) -> tuple[dict, np.ndarray]:
    """Build each kind of index on the bank; search the test patches image batch by image batch."""
    n_images = len(queries) // per_image
    rows_per_call = per_image * args.batch_size  # as PatchCore.predict calls search
    results: dict[str, Any] = {"bank_size": len(bank), "queries": len(queries), "images": n_images}
    exact_squared = exact_nearest = flat_image_scores = None
    for kind in INDEX_KINDS:
        index, build_s = _timed(
            MemoryBankIndex, bank, kind=kind, nprobe=args.nprobe, ef_search=args.ef_search
        )
        squared = np.empty(len(queries), dtype=np.float32)
        nearest = np.empty(len(queries), dtype=np.int64)
        search_s = 0.0
        for start in range(0, len(queries), rows_per_call):
            chunk = np.asarray(queries[start : start + rows_per_call])
            t0 = time.perf_counter()
            d, i = index.search(chunk, 1)
            search_s += time.perf_counter() - t0
            squared[start : start + len(chunk)], nearest[start : start + len(chunk)] = d[:, 0], i[:, 0]
        image_scores = np.sqrt(squared).reshape(n_images, per_image).max(axis=1)
        entry: dict[str, Any] = {
            "build_seconds": round(build_s, 3),
            "search_seconds": round(search_s, 3),
            "search_ms_per_image": round(1000 * search_s / n_images, 3),
            "image_auroc": _round(image_auroc(labels, image_scores)),
        }
        if kind == "ivf":
            entry.update(nlist=index.nlist, nprobe=args.nprobe)
        if kind == "hnsw":
            entry.update(M=32, ef_construction=80, ef_search=args.ef_search)
        if kind == "flat":
            exact_squared, exact_nearest, flat_image_scores = squared, nearest, image_scores
            entry["recall_at_1"] = 1.0
        else:
            distance, exact_distance = np.sqrt(squared), np.sqrt(exact_squared)
            increase = (distance - exact_distance) / np.maximum(exact_distance, 1e-12)
            entry.update(
                recall_at_1=round(float(np.mean(nearest == exact_nearest)), 5),
                # Beyond float rounding (flat's BLAS distances and the direct ones differ by ~1e-6).
                patches_with_higher_score=round(float(np.mean(increase > 1e-4)), 5),
                mean_patch_score_increase=round(float(increase.mean()), 6) + 0.0,
                min_patch_score_change=round(float(increase.min()), 7) + 0.0,  # >= 0 up to rounding
                max_image_score_increase=round(
                    float(np.max((image_scores - flat_image_scores) / flat_image_scores)), 6
                ),
                speedup_search_vs_flat=_ratio(results["flat"]["search_seconds"], search_s),
            )
        results[kind] = entry
        del index
    return results, flat_image_scores


def _round(value: float | None, digits: int = 5) -> float | None:
    return None if value is None else round(float(value), digits)


def predict_phase(
    model: PatchCore, loader: DataLoader, labels: np.ndarray, flat_scores: np.ndarray
) -> dict[str, Any]:
    start = time.perf_counter()
    prediction = model.predict(loader, return_maps=True)
    seconds = time.perf_counter() - start
    n = len(prediction.image_scores)
    return {
        "images": n,
        "seconds": round(seconds, 3),
        "images_per_second": round(n / seconds, 2),
        "timings": prediction.timings,
        "search_ms_per_image": round(1000 * prediction.timings["search_seconds"] / n, 3),
        "image_auroc": _round(image_auroc(labels, prediction.image_scores)),
        "max_abs_diff_vs_index_phase_scores": float(np.max(np.abs(prediction.image_scores - flat_scores))),
    }


# --------------------------------------------------------------------------- memory (subprocesses)


def _status_kib(field: str) -> int | None:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None


class _RssSampler(threading.Thread):
    """Peak anonymous and file-backed resident memory, sampled every 20 ms (VmHWM only has their sum)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peaks = {"RssAnon": 0, "RssFile": 0}
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            for key in self.peaks:
                self.peaks[key] = max(self.peaks[key], _status_kib(key) or 0)
            self._stop_event.wait(0.02)

    def stop(self) -> dict[str, int]:
        self._stop_event.set()
        self.join()
        return self.peaks


def memory_child(spec: dict[str, Any]) -> dict[str, Any]:
    """One training run (``PatchCore.fit``) in this fresh process; its peak memory as JSON.

    VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the forking parent. The DataLoader workers
    (separate processes that only load and transform images) are not counted.
    """
    args = argparse.Namespace(**spec)
    set_threads(args.threads)
    train, _ = split(args)
    model = model_for(args, args.percentage)
    if args.factor > 1:
        dataset: Dataset = PerturbedTrainSet(train, model.transform, args.factor, seed=args.seed)
    else:
        dataset = ImageDataset(train, model.transform)
    sampler = _RssSampler()
    sampler.start()
    start = time.perf_counter()
    model.fit(make_loader(dataset, args.batch_size, args.workers))
    seconds = time.perf_counter() - start
    peaks = sampler.stop()
    return {
        "images": len(dataset),
        "n_patches": model.stats_.n_patches,
        "memory_size": model.stats_.memory_size,
        "percentage": args.percentage,
        "fit_seconds": round(seconds, 2),
        "extract_seconds": model.stats_.extract_seconds,
        "coreset_seconds": model.stats_.coreset_seconds,
        "feature_file_gib": round(model.stats_.n_patches * model.stats_.feature_dim * 4 / 2**30, 3),
        "peak_rss_mib": round((_status_kib("VmHWM") or 0) / 1024, 1),
        "peak_rss_anon_mib_sampled": round(peaks["RssAnon"] / 1024, 1),
        "peak_rss_file_mib_sampled": round(peaks["RssFile"] / 1024, 1),
        "coreset_indices_sha256": hashlib.sha256(model.coreset_indices_.tobytes()).hexdigest(),
    }


def run_memory_child(args: argparse.Namespace, factor: int, percentage: float) -> dict[str, Any]:
    spec = {
        key: getattr(args, key)
        for key in (
            "object",
            "imagesize",
            "train_limit",
            "test_limit",
            "batch_size",
            "workers",
            "device",
            "seed",
            "threads",
            "work_dir",
        )
    }
    spec.update(factor=factor, percentage=percentage)
    command = [sys.executable, str(Path(__file__).resolve()), "--memory-child", json.dumps(spec)]
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode != 0:
        raise RuntimeError(f"the memory run failed ({completed.returncode}):\n{completed.stderr[-4000:]}")
    lines = [line for line in completed.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1])


def memory_phase(args: argparse.Namespace, in_process_indices: np.ndarray) -> dict[str, Any]:
    real = run_memory_child(args, 1, args.percentage)
    sha = hashlib.sha256(np.asarray(in_process_indices, dtype=np.int64).tobytes()).hexdigest()
    real["same_coreset_as_this_run"] = real.pop("coreset_indices_sha256") == sha
    result: dict[str, Any] = {"real": real}
    if args.synthetic_factor > 1:
        synthetic = run_memory_child(args, args.synthetic_factor, args.synthetic_percentage)
        synthetic.pop("coreset_indices_sha256")
        synthetic["factor"] = args.synthetic_factor
        synthetic["note"] = (
            f"train images repeated {args.synthetic_factor}x with small random perturbations, streamed; "
            f"coreset percentage {args.synthetic_percentage} (real run: {args.percentage})"
        )
        result["synthetic"] = synthetic
        result["patch_ratio"] = _ratio(synthetic["n_patches"], real["n_patches"])
        result["peak_rss_ratio"] = _ratio(synthetic["peak_rss_mib"], real["peak_rss_mib"])
        result["peak_rss_anon_ratio"] = _ratio(
            synthetic["peak_rss_anon_mib_sampled"], real["peak_rss_anon_mib_sampled"]
        )
    return result


# --------------------------------------------------------------------------- report


def summary_rows(results: dict[str, Any]) -> list[tuple[str, str, str]]:
    rows: list[tuple[str, str, str]] = []
    m = results["machine"]
    rows.append(("machine", f"{m['cpu_model']}, {m['cpus_available']} CPUs", f"{m['memory_total_gib']} GiB"))
    rows.append(
        (
            "threads",
            f"torch {m['torch_threads']}, faiss {m['faiss_omp_threads']}, numba {m.get('numba_threads')}",
            f"load avg at start {m['load_average_at_start'][0]}",
        )
    )
    if m.get("busy_at_start"):
        rows.append(("WARNING", "the CPUs were busy when the run started", "timings are not representative"))
    rows.append(("versions", f"torch {m['torch']}, faiss {m['faiss']}, numba {m.get('numba')}", ""))
    for split_name in ("train", "test"):
        e = results["extract"].get(split_name)
        if e:
            rows.append(
                (
                    f"extract {split_name}",
                    f"{e['images_per_second']} img/s ({e['images']} images, {e['patches']} patches)",
                    f"backbone alone {e['backbone_images_per_second']} img/s",
                )
            )
    c = results.get("coreset")
    if c:
        f = c["first_picks"]
        rows.append(
            (
                "coreset setup",
                f"projection {c['projection_seconds']} s",
                f"start distances {c['start_distances_seconds']} s",
            )
        )
        rows.append(
            (
                f"greedy, first {f['picks']} picks",
                f"reference {f['reference_ms_per_pick']} / fused {f['fused_ms_per_pick']} / "
                f"pruned {f['pruned_ms_per_pick']} ms per pick",
                f"pruned {_x(f['speedup_pruned_vs_reference'])}, "
                f"fused {_x(f['speedup_fused_vs_reference'])} vs reference",
            )
        )
        rows.append(
            (
                "picks agree",
                f"pruned = reference for the first "
                f"{f['leading_identical_pruned_vs_reference']} of {f['picks']}",
                f"fused: {f['leading_identical_fused_vs_reference']}",
            )
        )
        full = c["full"]
        rows.append(
            (
                f"full coreset ({c['coreset_size']} of {c['patches']})",
                f"pruned {full['seconds']} s ({full['ms_per_pick']} ms/pick, "
                f"exact {full['exact_fraction']:.2%})",
                f"reference est. {full['reference_estimated_seconds']} s: "
                f"{_x(full['speedup_vs_reference_estimate'])}",
            )
        )
        ff = c.get("full_fused")
        if ff:
            rows.append(
                (
                    "full fused",
                    f"{ff['seconds']} s (pruned {_x(ff['speedup_pruned_vs_fused'])})",
                    f"covering radius pruned {ff['covering_radius_pruned']} / "
                    f"fused {ff['covering_radius_fused']}",
                )
            )
    idx = results.get("index")
    if idx:
        for kind in INDEX_KINDS:
            e = idx[kind]
            extra = "" if kind == "flat" else f", {_x(e['speedup_search_vs_flat'])} vs flat"
            rows.append(
                (
                    f"index {kind}",
                    f"build {e['build_seconds']} s, search {e['search_ms_per_image']} ms/image{extra}",
                    f"recall@1 {e['recall_at_1']}, image AUROC {e['image_auroc']}",
                )
            )
    p = results.get("predict")
    if p:
        rows.append(
            (
                "predict (flat, end to end)",
                f"{p['images_per_second']} img/s ({p['images']} images)",
                f"search {p['search_ms_per_image']} ms/image, image AUROC {p['image_auroc']}",
            )
        )
    mem = results.get("memory")
    if mem:
        for name in ("real", "synthetic"):
            e = mem.get(name)
            if e:
                rows.append(
                    (
                        f"fit peak memory, {name}",
                        f"{e['peak_rss_mib']} MiB RSS (anon {e['peak_rss_anon_mib_sampled']} MiB)",
                        f"{e['n_patches']} patches, {e['images']} images, {e['fit_seconds']} s, "
                        f"p={e['percentage']}",
                    )
                )
        if "patch_ratio" in mem:
            rows.append(
                (
                    "memory growth",
                    f"patches {_x(mem['patch_ratio'])}",
                    f"peak RSS {_x(mem['peak_rss_ratio'])}, anon {_x(mem['peak_rss_anon_ratio'])}",
                )
            )
    return rows


def print_table(results: dict[str, Any]) -> None:
    rows = summary_rows(results)
    title = (
        f"PatchCore on ELPV {results['args']['object']}, {results['args']['imagesize']} px "
        f"(one run, {results['total_seconds']} s)"
    )
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # pragma: no cover
        print(title)
        for row in rows:
            print(f"{row[0]:<34} {row[1]:<70} {row[2]}")
        return
    table = Table(title=title, show_lines=False)
    table.add_column("figure", style="bold")
    table.add_column("value")
    table.add_column("compared / detail")
    for row in rows:
        table.add_row(*row)
    Console(width=200).print(table)


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.memory_child is not None:
        print(json.dumps(memory_child(json.loads(args.memory_child))))
        return {}
    set_threads(args.threads)
    began = time.perf_counter()
    out = Path(args.out)
    results: dict[str, Any] = {
        "benchmark": "bench_elpv",
        "created_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "args": {k: v for k, v in vars(args).items() if k != "memory_child"},
        "machine": machine_info(),
        "extract": {},
    }

    def checkpoint(phase: str) -> None:
        results["total_seconds"] = round(time.perf_counter() - began, 1)
        results["completed_phases"] = [*results.get("completed_phases", []), phase]
        atomic_write_json(out, results)
        print(f"[{results['total_seconds']:8.1f} s] {phase} done", file=sys.stderr, flush=True)

    train, test = split(args)
    model = model_for(args, args.percentage)
    results["config"] = model.get_params()
    labels = np.array([s.is_anomalous for s in test], dtype=np.int64)
    with tempfile.TemporaryDirectory(prefix="bench-elpv-", dir=args.work_dir) as tmp:
        train_store = FeatureStore(Path(tmp) / "train.f32")
        train_loader = make_loader(ImageDataset(train, model.transform), args.batch_size, args.workers)
        results["extract"]["train"] = extract(model, train_loader, train_store)
        checkpoint("extract train")

        train_features = train_store.array()
        results["coreset"], indices = coreset_phase(args, train_features, args.seed)
        bank = np.array(train_features[indices], dtype=np.float32)  # in pick order, as fit keeps it
        del train_features
        checkpoint("coreset")

        test_store = FeatureStore(Path(tmp) / "test.f32")
        test_loader = make_loader(ImageDataset(test, model.transform), args.batch_size, args.workers)
        results["extract"]["test"] = extract(model, test_loader, test_store)
        per_image = int(np.prod(results["extract"]["test"]["patch_grid"]))
        results["index"], flat_scores = index_phase(args, bank, test_store.array(), per_image, labels)
        results["index"]["ivf_nlist_rule"] = f"4 sqrt(M) clamped to [1, M/39]: {ivf_nlist(len(bank))}"
        checkpoint("index")

    # Prediction with this run's bank: the fitted state PatchCore.fit would set from the same features,
    # seed and sampler (the memory run's own fit checks it selects the same coreset).
    model.memory_bank_ = bank
    model.coreset_indices_ = np.asarray(indices, dtype=np.int64)
    train_extract = results["extract"]["train"]
    model.calibration_ = None
    model.evaluation_ = None
    model.patch_grid_ = tuple(train_extract["patch_grid"])
    model.input_size_ = tuple(train_extract["input_size"])
    model.stats_ = FitStats(
        n_train_images=train_extract["images"],
        n_patches=results["coreset"]["patches"],
        memory_size=len(bank),
        feature_dim=int(bank.shape[1]),
        patch_grid=model.patch_grid_,
        input_size=model.input_size_,
    )
    results["predict"] = predict_phase(model, test_loader, labels, flat_scores)
    checkpoint("predict")

    if not args.skip_memory:
        results["memory"] = memory_phase(args, indices)
        checkpoint("memory")

    results["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    results["machine"]["peak_rss_mib_this_process"] = round((_status_kib("VmHWM") or 0) / 1024, 1)
    results["total_seconds"] = round(time.perf_counter() - began, 1)
    atomic_write_json(out, results)
    print_table(results)
    print(f"JSON: {out}")
    return results


if __name__ == "__main__":
    main()
