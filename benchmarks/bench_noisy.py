"""A few bad parts in the "good" folder (issue 21): image AUROC clean / contaminated / contaminated + denoise,
and the training-set audit's recall and precision, on the ELPV cells that ship in ``elpv-dataset``.

For each object: the training goods of the shipped split (configs/elpv.yaml: the first 2/3 of the good cells),
a defect pool (the test split's defective cells, defect probability 1.0) and the test set. A seeded draw takes
``max(rate) * n_train`` defective cells from the pool (the lower rates use a prefix of that draw) and the
same number of training goods to replace; all drawn defective cells leave the test set for *every* setting,
so the test set is identical across the table. Features are extracted once per image (the shipped config's
model settings) and every fit runs on them (``PatchCore.fit_features``); test images are scored with an exact
search of each fit's bank. For each rate: the fit without and with ``denoise``; the audit's recall and
precision at k = the number of injected cells (share of them among the k most suspicious training images),
and of its warning rule (flagged images).

    .venv/bin/python benchmarks/bench_noisy.py --objects mono --clean-denoise --rates 0 0.1 0.05 0.2
                                                                            # the real run (224 px)
    .venv/bin/python benchmarks/bench_noisy.py --objects mono --imagesize 112 --train-limit 60 \\
        --test-limit 60 --rates 0 0.1                                       # a check that it runs

Prints a table and writes JSON + the table into benchmarks/results/ (``--out``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import elpv_model_settings

from patchcore import PatchCore
from patchcore.data import load_elpv
from patchcore.engine.audit import (
    LeaveOneImageOut,
    audit_features,
    audit_training_set,
    coreset_audit,
    image_ids_for,
)
from patchcore.engine.index import MemoryBankIndex
from patchcore.engine.scoring import patch_scores
from patchcore.engine.store import FeatureStore, open_features
from patchcore.evaluation.metrics import image_auroc
from patchcore.fileio import atomic_write_json, atomic_write_text

ROOT = Path(__file__).resolve().parent
MODEL = elpv_model_settings()  # configs/elpv.yaml's model section


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    parser.add_argument("--objects", nargs="+", choices=("mono", "poly"), default=["mono", "poly"])
    parser.add_argument(
        "--imagesize", type=int, default=224, help="centre crop; resize = imagesize * 256 / 224"
    )
    parser.add_argument("--rates", type=float, nargs="+", default=[0.0, 0.05, 0.1, 0.2],
                        help="shares of the training goods replaced by defective cells")  # fmt: skip
    parser.add_argument("--train-limit", type=int, default=None, help="first N training goods only")
    parser.add_argument(
        "--test-limit", type=int, default=None, help="N test images (after the draw), evenly spread"
    )
    parser.add_argument("--seed", type=int, default=0, help="the draw and every fit")
    parser.add_argument("--clean-denoise", action="store_true", help="also fit the clean set with denoise")
    parser.add_argument("--check-full", action="store_true",
                        help="also run the audit in the full feature space (no projection) at the largest rate "
                             "and compare the rankings")  # fmt: skip
    parser.add_argument("--draw-rate", type=float, default=None,
                        help="draw (and leave out of the test set) this share, not max(rates): runs of some "
                             "rates then share one test set")  # fmt: skip
    parser.add_argument(
        "--audit-only", action="store_true", help="no fits: the audit's recall / precision only"
    )
    parser.add_argument("--exact-audit-rates", type=float, nargs="*", default=[0.05, 0.1],
                        help="at these rates, after the fits: the exact leave-one-image-out audit in the coreset's "
                             "space (audit_method=exact) beside the fit's default coreset audit: recall, "
                             "Spearman, same top-k, seconds")  # fmt: skip
    parser.add_argument("--work-dir", default=None, help="feature files (kept with --keep-features)")
    parser.add_argument("--keep-features", action="store_true", help="reuse / keep the extracted features")
    parser.add_argument(
        "--out", default=None, help="JSON path (default benchmarks/results/noisy_<objs>_<stamp>.json)"
    )
    args = parser.parse_args(argv)
    if any(not 0.0 <= r < 1.0 for r in args.rates):
        parser.error("--rates must be in [0, 1)")
    if args.imagesize < 32:
        parser.error("--imagesize must be >= 32")
    return args


def model_for(imagesize: int, seed: int, denoise: bool = False) -> PatchCore:
    resize = round(imagesize * 256 / 224)
    settings = {**MODEL, "resize": resize, "imagesize": imagesize, "seed": seed, "denoise": denoise, "device": "cpu"}
    return PatchCore(**settings)


def extract(model: PatchCore, paths: list[Path], folder: Path, name: str) -> tuple[Any, dict[str, Any]]:
    """Patch features of ``paths`` (image after image) in ``folder/name.f32``, reused when present."""
    meta_path = folder / f"{name}.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("paths") == [str(p) for p in paths]:
            return open_features(folder / f"{name}.f32", meta["n_rows"], meta["dim"]), meta
    store = FeatureStore(folder / f"{name}.f32")
    t0 = time.perf_counter()
    meta = model.extract_features([str(p) for p in paths], store)
    meta.update(n_rows=store.n_rows, dim=store.dim, paths=[str(p) for p in paths],
                seconds=round(time.perf_counter() - t0, 2))  # fmt: skip
    features = store.array()
    atomic_write_text(meta_path, json.dumps(meta))
    print(f"  extracted {name}: {len(paths)} images in {meta['seconds']:.1f} s", flush=True)
    return features, meta


def gather(parts: list[tuple[Any, np.ndarray, int]], path: Path) -> Any:
    """One feature file of the images ``images`` of each (features, images, rows per image) part."""
    store = FeatureStore(path)
    for features, images, per_image in parts:
        for i in images:
            store.append(features[int(i) * per_image : (int(i) + 1) * per_image])
    return store.array()


def score(model: PatchCore, features: Any, n_images: int) -> np.ndarray:
    """Image scores of test features (image after image) against the model's bank: exact search."""
    index = MemoryBankIndex(model.memory_bank_, kind="pruned")
    per_image = len(features) // n_images
    out = np.empty(n_images, dtype=np.float32)
    step = 32
    for start in range(0, n_images, step):
        stop = min(n_images, start + step)
        rows = np.asarray(features[start * per_image : stop * per_image])
        squared, _ = index.search(rows, 1)
        out[start:stop] = patch_scores(squared, model.distance).reshape(stop - start, -1).max(1)
    return out


