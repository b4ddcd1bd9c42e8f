"""The bank size, a user's biggest lever: fit time, predict rate and image AUROC at several coreset
percentages, measured the way a user meets them: ``patchcore train`` with the shipped ``configs/elpv.yaml``
(both objects, evaluation on, as README's first command), one run per percentage, ``model.percentage``
the only override.

    PYTHONPATH=src .venv/bin/python benchmarks/bench_banksize.py                 # 10 %, 5 %, 1 %
    PYTHONPATH=src .venv/bin/python benchmarks/bench_banksize.py --percentages 0.1 0.01 --objects mono

Per object it reads ``summary.json``: fit phases (extraction, coreset, index), the test split's scoring time
(``predict_seconds``: backbone, search and maps of every test image, as the evaluation runs it) and the
image AUROC. The wall clock of each whole command is printed too (set-up, both objects, reports). Prints a
Markdown table and writes JSON to ``benchmarks/results/banksize_<date>.json``. Time it on a quiet machine:
the load average is recorded at start and end of every run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import load_average, machine_facts, markdown_table

REPO = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--percentages", type=float, nargs="+", default=[0.1, 0.05, 0.01])
    parser.add_argument("--objects", nargs="+", default=["mono", "poly"])
    parser.add_argument("--config", default=str(REPO / "configs" / "elpv.yaml"))
    parser.add_argument("--override", nargs="*", default=[], help="more KEY=VALUE overrides for every run")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    return parser.parse_args(argv)


def run_once(percentage: float, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    out = workdir / f"p{percentage}"
    command = [
        sys.executable, "-m", "patchcore.app.cli", "train", "-c", args.config, f"output_dir={out}",
        f"data.objects=[{','.join(args.objects)}]", f"model.percentage={percentage}", *args.override, "--no-progress",
    ]  # fmt: skip
    start_load = load_average()
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=workdir, capture_output=True)
    wall = time.perf_counter() - start
    (summary_file,) = list(out.rglob("summary.json"))
    summary = json.loads(summary_file.read_text())
    objects = []
    for entry in summary["objects"]:
        stats, metrics = entry.get("stats", {}), entry.get("metrics", {})
        fit = sum(stats.get(k) or 0.0 for k in ("extract_seconds", "coreset_seconds", "index_seconds"))
        n_test, predict = stats.get("n_test_images"), stats.get("predict_seconds")
        objects.append(
            {
                "object": entry["object"],
                "memory_size": stats.get("memory_size"),
                "n_patches": stats.get("n_patches"),
                "fit_seconds": round(fit, 2),
                **{k: stats.get(k) for k in ("extract_seconds", "coreset_seconds", "index_seconds")},
                "n_test_images": n_test,
                "predict_seconds": predict,
                "predict_images_per_second": round(n_test / predict, 2) if n_test and predict else None,
                "image_auroc": metrics.get("image_auroc"),
            }
        )
    return {"percentage": percentage, "command": " ".join(command[1:]), "wall_seconds": round(wall, 1),
            "load_average_start": start_load, "load_average_end": load_average(), "objects": objects}  # fmt: skip


def table(runs: list[dict[str, Any]]) -> str:
    rows = []
    for run in runs:
        for o in run["objects"]:
            auroc = o["image_auroc"]
            rows.append([
                o["object"], f"{100 * run['percentage']:g} %", o["memory_size"], o["fit_seconds"], o["coreset_seconds"],
                o["predict_images_per_second"], f"{100 * auroc:.2f}" if isinstance(auroc, (int, float)) else "n/a",
                f"{run['wall_seconds']:.0f} (load {run['load_average_start'][0]} -> {run['load_average_end'][0]})",
            ])  # fmt: skip
    return markdown_table(
        ["object", "coreset", "bank rows", "fit s", "of which coreset s", "test img/s", "image AUROC",
         "whole command s (both objects)"],
        rows, "llrrrrrl",
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = dt.datetime.now(dt.UTC)
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-banksize-") as tmp:
        for percentage in args.percentages:
            print(f"patchcore train, model.percentage={percentage} ...", file=sys.stderr, flush=True)
            runs.append(run_once(percentage, args, Path(tmp)))
    report = {"benchmark": "bench_banksize", "started_utc": started.isoformat(timespec="seconds"),
              "command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": machine_facts(), "runs": runs}  # fmt: skip
    text = table(runs)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"banksize_{started.strftime('%Y-%m-%dT%H%M')}.json"
    path.write_text(json.dumps(report, indent=1))
    print(f"\nwritten {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
