"""The GPU path, checked against the CPU: fit and predict on CUDA and on the CPU, compare the scores, time both.

    PYTHONPATH=src .venv/bin/python benchmarks/gpu_check.py                      # ELPV mono, shipped settings
    PYTHONPATH=src .venv/bin/python benchmarks/gpu_check.py --train-limit 64 --test-limit 64
    PYTHONPATH=src .venv/bin/python benchmarks/gpu_check.py --device cpu --imagesize 64   # the same code, no GPU

With the shipped ``configs/elpv.yaml`` model settings (EfficientNet-Lite0, exact search), on ``--device``
(default ``cuda``) and on the CPU:

1. fit on each device (extraction, coreset and index build on that device: the exact search is the
   ``torch`` kind on CUDA, FAISS-GPU where installed, the pruned kernel on the CPU), timed;
2. the CPU-fitted model scores the test images on both devices: the same bank, so the image scores must
   agree to ``--tolerance`` (relative, default 1e-4; the GPU's float32/TF32 products are re-ranked in
   float64, so the neighbours are the same and only the backbone's rounding differs);
3. the device-fitted model against the CPU-fitted one: whether the coreset picked the same rows (the
   backbone's rounding on the GPU can move a near-tie), and the largest image-score difference.

Exit status 0 when step 2 agrees, 1 when it does not, 3 when the device is absent (nothing measured). Prints
a Markdown table and writes JSON to ``benchmarks/results/gpu_check_<date>.json``. ``--device cpu`` runs the
whole script on the CPU against itself (CI keeps it working where there is no GPU: tests/test_benchmarks.py).
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
from _common import elpv_model_settings, elpv_split, load_average, machine_facts, markdown_table

REPO = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="the device to check against the CPU (cuda, cuda:N)")
    parser.add_argument("--object", default="mono", choices=["mono", "poly"])
    parser.add_argument("--train-limit", type=int, default=None)
    parser.add_argument("--test-limit", type=int, default=None)
    parser.add_argument("--imagesize", type=int, default=None, help="override the config's (resize = 8/7 of it)")
    parser.add_argument("--tolerance", type=float, default=1e-4)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    return parser.parse_args(argv)


def _device_available(device: str) -> bool:
    import torch

    if device == "cpu":
        return True
    return device.startswith("cuda") and torch.cuda.is_available()


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _fit(settings: dict[str, Any], device: str, paths: list[str]) -> tuple[Any, float]:
    from patchcore import PatchCore

    model = PatchCore(**{**settings, "device": device})
    start = time.perf_counter()
    model.fit(paths)
    _sync(device)
    return model, time.perf_counter() - start


def _score(model: Any, device: str, paths: list[str]) -> tuple[np.ndarray, float]:
    model.set_params(device=device)
    model.score(paths[:2])  # warm-up: the extractor and index are built on first use
    _sync(device)
    start = time.perf_counter()
    scores = model.score(paths)
    _sync(device)
    return np.asarray(scores, dtype=np.float64), time.perf_counter() - start


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-12)))


def check(args: argparse.Namespace) -> dict[str, Any]:
    settings = elpv_model_settings()
    if args.imagesize is not None:
        settings.update(imagesize=args.imagesize, resize=round(args.imagesize * 8 / 7))
    train, test = elpv_split(args.object, args.train_limit, args.test_limit)
    train_paths = [str(s.image_path) for s in train]
    test_paths = [str(s.image_path) for s in test]
    result: dict[str, Any] = {"device": args.device, "object": args.object, "train_images": len(train_paths),
                              "test_images": len(test_paths), "settings": settings, "load_average_start": load_average()}  # fmt: skip
    cpu_model, cpu_fit = _fit(settings, "cpu", train_paths)
    device_model, device_fit = _fit(settings, args.device, train_paths)
    cpu_scores, cpu_predict = _score(cpu_model, "cpu", test_paths)
    same_bank_scores, device_predict = _score(cpu_model, args.device, test_paths)
    device_scores, _ = _score(device_model, "cpu", test_paths)
    agree = _relative(same_bank_scores, cpu_scores)
    result.update(
        fit_seconds={"cpu": round(cpu_fit, 2), args.device: round(device_fit, 2)},
        predict_images_per_second={"cpu": round(len(test_paths) / cpu_predict, 2),
                                   args.device: round(len(test_paths) / device_predict, 2)},  # fmt: skip
        same_bank_max_relative_score_difference=agree,
        same_bank_agrees=bool(agree <= args.tolerance),
        device_fit_same_rows=bool(
            device_model.memory_bank_.shape == cpu_model.memory_bank_.shape
            and np.array_equal(np.asarray(device_model.memory_bank_), np.asarray(cpu_model.memory_bank_))
        ),
        device_fit_max_relative_score_difference=_relative(device_scores, cpu_scores),
        load_average_end=load_average(),
    )
    return result


def table(result: dict[str, Any], tolerance: float) -> str:
    device = result["device"]
    rows = [
        ["fit s", result["fit_seconds"]["cpu"], result["fit_seconds"][device], ""],
        ["predict img/s (warm)", result["predict_images_per_second"]["cpu"],
         result["predict_images_per_second"][device], ""],  # fmt: skip
        ["same bank: max relative image-score difference", "", f"{result['same_bank_max_relative_score_difference']:.2e}",
         f"<= {tolerance:g}: {'yes' if result['same_bank_agrees'] else 'NO'}"],  # fmt: skip
        ["fitted on the device: same bank rows as the CPU's", "", str(result["device_fit_same_rows"]), ""],
        ["fitted on the device: max relative image-score difference", "",
         f"{result['device_fit_max_relative_score_difference']:.2e}", ""],  # fmt: skip
    ]
    return markdown_table(["figure", "cpu", device, "check"], rows, "lrrl")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not _device_available(args.device):
        print(f"gpu_check: device {args.device!r} is not available here (torch sees no CUDA device); nothing measured",
              file=sys.stderr)  # fmt: skip
        return 3
    started = dt.datetime.now(dt.UTC)
    result = check(args)
    report = {"benchmark": "gpu_check", "started_utc": started.isoformat(timespec="seconds"),
              "command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": machine_facts(), **result}  # fmt: skip
    print(table(result, args.tolerance))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"gpu_check_{args.device.replace(':', '')}_{started.strftime('%Y-%m-%dT%H%M')}.json"
    path.write_text(json.dumps(report, indent=1, default=str))
    print(f"\nwritten {path}", file=sys.stderr)
    return 0 if result["same_bank_agrees"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
