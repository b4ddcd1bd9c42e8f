"""Where the time goes, beside the physical limit of each part on this CPU (NOTES.md, issue 22's profile).

    PYTHONPATH=src .venv/bin/python benchmarks/bench_profile.py                       # mono and poly
    PYTHONPATH=src .venv/bin/python benchmarks/bench_profile.py --objects mono --picks 3000

With the shipped ``configs/elpv.yaml`` settings, one process, each figure the best of ``--repeats``:

- **backbone + patch features** alone (no decoding), img/s: fp32 and bf16 autocast, whole batches of 32 and
  ``extract_chunk`` 4 (the shipped setting);
- **memory**: read bandwidth of an array in DRAM (1 GiB) and of one the size of the coreset's per-pick
  stream (the int8 head of every point: N x 32 bytes), GB/s, one thread and all threads;
- **search**: the prefix product alone (bf16 and fp32, GFLOP/s, ms per image of 784 patches), the pruned
  kernel alone (ms per image), the whole exact search and FAISS flat (ms per image), on the object's bank;
- **coreset**: ms per pick of the reference's loop (its first ``--reference-picks`` picks), of the fused torch
  loop and of the pruned kernel (its first ``--picks`` picks, and all of them with ``--picks 0``), on the
  object's projected training patches; the pruned kernel's per-pick bytes over the head stream's bandwidth.

Writes JSON to ``benchmarks/results/profile_<date>.json`` and prints tables. Time it on a quiet machine (the
load average is recorded).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import elpv_model_settings, elpv_split, load_average, machine_facts, markdown_table

REPO = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--objects", nargs="+", default=["mono", "poly"])
    parser.add_argument("--picks", type=int, default=12000, help="pruned coreset picks timed (0: the whole loop)")
    parser.add_argument("--reference-picks", type=int, default=30)
    parser.add_argument("--test-images", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    return parser.parse_args(argv)


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def memory_bandwidth(repeats: int, stream_bytes: int) -> dict[str, float]:
    from numba import njit, prange

    @njit(parallel=True, cache=False)
    def read_all(a):  # int64 sum: vectorised, every byte read once
        total = 0
        for i in prange(a.shape[0]):
            total += a[i]
        return total

    @njit(cache=False)
    def read_one(a):
        total = 0
        for i in range(a.shape[0]):
            total += a[i]
        return total

    out: dict[str, float] = {}
    for label, n_bytes in (("dram_1GiB", 1 << 30), ("head_stream", stream_bytes)):
        a = np.ones(n_bytes // 8, dtype=np.int64)
        read_all(a), read_one(a)
        out[f"{label}_all_threads_GBps"] = round(n_bytes / best(lambda a=a: read_all(a), repeats) / 1e9, 1)
        out[f"{label}_one_thread_GBps"] = round(n_bytes / best(lambda a=a: read_one(a), repeats) / 1e9, 1)
    return out


def backbone(settings: dict[str, Any], images: torch.Tensor, repeats: int) -> dict[str, float]:
    from patchcore import PatchCore

    out = {}
    for precision in ("fp32", "bf16"):
        for chunk in (None, 4):
            model = PatchCore(**{**settings, "device": "cpu", "precision": precision, "extract_chunk": chunk})
            features = model._patch_features(refitting=True)
            features(images[:4])
            seconds = best(lambda f=features: f(images), repeats)
            out[f"{precision}_chunk_{chunk or 'whole'}_img_per_s"] = round(len(images) / seconds, 1)
    return out


def search(bank: np.ndarray, queries: np.ndarray, repeats: int) -> dict[str, float]:
    import faiss

    from patchcore.engine.search.pruned_kernel import QUERY_BLOCK, PrunedExactSearch, pruned_knn

    images = len(queries) / 784
    kernel = PrunedExactSearch(bank)
    kernel.search(queries[:QUERY_BLOCK], 1)
    out: dict[str, float] = {"bank_rows": len(bank), "prefix_dim": int(kernel.dim)}
    blocks = [torch.from_numpy(queries[s : s + QUERY_BLOCK]) for s in range(0, len(queries), QUERY_BLOCK)]
    flops = 2.0 * len(queries) * len(bank) * kernel.dim
    prefix_bf16 = kernel.bank_prefix_bf16
    projected = [(b - kernel.mean32) @ kernel.basis for b in blocks]
    if prefix_bf16 is not None:
        reduced = [p.to(torch.bfloat16) for p in projected]
        seconds = best(lambda: [r @ prefix_bf16.T for r in reduced], repeats)
        out["prefix_product_bf16_GFLOPs"] = round(flops / seconds / 1e9, 1)
        out["prefix_product_bf16_ms_per_image"] = round(1000 * seconds / images, 2)
    bank_prefix = kernel.bank_prefix
    seconds = best(lambda: [p @ bank_prefix.T for p in projected], repeats)
    out["prefix_product_fp32_GFLOPs"] = round(flops / seconds / 1e9, 1)
    out["prefix_product_fp32_ms_per_image"] = round(1000 * seconds / images, 2)
    inputs = [(b.numpy(), *kernel._block_inputs(b)) for b in blocks]

    def kernel_only():
        for x, dots, query_sq, margin_q, cross_q in inputs:
            n = len(x)
            pruned_knn(x, kernel.bank, dots, query_sq, kernel.bank_prefix_sq, margin_q, kernel.margin_bank, cross_q,
                       kernel.cross_bank, 1, np.empty((n, 1), np.float32), np.empty((n, 1), np.int64),
                       np.empty(n, np.int64), kernel.mean_np, kernel.reduced_bank, kernel.reduced_residual,
                       np.empty(n, np.int64))  # fmt: skip

    out["pruned_kernel_only_ms_per_image"] = round(1000 * best(kernel_only, repeats) / images, 2)
    out["pruned_search_ms_per_image"] = round(1000 * best(lambda: kernel.search(queries, 1), repeats) / images, 2)
    out["screened_per_query"] = round(kernel.last_screened_fraction * len(bank), 1)
    out["exact_per_query"] = round(kernel.last_exact_fraction * len(bank), 2)
    flat = faiss.IndexFlatL2(bank.shape[1])
    flat.add(bank)
    out["faiss_flat_ms_per_image"] = round(1000 * best(lambda: flat.search(queries, 1), repeats) / images, 2)
    return out


def coreset(z: torch.Tensor, args: argparse.Namespace, stream_gbps: float) -> dict[str, Any]:
    from patchcore.engine.coreset import (
        coreset_size,
        greedy_select,
        prefix_bound_data,
        reference_greedy_select,
        start_distances,
    )

    rng = np.random.default_rng(0)
    start_points = rng.choice(len(z), 10, replace=False)
    d0 = start_distances(z, start_points)
    out: dict[str, Any] = {"points": len(z), "picks_of_a_10_percent_fit": coreset_size(len(z), 0.1)}
    seconds = best(lambda: reference_greedy_select(z, args.reference_picks, start_points), 1)
    out["reference_ms_per_pick"] = round(1000 * seconds / args.reference_picks, 2)
    fused_picks = max(10, args.reference_picks)
    seconds = best(lambda: greedy_select(z, fused_picks, d0.clone(), method="fused"), 1)
    out["fused_ms_per_pick"] = round(1000 * seconds / fused_picks, 3)
    picks = args.picks or out["picks_of_a_10_percent_fit"]
    start = time.perf_counter()
    bound = prefix_bound_data(z)
    out["prefix_data_seconds"] = round(time.perf_counter() - start, 2)
    greedy_select(z[:20000], 50, d0[:20000].clone(), method="pruned")  # compiled / loaded before timing
    stats: dict[str, Any] = {}
    start = time.perf_counter()
    greedy_select(z, picks, d0.clone(), method="pruned", stats=stats)
    seconds = time.perf_counter() - start
    out["pruned_picks_timed"] = picks
    out["pruned_ms_per_pick"] = round(1000 * seconds / picks, 3)  # includes its prefix data (above)
    out["pruned_loop_ms_per_pick"] = round(1000 * max(0.0, seconds - out["prefix_data_seconds"]) / picks, 3)
    out["pruned_exact_fraction"] = stats.get("exact_fraction")
    out["reference_over_pruned"] = round(out["reference_ms_per_pick"] / out["pruned_ms_per_pick"], 1)
    out["reference_over_pruned_loop"] = round(out["reference_ms_per_pick"] / max(out["pruned_loop_ms_per_pick"], 1e-9), 1)
    head_bytes = bound["q_head"].nbytes + 3 * 4 * len(z)  # head + reach terms + live head norm, per pick
    out["head_stream_bytes_per_pick"] = head_bytes
    out["head_stream_floor_ms_per_pick"] = round(1000 * head_bytes / (stream_gbps * 1e9), 3)
    return out


def extract(settings: dict[str, Any], paths: list[str]) -> np.ndarray:
    from patchcore import PatchCore

    model = PatchCore(**{**settings, "device": "cpu"})
    features = model._patch_features(refitting=True)
    return np.concatenate([features(batch)[0].numpy() for batch in model._batches(paths)])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = dt.datetime.now(dt.UTC)
    settings = elpv_model_settings()
    report: dict[str, Any] = {"benchmark": "bench_profile", "started_utc": started.isoformat(timespec="seconds"),
                              "command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": machine_facts(),
                              "load_average_start": load_average(), "objects": {}}  # fmt: skip
    from patchcore import PatchCore
    from patchcore.engine.coreset import project, random_projection

    for name in args.objects:
        train, test = elpv_split(name)

        def say(text: str, name: str = name) -> None:
            print(f"[{name}] {text}", file=sys.stderr, flush=True)

        say("extracting training patches")
        rows = extract(settings, [str(s.image_path) for s in train])
        z = project(rows, random_projection(rows.shape[1], 128, np.random.default_rng(0)))
        entry: dict[str, Any] = {}
        if not report.get("memory"):
            say("memory bandwidth")
            report["memory"] = memory_bandwidth(args.repeats, len(z) * 32)
        if not report.get("backbone"):
            say("backbone alone")
            model = PatchCore(**{**settings, "device": "cpu"})
            batch = next(iter(model._batches([str(s.image_path) for s in test[:32]])))
            report["backbone"] = backbone(settings, batch, args.repeats)
        say("coreset")
        stream = report["memory"]["head_stream_all_threads_GBps"]
        entry["coreset"] = coreset(z, args, stream)
        say("search")
        model = PatchCore(**{**settings, "device": "cpu"})
        grid = int(round((len(rows) / len(train)) ** 0.5))
        model.fit_features(rows, {"n_images": len(train), "patch_grid": [grid, grid],
                                  "input_size": [settings["imagesize"]] * 2, "n_rows": len(rows), "dim": rows.shape[1]})
        bank = np.ascontiguousarray(np.asarray(model.memory_bank_), dtype=np.float32)
        step = max(1, len(test) // args.test_images)
        queries = extract(settings, [str(s.image_path) for s in test[::step][: args.test_images]])
        entry["search"] = search(bank, queries, args.repeats)
        report["objects"][name] = entry
        del rows, z
    report["load_average_end"] = load_average()
    print_tables(report)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"profile_{started.strftime('%Y-%m-%dT%H%M')}.json"
    path.write_text(json.dumps(report, indent=1, default=str))
    print(f"\nwritten {path}", file=sys.stderr)
    return 0


def print_tables(report: dict[str, Any]) -> None:
    print(markdown_table(["figure", "value"], [[k, v] for k, v in report["backbone"].items()], "lr"))
    print()
    print(markdown_table(["figure", "value"], [[k, v] for k, v in report["memory"].items()], "lr"))
    for name, entry in report["objects"].items():
        for part in ("coreset", "search"):
            print(f"\n{name} {part}")
            print(markdown_table(["figure", "value"], [[k, v] for k, v in entry[part].items()], "lr"))
    print(f"\nload average {report['load_average_start']} -> {report['load_average_end']}")


if __name__ == "__main__":
    raise SystemExit(main())
