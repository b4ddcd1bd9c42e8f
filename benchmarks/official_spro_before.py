"""Before/after evidence for issue 8: any checkout's ``patchcore train`` on the toy AutoVI object of
tests/test_official_eval.py, its reported AUC-sPRO next to the official definitions on its saved maps.

    git archive bea12bc src | tar -x -C /tmp/old && PYTHONPATH=/tmp/old/src python benchmarks/official_spro_before.py
"""

from __future__ import annotations

import contextlib
import csv
import io
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import torch  # noqa: E402
import yaml  # noqa: E402
from official_spro import LIMITS, official_numbers  # noqa: E402
from test_official_eval import GEOMETRIES, make_object  # noqa: E402

import patchcore  # noqa: E402
from patchcore.app import cli  # noqa: E402


def main() -> None:
    torch.set_num_threads(1)
    print(f"patchcore from {patchcore.__file__}")
    base = Path(tempfile.mkdtemp())
    data = make_object(base / "autovi", loco=False)
    for name, geometry in GEOMETRIES.items():
        out = base / name
        config = {
            "project": "p", "group": "g", "seed": 0, "output_dir": str(out),
            "data": {"kind": "autovi", "root": str(data), "objects": ["toy"], "num_workers": 0},
            "model": {"backbone": "resnet18", "weights": "random", "batch_size": 4, **geometry},
            "evaluation": {"heatmaps": 0, "save_autovi_maps": True}, "logging": {"progress": False},
        }  # fmt: skip
        (base / "c.yaml").write_text(yaml.safe_dump(config))
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            assert cli.main(["train", "--config", str(base / "c.yaml")]) == 0
        run = out / "p" / "g"
        with (run / "results.csv").open(newline="") as handle:
            row = next(csv.DictReader(handle))
        official = official_numbers(run / "anomaly_maps" / "toy" / "test", data / "toy", loco=False)
        cells = " | ".join(
            f"{float(row[f'au_spro@{k:g}']):.4f} / {official['au_spro'][k]:.4f}" for k in LIMITS
        )
        print(
            f"| {name} | {cells} | image_auroc {float(row['image_auroc']):.4f}, "
            f"official class mean {official['image_auroc']['mean']:.4f} |"
        )


if __name__ == "__main__":
    main()