def audit_quality(audit: Any, injected: np.ndarray) -> dict[str, Any]:
    """Recall / precision at k = number injected, and of the warning rule's flagged images."""
    k = int(len(injected))
    if k == 0:
        return {"k": 0, "flagged": len(audit.suspects)}
    top = set(int(i) for i in audit.ranking[:k])
    hits = len(top & set(int(i) for i in injected))
    flagged = set(audit.suspects)
    flagged_hits = len(flagged & set(int(i) for i in injected))
    return {
        "k": k,
        "recall_at_k": hits / k,
        "precision_at_k": hits / k,
        "flagged": len(flagged),
        "flagged_recall": flagged_hits / k,
        "flagged_precision": flagged_hits / len(flagged) if flagged else None,
    }


def run_object(
    name: str, args: argparse.Namespace, work: Path, progress_path: Path | None = None
) -> dict[str, Any]:
    (obj,) = load_elpv(objects=[name])
    goods = list(obj.train)[: args.train_limit] if args.train_limit else list(obj.train)
    pool = [s for s in obj.test if s.label == "defective"]
    rng = np.random.default_rng(args.seed)
    n_max = round(max([*args.rates, args.draw_rate or 0.0]) * len(goods))
    drawn = [pool[i] for i in rng.choice(len(pool), n_max, replace=False)]
    replaced_order = rng.permutation(len(goods))  # goods replaced at rate r: the first round(r * n) of these
    drawn_ids = {id(s) for s in drawn}
    test = [s for s in obj.test if id(s) not in drawn_ids]
    if args.test_limit and args.test_limit < len(test):  # evenly spread: file order groups the labels
        test = [test[i] for i in np.linspace(0, len(test) - 1, args.test_limit).round().astype(int)]
    labels = np.array([s.label == "defective" for s in test], dtype=np.int64)
    print(f"{name}: {len(goods)} training goods, {len(drawn)} defective cells drawn, test {len(test)} "
          f"({int(labels.sum())} defective)", flush=True)  # fmt: skip

    extractor = model_for(args.imagesize, args.seed)
    goods_f, goods_meta = extract(extractor, [s.image_path for s in goods], work, f"{name}_goods")
    drawn_f, _ = extract(extractor, [s.image_path for s in drawn], work, f"{name}_drawn")
    test_f, _ = extract(extractor, [s.image_path for s in test], work, f"{name}_test")
    per_image = goods_meta["n_rows"] // goods_meta["n_images"]

    rows: list[dict[str, Any]] = []
    for rate in dict.fromkeys(args.rates):  # in the order given: the most wanted settings first
        n_inj = round(rate * len(goods))
        kept = np.sort(replaced_order[n_inj:])
        path = work / f"{name}_train_{rate:g}_{os.getpid()}.f32"  # private: runs may share the work dir
        train_f = gather([(goods_f, kept, per_image), (drawn_f, np.arange(n_inj), per_image)], path)
        meta = {"n_images": len(kept) + n_inj, "n_rows": len(train_f), "dim": train_f.shape[1],
                "patch_grid": goods_meta["patch_grid"], "input_size": goods_meta["input_size"]}  # fmt: skip
        injected = np.arange(len(kept), len(kept) + n_inj)  # positions of the defective cells in the fit
        if args.audit_only:  # the audit alone (what a fit runs before its coreset): recall and precision
            t0 = time.perf_counter()
            audit = audit_features(
                train_f, image_ids_for(meta["n_images"], len(train_f)), seed=args.seed, n_maps=0
            )
            row = {"object": name, "rate": rate, "injected": n_inj, "audit_only": True,
                   "audit_seconds": round(time.perf_counter() - t0, 1),
                   "load_average": [round(x, 2) for x in os.getloadavg()], **audit_quality(audit, injected)}  # fmt: skip
            rows.append(row)
            print("  " + json.dumps(row), flush=True)
            path.unlink(missing_ok=True)
            continue
        plain_model = None
        for denoise in (False, True) if (rate > 0 or args.clean_denoise) else (False,):
            t0 = time.perf_counter()
            model = model_for(args.imagesize, args.seed, denoise).fit_features(train_f, meta)
            fit_seconds = time.perf_counter() - t0
            scores = score(model, test_f, len(test))
            auroc = image_auroc(labels, scores)
            row = {
                "object": name, "rate": rate, "injected": n_inj, "denoise": denoise,
                "image_auroc": round(100 * float(auroc), 2), "fit_seconds": round(fit_seconds, 1),
                "audit_seconds": model.stats_.audit_seconds,
                "audit_exact_fraction": model.stats_.audit_exact_fraction,
                "memory_size": model.stats_.memory_size, "n_patches": model.stats_.n_patches,
                "load_average": [round(x, 2) for x in os.getloadavg()],
            }  # fmt: skip
            if denoise:
                dropped = model.stats_.denoise_dropped_images or ()
                row.update(
                    denoise_outlier_patches=model.stats_.denoise_outlier_patches,
                    denoise_kept_patches=model.stats_.denoise_kept_patches,
                    denoise_dropped_images=len(dropped),
                    denoise_dropped_injected=len(set(dropped) & set(injected.tolist())),
                )
            else:
                plain_model = model
                row.update(audit_quality(model.audit_, injected), audit_method=model.stats_.audit_method,
                           audit_max_bound=model.stats_.audit_max_bound)  # fmt: skip
            rows.append(row)
            print("  " + json.dumps(row), flush=True)
            if progress_path is not None:  # what a stopped run has measured is kept
                atomic_write_json(progress_path, {"object": name, "partial": True, "rows": rows})
        if rate in args.exact_audit_rates and plain_model is not None and plain_model.audit_ is not None:
            check = exact_audit_check(train_f, meta, plain_model, args.seed, injected)
            next(r for r in rows if r["rate"] == rate and not r["denoise"])["exact_audit"] = check
            print("  exact audit: " + json.dumps(check), flush=True)
            if progress_path is not None:
                atomic_write_json(progress_path, {"object": name, "partial": True, "rows": rows})
        if args.check_full and rate == max(args.rates):
            rows[-1]["full_space_check"] = full_space_check(train_f, meta, model, args.seed, injected)
            print("  full-space check: " + json.dumps(rows[-1]["full_space_check"]), flush=True)
        path.unlink(missing_ok=True)
    return {"object": name, "n_train": len(goods), "n_drawn": len(drawn), "n_test": len(test),
            "n_test_defective": int(labels.sum()), "rows": rows}  # fmt: skip


