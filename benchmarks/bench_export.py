"""Exported model vs PyTorch: images/s of the estimator (torch: its own index; torch_flat: FAISS's flat
index, brute force like the graph), ONNX Runtime and OpenVINO on the same images in one run, and the
parity of their outputs (max relative difference of image scores and maps).

    python benchmarks/bench_export.py --model results/elpv/effnetlite0_224/models/patchcore_mono.pt
    python benchmarks/bench_export.py --model M --images 64 --batch-size 8 --threads 1
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--object", default="mono", help="ELPV cells whose test images are scored")
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument(
        "--threads", type=int, default=None, help="intra-op threads for all three (default: each's own)"
    )
    p.add_argument(
        "--repeats", type=int, default=2, help="timed passes over the images (after one warm-up batch)"
    )
    p.add_argument("--chunk", type=int, default=4096, help="bank rows per distance block in the graph")
    p.add_argument("--out", type=Path, default=None)
    return p.parse_args(argv)


def _rel(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from patchcore.data import load_dataset
    from patchcore.deploy.export import export_model
    from patchcore.deploy.inference import Predictor
    from patchcore.deploy.runtimes import load_exported
    from patchcore.fileio import atomic_write_json

    if args.threads:
        torch.set_num_threads(args.threads)
    (data,) = load_dataset("elpv", None, [args.object])
    samples = data.test[:: max(1, len(data.test) // args.images)][: args.images]
    predictor = Predictor.load(args.model, device="cpu")
    from PIL import Image

    tensors = predictor.to_tensors([Image.open(s.image_path) for s in samples])
    batches = [torch.stack(tensors[i : i + args.batch_size]) for i in range(0, len(tensors), args.batch_size)]
    result: dict[str, Any] = {
        "created": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_start": os.getloadavg()},
        "model": str(args.model),
        "settings": {k: str(v) for k, v in vars(args).items()},
        "bank_rows": int(len(predictor.model.memory_bank_)),
        "index_kind": predictor.model.index_kind,
        "runtimes": {},
    }
    with tempfile.TemporaryDirectory(prefix="patchcore-export-") as tmp:
        t0 = time.perf_counter()
        export_model(args.model, "onnx", Path(tmp) / "onnx", chunk=args.chunk)
        result["export_onnx_seconds"] = round(time.perf_counter() - t0, 2)
        t0 = time.perf_counter()
        export_model(args.model, "openvino", Path(tmp) / "openvino", chunk=args.chunk)
        result["export_openvino_seconds"] = round(time.perf_counter() - t0, 2)
        # Like for like with the graph (which computes every bank distance): the estimator with FAISS's flat
        # index, as well as with the model's own (pruned exact) index.
        flat = Predictor.load(args.model, device="cpu")
        flat.model.set_params(index_kind="flat")
        backends = {
            "torch": predictor.backend,
            "torch_flat": flat.backend,
            "onnxruntime": load_exported(Path(tmp) / "onnx", "onnx", args.threads),
            "openvino": load_exported(Path(tmp) / "openvino", "openvino", args.threads),
        }
        outputs: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for name, backend in backends.items():
            backend.score(batches[0])  # warm-up: lazy builds, kernel selection
            scores, maps = [], []
            t0 = time.perf_counter()
            for repeat in range(args.repeats):
                for batch in batches:
                    s, m = backend.score(batch)
                    if repeat == 0:
                        scores.append(np.asarray(s))
                        maps.append(np.asarray(m))
            seconds = time.perf_counter() - t0
            outputs[name] = (np.concatenate(scores), np.concatenate(maps))
            n = len(tensors) * args.repeats
            result["runtimes"][name] = {
                "images": n,
                "seconds": round(seconds, 3),
                "images_per_s": round(n / seconds, 2),
            }
            print(name, result["runtimes"][name], flush=True)
    ref_scores, ref_maps = outputs["torch"]
    for name, (scores, maps) in outputs.items():
        entry = result["runtimes"][name]
        entry["score_max_rel_diff"] = _rel(scores, ref_scores)
        entry["map_max_rel_diff"] = _rel(maps, ref_maps)
        entry["speed_vs_torch"] = round(
            entry["images_per_s"] / result["runtimes"]["torch"]["images_per_s"], 3
        )
    result["machine"]["load_end"] = os.getloadavg()
    out = args.out or ROOT / "out" / f"export_{args.object}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, result)
    print(
        f"\nexport benchmark: {len(tensors)} ELPV {args.object} test images x {args.repeats}, batch {args.batch_size}, "
        f"threads {args.threads or 'default'}, bank {result['bank_rows']} rows; load avg at start {result['machine']['load_start']}"
    )
    print("| runtime | images/s | vs torch | max rel diff scores | max rel diff maps |")
    print("|---|---|---|---|---|")
    for name, e in result["runtimes"].items():
        print(
            f"| {name} | {e['images_per_s']} | {e['speed_vs_torch']} | {e['score_max_rel_diff']:.2e} | {e['map_max_rel_diff']:.2e} |"
        )
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
