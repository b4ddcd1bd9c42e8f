"""Project vs the official AutoVI / MVTec LOCO definitions on the maps the project saved, per geometry.

Runs ``patchcore train`` on the tiny generated objects of tests/test_official_eval.py (random-weight
ResNet-18) for every geometry, evaluates the saved maps with tests/official_spro.py (the scripts'
definitions re-implemented) and prints one table per data set; writes JSON with --json.

    PYTHONPATH=src python benchmarks/official_spro_check.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from official_spro import LIMITS  # noqa: E402
from test_official_eval import GEOMETRIES, compare, make_object, run_train  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        for kind, loco in (("autovi", False), ("mvtec_loco", True)):
            data = make_object(base / kind, loco)
            for name, geometry in GEOMETRIES.items():
                out = base / f"{kind}_{name}"
                out.mkdir()
                numbers = compare(run_train(out, kind, data, geometry), data, loco)
                rows.append({"data": kind, "geometry": name, **geometry, **numbers})
    header = "| data | geometry | " + " | ".join(f"@{limit:g} project / official" for limit in LIMITS) + " |"
    print(header)
    print("|---|---|" + "---:|" * len(LIMITS))
    for row in rows:
        cells = [f"{row['project'][k]:.4f} / {row['official'][k]:.4f}" for k in LIMITS]
        print(f"| {row['data']} | {row['geometry']} | " + " | ".join(cells) + " |")
    worst = max(abs(r["project"][k] - r["official"][k]) for r in rows for k in LIMITS)
    print(f"largest difference: {worst:.2e}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2, default=str))


if __name__ == "__main__":
    main()