def full_space_check(train_f: Any, meta: dict[str, Any], model: PatchCore, seed: int, injected: np.ndarray):
    """The audit in the full feature space (no projection) against the fit's 128-d audit: rank agreement."""
    from scipy.stats import spearmanr

    t0 = time.perf_counter()
    search = LeaveOneImageOut(train_f, image_ids_for(meta["n_images"], len(train_f)), seed=seed,
                              projection_dim=None)  # fmt: skip
    full = audit_training_set(search, tuple(meta["patch_grid"]), n_maps=0)
    seconds = time.perf_counter() - t0
    k = max(1, len(injected))
    projected = model.audit_
    return {
        "spearman": round(float(spearmanr(full.image_scores, projected.image_scores)[0]), 4),
        "top_k_overlap": len(set(full.ranking[:k].tolist()) & set(projected.ranking[:k].tolist())) / k,
        "full_recall_at_k": audit_quality(full, injected).get("recall_at_k"),
        "full_flagged": len(full.suspects),
        "seconds": round(seconds, 1),
        "exact_fraction": round(search.exact_searches / len(train_f), 5),
    }


def exact_audit_check(train_f: Any, meta: dict[str, Any], model: PatchCore, seed: int, injected: np.ndarray):
    """The exact audit in the fit's coreset space (pruned by the coreset distances) against the fit's coreset
    audit: rank agreement, the bound, recall at k, seconds."""
    from scipy.stats import spearmanr

    t0 = time.perf_counter()
    space = model.coreset_space_
    exact = coreset_audit(train_f, meta, model.coreset_indices_, "own" if space is None else space.projection,
                          seed=seed, method="exact", n_maps=0)  # fmt: skip
    seconds = time.perf_counter() - t0
    approx = model.audit_
    k = max(1, len(injected))
    gap = approx.image_scores - exact.image_scores
    return {
        "spearman": round(float(spearmanr(approx.image_scores, exact.image_scores)[0]), 4),
        "top_k_same": len(set(approx.ranking[:k].tolist()) & set(exact.ranking[:k].tolist())) / k,
        "bound_holds": bool(((gap >= -1e-3) & (gap <= approx.bounds + 1e-3)).all()),
        "max_gap": round(float(gap.max()), 4),
        "max_bound": round(float(approx.bounds.max()), 4),
        "median_bound": round(float(np.median(approx.bounds)), 4),
        "median_exact_score": round(float(np.median(exact.image_scores)), 4),
        "exact_recall_at_k": audit_quality(exact, injected).get("recall_at_k"),
        "exact_flagged": len(exact.suspects),
        "exact_flagged_injected": len(set(exact.suspects) & set(injected.tolist())),
        "seconds": round(seconds, 1),
        "exact_fraction": round(exact.exact_searches / len(train_f), 5),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| object | defective in train | image AUROC | + denoise | audit recall@k | precision@k | flagged "
        "(of them injected) | fit s (audit s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for result in results:
        by_rate: dict[float, dict[bool, dict[str, Any]]] = {}
        for row in result["rows"]:
            if row.get("audit_only"):
                continue
            by_rate.setdefault(row["rate"], {})[row["denoise"]] = row
        for rate, pair in by_rate.items():
            plain, robust = pair[False], pair.get(True)
            recall = plain.get("recall_at_k")
            at_k = "n/a | n/a" if recall is None else f"{recall:.2f} | {plain['precision_at_k']:.2f}"
            flagged = f"{plain['flagged']}" + (
                f" ({round(plain['flagged_recall'] * plain['k'])})" if plain.get("k") else ""
            )
            lines.append(
                f"| {result['object']} | {plain['injected']} ({100 * rate:g} %) | {plain['image_auroc']:.2f} | "
                f"{robust['image_auroc'] if robust else 'n/a'} | {at_k} | {flagged} | "
                f"{plain['fit_seconds']} ({plain['audit_seconds']}) |"
            )
    return "\n".join(lines)


def audit_table(results: list[dict[str, Any]]) -> str:
    lines = ["| object | defective in train | audit recall@k = precision@k | flagged (of them injected) | audit s |",
             "|---|---:|---:|---:|---:|"]  # fmt: skip
    for result in results:
        for row in result["rows"]:
            recall = row.get("recall_at_k")
            flagged = f"{row['flagged']}" + (
                f" ({round(row['flagged_recall'] * row['k'])})" if row.get("k") else ""
            )
            lines.append(
                f"| {result['object']} | {row['injected']} ({100 * row['rate']:g} %) | "
                f"{'n/a' if recall is None else f'{recall:.2f}'} | {flagged} | {row['audit_seconds']} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = dt.datetime.now(dt.UTC)
    header = {"started": started.isoformat(timespec="seconds"), "argv": sys.argv[1:],
              "load_average_at_start": [round(x, 2) for x in os.getloadavg()], "cpu_count": os.cpu_count(),
              "model": MODEL, "imagesize": args.imagesize}  # fmt: skip
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="bench-noisy-"))
    work.mkdir(parents=True, exist_ok=True)
    results = []
    stamp = started.strftime("%Y-%m-%dT%H%M")
    out = Path(args.out) if args.out else ROOT / "results" / f"noisy_{'_'.join(args.objects)}_{stamp}.json"
    try:
        for name in args.objects:
            results.append(run_object(name, args, work, out.with_suffix(f".{name}.partial.json")))
    finally:
        if not args.keep_features:
            shutil.rmtree(work, ignore_errors=True)
    header["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    text = audit_table(results) if args.audit_only else table(results)
    print(text)
    atomic_write_json(out, {**header, "results": results, "table": text})
    atomic_write_text(out.with_suffix(".md"), text + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
