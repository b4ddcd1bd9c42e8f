"""Cost and agreement of the training-set audit's two methods on ELPV features extracted by bench_noisy.py
(issue 21): a fit without the audit, the same fit with the coreset audit (default; the bank must be identical),
and the exact leave-one-image-out audit in the coreset's space pruned by the coreset distances; Spearman and
top-k agreement between the two, recall at k of the injected cells.

    python benchmarks/audit_cost.py --work-dir /work/noisyfeat --object mono --rate 0.1

(--work-dir: a bench_noisy.py --keep-features folder.)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_noisy as bench  # noqa: E402

from patchcore.engine.audit import coreset_audit  # noqa: E402
from patchcore.engine.store import open_features  # noqa: E402
from patchcore.fileio import atomic_write_json  # noqa: E402


def load(work: Path, name: str):
    meta = json.loads((work / f"{name}.json").read_text())
    return open_features(work / f"{name}.f32", meta["n_rows"], meta["dim"]), meta


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work-dir", required=True)
    parser.add_argument("--object", default="mono")
    parser.add_argument("--rate", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--imagesize", type=int, default=224)
    parser.add_argument("--train-limit", type=int, default=None,
                        help="the first N training goods only (N * rate of them replaced by drawn cells)")  # fmt: skip
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    work = Path(args.work_dir)
    goods_f, goods_meta = load(work, f"{args.object}_goods")
    drawn_f, _ = load(work, f"{args.object}_drawn")
    per_image = goods_meta["n_rows"] // goods_meta["n_images"]
    n_goods = min(goods_meta["n_images"], args.train_limit or goods_meta["n_images"])
    rng = np.random.default_rng(args.seed)  # the same draw as bench_noisy's (pool draw first, then order)
    from patchcore.data import load_elpv

    (obj,) = load_elpv(objects=[args.object])
    pool = [s for s in obj.test if s.label == "defective"]
    rng.choice(len(pool), round(0.2 * goods_meta["n_images"]), replace=False)
    order = rng.permutation(n_goods)
    n_inj = round(args.rate * n_goods)
    kept = np.sort(order[n_inj:])
    train_f = bench.gather([(goods_f, kept, per_image), (drawn_f, np.arange(n_inj), per_image)],
                           work / f"audit_cost_{os.getpid()}.f32")  # fmt: skip
    meta = {"n_images": len(kept) + n_inj, "n_rows": len(train_f), "dim": train_f.shape[1],
            "patch_grid": goods_meta["patch_grid"], "input_size": goods_meta["input_size"]}  # fmt: skip
    injected = set(range(len(kept), len(kept) + n_inj))
    out: dict = {"object": args.object, "rate": args.rate, "injected": n_inj, "n_images": meta["n_images"],
                 "n_rows": len(train_f), "load_at_start": [round(x, 2) for x in os.getloadavg()]}  # fmt: skip

    def fit(audit: bool):
        model = bench.model_for(args.imagesize, args.seed)
        model.set_params(audit=audit)
        t0 = time.perf_counter()
        model.fit_features(train_f, meta)
        return model, time.perf_counter() - t0

    off, off_s = fit(False)
    out["fit_without_audit_s"] = round(off_s, 1)
    out["load_after_fit_without"] = [round(x, 2) for x in os.getloadavg()]
    on, on_s = fit(True)
    out["fit_with_coreset_audit_s"] = round(on_s, 1)
    out["coreset_audit_s"] = on.stats_.audit_seconds
    out["load_after_fit_with"] = [round(x, 2) for x in os.getloadavg()]
    out["bank_identical"] = bool(np.array_equal(off.memory_bank_, on.memory_bank_))
    approx = on.audit_
    t0 = time.perf_counter()
    exact = coreset_audit(train_f, meta, on.coreset_indices_, on.coreset_space_.projection, seed=args.seed,
                          method="exact", n_maps=6)  # fmt: skip
    out["exact_audit_s"] = round(time.perf_counter() - t0, 1)
    out["exact_fraction"] = round(exact.exact_searches / exact.n_rows, 5)
    out["load_after_exact"] = [round(x, 2) for x in os.getloadavg()]
    k = max(1, n_inj)
    out["spearman"] = round(float(spearmanr(approx.image_scores, exact.image_scores)[0]), 4)
    out["top_k_same"] = len(set(approx.ranking[:k].tolist()) & set(exact.ranking[:k].tolist())) / k
    out["bound_holds"] = bool(
        ((approx.image_scores >= exact.image_scores - 1e-3) & (approx.image_scores - exact.image_scores
                                                               <= approx.bounds + 1e-3)).all())  # fmt: skip
    out["max_bound"] = round(float(approx.bounds.max()), 4)
    out["median_bound"] = round(float(np.median(approx.bounds)), 4)
    out["median_score"] = round(float(np.median(exact.image_scores)), 4)
    out["max_gap"] = round(float((approx.image_scores - exact.image_scores).max()), 4)
    if n_inj:
        out["recall_at_k_coreset"] = len(set(approx.ranking[:k].tolist()) & injected) / k
        out["recall_at_k_exact"] = len(set(exact.ranking[:k].tolist()) & injected) / k
    out["suspects_coreset"] = len(approx.suspects)
    out["suspects_exact"] = len(exact.suspects)
    Path(train_f.path).unlink(missing_ok=True)
    print(json.dumps(out), flush=True)
    if args.out:
        atomic_write_json(Path(args.out), out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
