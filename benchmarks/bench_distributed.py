"""Benchmark the scale-out modes: objects as Ray tasks, sharded fit of one object, federated clients.

Everything runs on this machine with a local Ray cluster (``--cpus`` CPUs, default 2). Three parts:

- ``objects``: ``patchcore train`` of every object locally (one after another) and with ``--ray`` (objects
  as tasks, one CPU each); wall clock, largest bank difference, metric differences.
- ``shards``: one object fitted on one machine (the approximate greedy coreset over all patch features)
  against ``execution.shards`` N = 1, 2, 4 (local coresets of ``percentage x oversampling`` per shard,
  one greedy pass over their union): covering radius of the final bank over ALL training patch features
  (full feature space) and its ratio to the single-machine bank's, image / pixel AUROC differences, wall
  clock on the local cluster, and the time N machines would take, modelled from the measured per-shard
  times (the slowest shard's extraction + local coreset, plus the driver's merge).
- ``federated``: centralised vs federated image AUROC / AUC-sPRO / pixel AUROC on the same test split, per
  partition (iid over K clients, by_category).

Data: the ELPV cells bundled with ``elpv-dataset`` (no masks) and, for pixel metrics, a generated data set
in the MVTec AD layout (``--synthetic``: textured parts with painted defects and their masks; no real
masked data set is available offline). Prints tables and writes JSON to ``benchmarks/results/``.

    PYTHONPATH=src python benchmarks/bench_distributed.py --imagesize 112
    PYTHONPATH=src python benchmarks/bench_distributed.py --parts shards --datasets synthetic   # quick
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import load_average, markdown_table
from PIL import Image

from patchcore.app.cmd_federated import federated
from patchcore.app.config import Config, config_from_dict
from patchcore.app.train import SampleImages, build_model, evaluation_settings, load_objects, train
from patchcore.distributed.ray_runner import RayOptions, run_ray
from patchcore.distributed.sharded import sharded_fit
from patchcore.engine.store import FeatureStore
from patchcore.evaluation.evaluate import evaluate_object
from patchcore.fileio import atomic_write_json

ROOT = Path(__file__).resolve().parent
METRICS = ("image_auroc", "pixel_auroc", "au_pro")


# --------------------------------------------------------------------------- data


def _texture(size: int, rng: np.random.Generator) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    fx, fy, phase = rng.uniform(0.15, 0.35), rng.uniform(0.1, 0.3), rng.uniform(0, 6.28)
    base = 120 + 35 * np.sin(x * fx + phase) * np.cos(y * fy) + 15 * np.sin((x + y) * 0.05)
    base = base + rng.normal(0, 4, (size, size))
    return np.stack([base, base * 0.95, base * 0.85], -1)


def make_synthetic(root: Path, size: int = 96, n_train: int = 120, n_test: int = 40, seed: int = 0) -> Path:
    """An MVTec-layout object ``parts``: striped textures; defects are blobs and scratches with masks."""
    rng = np.random.default_rng(seed)
    d = root / "parts"
    for i in range(n_train):
        _save(d / "train" / "good" / f"{i:03d}.png", _texture(size, rng))
    for i in range(n_test):
        _save(d / "test" / "good" / f"{i:03d}.png", _texture(size, rng))
        image, mask = _texture(size, rng), np.zeros((size, size), np.uint8)
        y, x = np.mgrid[0:size, 0:size]
        cy, cx = rng.uniform(15, size - 15, 2)
        if i % 2 == 0:  # a blob, brighter or darker
            r = rng.uniform(4, 10)
            region = (y - cy) ** 2 + (x - cx) ** 2 < r * r
        else:  # a thin scratch
            angle = rng.uniform(0, np.pi)
            dist = np.abs((x - cx) * np.sin(angle) - (y - cy) * np.cos(angle))
            along = np.abs((x - cx) * np.cos(angle) + (y - cy) * np.sin(angle))
            region = (dist < 1.5) & (along < rng.uniform(10, 25))
        image[region] += rng.choice([-1, 1]) * rng.uniform(15, 45)
        mask[region] = 255
        label = "blob" if i % 2 == 0 else "scratch"
        _save(d / "test" / label / f"{i:03d}.png", image)
        Image.fromarray(mask).save(_mkdir(d / "ground_truth" / label) / f"{i:03d}_mask.png")
    return root


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _save(path: Path, array: np.ndarray) -> None:
    _mkdir(path.parent)
    Image.fromarray(np.clip(array, 0, 255).astype(np.uint8)).save(path)


def make_config(dataset: str, data_root: Path, out: Path, imagesize: int, **sections: dict) -> Config:
    data = {"kind": "elpv", "root": None, "num_workers": 0}
    if dataset == "synthetic":
        data = {"kind": "folder", "root": str(data_root), "num_workers": 0}
    config = {
        "project": "bench",
        "group": dataset,
        "seed": 0,
        "output_dir": str(out),
        "data": data,
        "model": {
            "backbone": "efficientnet-lite0",
            "layers": ["_blocks.4", "_blocks.10"],
            "resize": round(imagesize * 256 / 224),
            "imagesize": imagesize,
            "percentage": 0.1,
            "index_kind": "flat",
        },
        "evaluation": {"heatmaps": 0},
        "logging": {"progress": False, "level": "WARNING"},
    }
    for key, values in sections.items():
        config.setdefault(key, {}).update(values)
    return config_from_dict(config, f"<bench {dataset}>")


# --------------------------------------------------------------------------- parts


def bench_objects(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """ELPV mono + poly: local (one after another) vs Ray (one task per object)."""
    rows = {}
    for engine in ("local", "ray"):
        config = make_config("elpv", Path(), out, args.imagesize, execution={"engine": engine})
        config.group = f"objects_{engine}"
        t0 = time.perf_counter()
        summary = train(config)
        rows[engine] = {"seconds": time.perf_counter() - t0, "run_dir": str(summary.run_dir)}
        rows[engine]["metrics"] = {r.name: r.metrics for r in summary.results}
        rows[engine]["banks"] = {r.name: r.model_path for r in summary.results}
    diffs = {}
    for name, path in rows["local"]["banks"].items():
        a = torch.load(path, weights_only=True)["memory_bank"]
        b = torch.load(rows["ray"]["banks"][name], weights_only=True)["memory_bank"]
        diffs[name] = {
            "bank_rows": [len(a), len(b)],
            "bank_max_abs_diff": float((a - b).abs().max()) if a.shape == b.shape else None,
            "metric_diff": {
                k: _diff(rows["ray"]["metrics"][name].get(k), rows["local"]["metrics"][name].get(k))
                for k in rows["local"]["metrics"][name]
            },
        }
    return {
        "local_seconds": rows["local"]["seconds"],
        "ray_seconds": rows["ray"]["seconds"],
        "speedup": rows["local"]["seconds"] / rows["ray"]["seconds"],
        "objects": diffs,
        "metrics_local": rows["local"]["metrics"],
    }


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _warm(_: int) -> int:
    """Imports the engine in a Ray worker, so that timed tasks find warm workers."""
    import patchcore.engine.model  # noqa: F401

    return os.getpid()


def _radius(features: Any, bank: np.ndarray, chunk: int = 16384) -> float:
    """max over all patch features of the Euclidean distance to the nearest bank vector (exact)."""
    import faiss

    index = faiss.IndexFlatL2(bank.shape[1])
    index.add(np.ascontiguousarray(bank, dtype=np.float32))
    radius = 0.0
    for start in range(0, len(features), chunk):
        distances, _ = index.search(np.ascontiguousarray(features[start : start + chunk]), 1)
        radius = max(radius, float(np.sqrt(max(distances.max(), 0.0))))
    return radius


def bench_shards(args: argparse.Namespace, dataset: str, data_root: Path, out: Path) -> dict[str, Any]:
    config = make_config(dataset, data_root, out, args.imagesize)
    obj = next(o for o in load_objects(config) if o.name == ("mono" if dataset == "elpv" else "parts"))
    settings = evaluation_settings(config)
    work = Path(tempfile.mkdtemp(prefix="bench-shards-"))
    result: dict[str, Any] = {"object": obj.name, "n_train": len(obj.train), "n_test": len(obj.test)}
    try:
        model = build_model(config)
        images = SampleImages(obj.train, model.transform, config.model.batch_size, 0)
        t0 = time.perf_counter()
        store = FeatureStore(work / "features.f32")
        meta = model.extract_features(images, store)
        features = store.array()
        meta.update(n_rows=len(features), dim=features.shape[1])
        t1 = time.perf_counter()
        model.fit_features(features, meta)
        t2 = time.perf_counter()
        metrics, _, _ = evaluate_object(model, obj, work / "single", settings)
        single_radius = _radius(features, model.memory_bank_)
        result["single"] = {
            "extract_seconds": t1 - t0,
            "coreset_seconds": t2 - t1,
            "fit_seconds": t2 - t0,
            "bank": len(model.memory_bank_),
            "n_patches": len(features),
            "radius": single_radius,
            "metrics": metrics,
        }
        print(
            f"  {dataset} single: {result['single']['fit_seconds']:.1f} s, radius {single_radius:.4f}",
            flush=True,
        )
        options = RayOptions(num_cpus=1, retries=0)
        run_ray(_warm, list(range(2 * args.cpus)), options)
        for n in args.shards:
            shard_model = build_model(config)
            bounds = [round(i * len(obj.train) / n) for i in range(n + 1)]
            parts = [
                SampleImages(obj.train[a:b], shard_model.transform, config.model.batch_size, 0)
                for a, b in zip(bounds[:-1], bounds[1:], strict=True)
            ]
            t0 = time.perf_counter()
            sharded_fit(shard_model, parts, lambda f, items: run_ray(f, items, options), args.oversampling)
            wall = time.perf_counter() - t0
            stats = shard_model.stats_
            radius = _radius(features, shard_model.memory_bank_)
            m, _, _ = evaluate_object(shard_model, obj, work / f"shards{n}", settings)
            per_shard = [
                e + c
                for e, c in zip(stats.shard_extract_seconds, stats.shard_coreset_seconds, strict=True)
            ]
            result[f"shards_{n}"] = {
                "wall_seconds": wall,
                "shard_seconds": per_shard,
                "merge_seconds": stats.merge_seconds,
                "modelled_n_machines_seconds": max(per_shard) + stats.merge_seconds,
                "union_size": stats.union_size,
                "bank": len(shard_model.memory_bank_),
                "radius": radius,
                "radius_ratio": radius / single_radius,
                "metrics": m,
                "metric_diff": {k: _diff(m.get(k), metrics.get(k)) for k in metrics},
            }
            print(
                f"  {dataset} shards={n}: {wall:.1f} s, radius ratio {radius / single_radius:.4f}", flush=True
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return result


def bench_federated(
    args: argparse.Namespace, dataset: str, data_root: Path, out: Path
) -> list[dict[str, Any]]:
    plans = [("iid", {"clients": k}) for k in args.clients]
    if dataset == "elpv":
        plans.append(("by_category", {}))
    rows = []
    for partition, extra in plans:
        objects = None if partition == "by_category" else (["mono"] if dataset == "elpv" else None)
        config = make_config(
            dataset, data_root, out, args.imagesize,
            data={"objects": objects},
            federated={
                "partition": partition, "local_percentage": 0.1 * args.oversampling, "weighted": args.weighted,
                "noise_epsilon": args.noise_epsilon, "noise_clip": args.noise_clip, **extra,
            },
        )  # fmt: skip
        config.group = f"fed_{dataset}_{partition}{extra.get('clients', '')}"
        t0 = time.perf_counter()
        report = federated(config)
        seconds = time.perf_counter() - t0
        for row in json.loads((report.parent / "federated.json").read_text())["rows"]:
            row["seconds"] = seconds
            row["dataset"] = dataset
            rows.append(row)
        print(f"  {dataset} federated {partition} {extra}: {seconds:.1f} s", flush=True)
    return rows


# --------------------------------------------------------------------------- report


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}"


def _pp(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:+.2f}"


def print_tables(results: dict[str, Any]) -> str:
    lines = []
    if "objects" in results:
        o = results["objects"]
        lines += [
            "## Objects in parallel (ELPV mono + poly)",
            "",
            "| engine | wall s | speed-up | max bank diff | image AUROC diff |",
            "|---|---:|---:|---:|---:|",
        ]
        diffs = ", ".join(f"{k} {d['bank_max_abs_diff']:.2g}" for k, d in o["objects"].items())
        auroc = ", ".join(f"{k} {_pp(d['metric_diff'].get('image_auroc'))}" for k, d in o["objects"].items())
        lines.append(f"| local (in turn) | {o['local_seconds']:.1f} | 1.00 | | |")
        lines.append(f"| ray (2 tasks) | {o['ray_seconds']:.1f} | {o['speedup']:.2f} | {diffs} | {auroc} |")
        lines.append("")
    for dataset, r in results.get("shards", {}).items():
        s = r["single"]
        lines += [
            f"## Sharded fit: {dataset} {r['object']} ({r['n_train']} train / {r['n_test']} test images, {s['n_patches']} patches)",
            "",
            "| fit | bank | radius | radius ratio | image AUROC (diff) | pixel AUROC (diff) | wall s (2 cores) | modelled s, N machines |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
            f"| single machine | {s['bank']} | {s['radius']:.4f} | 1 | {_pct(s['metrics'].get('image_auroc'))} | "
            f"{_pct(s['metrics'].get('pixel_auroc'))} | {s['fit_seconds']:.1f} | {s['fit_seconds']:.1f} |",
        ]
        for key in sorted(k for k in r if k.startswith("shards_")):
            x = r[key]
            m, d = x["metrics"], x["metric_diff"]
            lines.append(
                f"| {key.split('_')[1]} shards | {x['bank']} (union {x['union_size']}) | {x['radius']:.4f} | {x['radius_ratio']:.4f} | "
                f"{_pct(m.get('image_auroc'))} ({_pp(d.get('image_auroc'))}) | {_pct(m.get('pixel_auroc'))} ({_pp(d.get('pixel_auroc'))}) | "
                f"{x['wall_seconds']:.1f} | {x['modelled_n_machines_seconds']:.1f} |"
            )
        lines.append("")
    if results.get("federated"):
        rows = []
        for row in results["federated"]:
            f, c = row["federated"], row.get("centralised", {})
            cells = [row["dataset"], row["partition"], row["clients"], row["object"], f"{row['bank']}/{row.get('central_bank')}"]
            for k in ("image_auroc", "pixel_auroc"):
                cells.append(f"{_pct(f.get(k))} / {_pct(c.get(k))} ({_pp(_diff(f.get(k), c.get(k)))})")
            spro = "au_spro@0.3" if "au_spro@0.3" in f else "au_pro"
            cells.append(f"{_pct(f.get(spro))} / {_pct(c.get(spro))}")
            rows.append(cells)
        columns = ["data", "partition", "clients", "object", "bank fed/central", "image AUROC fed / central (diff)",
                   "pixel AUROC", "AUC-sPRO@0.3 / AU-PRO"]  # fmt: skip
        lines += ["## Federated vs centralised (same test split)", "", markdown_table(columns, rows, "llrlrrrr")]
    text = "\n".join(lines)
    print(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--parts", nargs="+", default=["objects", "shards", "federated"])
    parser.add_argument("--datasets", nargs="+", default=["elpv", "synthetic"])
    parser.add_argument("--imagesize", type=int, default=112)
    parser.add_argument("--shards", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--oversampling", type=float, default=2.0)
    parser.add_argument("--clients", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--weighted", action="store_true", help="federated: weight vectors by client share")
    parser.add_argument("--noise-epsilon", type=float, default=None, help="federated: Gaussian noise epsilon")
    parser.add_argument("--noise-clip", type=float, default=50.0)
    parser.add_argument("--tag", default="", help="suffix of the output file names")
    parser.add_argument("--out", default=str(ROOT / "results"))
    args = parser.parse_args()
    import ray

    stamp = dt.date.today().isoformat()
    out_json = Path(args.out) / f"distributed_{stamp}{args.tag}.json"
    work = Path(tempfile.mkdtemp(prefix="bench-distributed-"))
    results: dict[str, Any] = {
        "args": vars(args),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_start": load_average()},
    }
    synthetic = make_synthetic(work / "synthetic") if "synthetic" in args.datasets else Path()
    roots = {"elpv": Path(), "synthetic": synthetic}
    ray.init(num_cpus=args.cpus, include_dashboard=False, object_store_memory=1024**3, log_to_driver=False)
    try:
        if "shards" in args.parts:
            results["shards"] = {}
            for dataset in args.datasets:
                print(f"shards on {dataset} ...", flush=True)
                results["shards"][dataset] = bench_shards(args, dataset, roots[dataset], work / "runs")
                atomic_write_json(out_json, results)
        if "federated" in args.parts:
            results["federated"] = []
            for dataset in args.datasets:
                print(f"federated on {dataset} ...", flush=True)
                results["federated"] += bench_federated(args, dataset, roots[dataset], work / "runs")
                atomic_write_json(out_json, results)
        if "objects" in args.parts:
            print("objects in parallel ...", flush=True)
            results["objects"] = bench_objects(args, work / "runs")
            atomic_write_json(out_json, results)
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    results["machine"]["load_end"] = load_average()
    atomic_write_json(out_json, results)
    text = print_tables(results)
    out_json.with_suffix(".md").write_text(text + "\n")
    print(f"wrote {out_json}")


if __name__ == "__main__":
    main()
