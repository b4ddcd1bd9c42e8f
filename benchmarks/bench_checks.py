"""What the safety checks of issue 12 cost, and the determinism contract across thread counts.

    python benchmarks/bench_checks.py [--out benchmarks/results/checks.json]

Measures: the up-front header check of every image of the ELPV data set (bundled, offline), the SHA-256
verification of a feature cache entry (MiB/s), and a random-weight ResNet-18 fit + predict with torch and
FAISS threads 1 vs 2 (bit-identical within one thread count, the largest relative score difference across).
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from patchcore import PatchCore
from patchcore.app.config import load_config
from patchcore.app.train import build_model, check_objects, load_objects

ROOT = Path(__file__).resolve().parents[1]


def header_check() -> dict[str, float]:
    config = load_config(ROOT / "configs" / "elpv.yaml")
    objects = load_objects(config)
    n = sum(len(o.train) + len(o.test) for o in objects)
    t0 = time.perf_counter()
    check_objects(objects, build_model(config), train=True, test=True)
    seconds = time.perf_counter() - t0
    return {"images": n, "seconds": round(seconds, 3), "ms_per_image": round(1000 * seconds / n, 3)}


def checksum(mib: int = 256) -> dict[str, float]:
    data = np.random.default_rng(0).standard_normal(mib * 2**20 // 4).astype(np.float32)
    with tempfile.NamedTemporaryFile(delete=False) as handle:
        handle.write(data.tobytes())
        path = handle.name
    try:
        t0 = time.perf_counter()
        with open(path, "rb") as handle:
            hashlib.file_digest(handle, "sha256")
        seconds = time.perf_counter() - t0
    finally:
        os.unlink(path)
    return {"mib": mib, "seconds": round(seconds, 3), "mib_per_s": round(mib / seconds)}


def determinism() -> dict[str, float | bool]:
    g = torch.Generator().manual_seed(0)
    train = torch.randn(12, 3, 128, 128, generator=g)
    queries = torch.randn(4, 3, 128, 128, generator=g)
    runs = []
    for threads in (1, 1, 2):
        torch.set_num_threads(threads)
        model = PatchCore(
            backbone="resnet18", weights="random", resize=128, imagesize=128, device="cpu", percentage=0.1,
            search_threads=threads,
        ).fit(train)  # fmt: skip
        runs.append((model.memory_bank_, model.predict(queries)))
    (bank1, p1), (bank1b, p1b), (bank2, p2) = runs
    return {
        "same_threads_bank_identical": bool(np.array_equal(bank1, bank1b)),
        "same_threads_scores_identical": bool(np.array_equal(p1.patch_scores, p1b.patch_scores)),
        "threads_1_vs_2_bank_identical": bool(np.array_equal(bank1, bank2)),
        "threads_1_vs_2_max_rel_patch_score": float(np.max(np.abs(p1.patch_scores - p2.patch_scores) / p1.patch_scores)),
        "threads_1_vs_2_max_rel_image_score": float(np.max(np.abs(p1.image_scores - p2.image_scores) / p1.image_scores)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "checks.json"))
    args = parser.parse_args()
    results = {"header_check": header_check(), "checksum": checksum(), "determinism": determinism()}
    for section, values in results.items():
        for key, value in values.items():
            print(f"{section:<14} {key:<36} {value}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
