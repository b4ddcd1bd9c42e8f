"""Real-IAD: the JSON split files on a generated tree in the public layout, and sample-level figures (a sample
is its five camera views; defective if any view is, scored by its highest view)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from patchcore.app import cli
from patchcore.data import DataError, Sample, load_dataset
from patchcore.evaluation.metrics import image_auroc
from patchcore.evaluation.real_iad import sample_groups

VIEWS = 5


def _jpg(path: Path, seed: int, defect: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    y, x = np.mgrid[0:32, 0:32]
    gray = 120 + 30 * np.sin(x / 3.0 + 0.1 * seed) + np.random.default_rng(seed).normal(0, 2, (32, 32))
    if defect:
        gray[10:20, 10:20] = 250
    Image.fromarray(np.clip(np.stack([gray] * 3, -1), 0, 255).astype(np.uint8)).save(path, quality=95)


def _real_iad(root: Path, name: str = "plastic_nut", n_train: int = 2) -> Path:
    """realiad_256/<name>/{OK,NG/<code>}/S<NNNN>/<name>_<NNNN>_<OK|NG_code>_C<v>_<time>.jpg, masks .png."""
    entries: dict[str, list] = {"train": [], "test": []}
    samples = [(i, "OK", None) for i in range(1, n_train + 3)] + [
        (n_train + 3, "NG", "AK"),
        (n_train + 4, "NG", "HS"),
    ]
    for sid, status, code in samples:
        folder = f"OK/S{sid:04d}" if status == "OK" else f"NG/{code}/S{sid:04d}"
        split = "train" if sid <= n_train else "test"
        for view in range(1, VIEWS + 1):
            tag = "OK" if status == "OK" else f"NG_{code}"
            stem = f"{name}_{sid:04d}_{tag}_C{view}_20230922"
            # the defect is visible in views 1 and 2 only; the other views are labelled normal
            visible = status == "NG" and view <= 2
            _jpg(root / "realiad_256" / name / folder / f"{stem}.jpg", 10 * sid + view, visible)
            mask = None
            if visible:
                m = np.zeros((32, 32), dtype=np.uint8)
                m[10:20, 10:20] = 255
                Image.fromarray(m).save(root / "realiad_256" / name / folder / f"{stem}.png")
                mask = f"{folder}/{stem}.png"
            entries[split].append({
                "category": name, "anomaly_class": code if visible else "OK",
                "image_path": f"{folder}/{stem}.jpg", "mask_path": mask,
            })  # fmt: skip
    js = root / "realiad_jsons" / "realiad_jsons" / f"{name}.json"
    js.parent.mkdir(parents=True, exist_ok=True)
    js.write_text(json.dumps({"meta": {"prefix": name, "normal_class": "OK"}, **entries}))
    return root


def test_the_split_comes_from_the_json_file_and_views_keep_their_sample(tmp_path):
    _real_iad(tmp_path)
    (obj,) = load_dataset("real_iad", tmp_path)
    assert obj.name == "plastic_nut" and obj.protocol.name == "real_iad"
    assert len(obj.train) == 2 * VIEWS and not any(s.is_anomalous for s in obj.train)
    assert len(obj.test) == 4 * VIEWS
    assert sorted({s.label for s in obj.test}) == ["AK", "HS", "good"]
    assert all(len(s.mask_paths) == 1 for s in obj.test if s.is_anomalous)
    ids, labels, _ = sample_groups(
        obj.test, np.array([int(s.is_anomalous) for s in obj.test]), np.zeros(len(obj.test))
    )
    assert ids == ["OK/S0003", "OK/S0004", "NG/AK/S0005", "NG/HS/S0006"]
    assert labels.tolist() == [0, 0, 1, 1]  # defective because 2 of 5 views are


def test_root_with_several_resolutions_or_a_missing_file_is_an_error(tmp_path):
    _real_iad(tmp_path)
    (tmp_path / "realiad_512").mkdir()
    with pytest.raises(DataError, match="several resolutions.*realiad_256, realiad_512"):
        load_dataset("real_iad", tmp_path)
    (obj,) = load_dataset("real_iad", tmp_path / "realiad_256")  # the resolution folder itself
    first = obj.train[0].image_path
    first.unlink()
    with pytest.raises(DataError, match=f"train image {first} listed in .*plastic_nut.json does not exist"):
        load_dataset("real_iad", tmp_path / "realiad_256")


def test_a_sample_is_defective_if_any_view_is_and_scores_its_highest_view():
    samples = [
        Sample(Path(f"{d}/v{v}.jpg"), "good", (), f"{d}/v{v}")
        for d in ("A/S1", "B/S2", "C/S3")
        for v in (1, 2)
    ]
    labels = np.array([0, 0, 0, 1, 0, 0])
    scores = np.array([0.2, 0.9, 0.5, 0.1, 0.3, 0.4])
    ids, sample_labels, sample_scores = sample_groups(samples, labels, scores)
    assert ids == ["A/S1", "B/S2", "C/S3"]
    assert sample_labels.tolist() == [0, 1, 0]
    assert sample_scores.tolist() == [0.9, 0.5, 0.4]
    # view-level AUROC and sample-level AUROC differ on this example
    assert image_auroc(sample_labels, sample_scores) == 0.5
    assert image_auroc(labels, scores) == 0.0


def test_training_on_real_iad_reports_sample_level_figures(tmp_path, capsys):
    _real_iad(tmp_path / "data")
    out = tmp_path / "results"
    code = cli.main([
        "train", "data.kind=real_iad", f"data.root={tmp_path / 'data'}", f"output_dir={out}", "project=riad",
        "model.backbone=resnet18", "model.weights=random", "model.resize=32", "model.imagesize=32",
        "data.num_workers=0", "evaluation.heatmaps=0", "--no-progress",
    ])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    record = json.loads((out / "riad" / "default" / "models" / "patchcore_plastic_nut.json").read_text())
    assert record["stats"]["n_samples"] == 4 and record["stats"]["n_defective_samples"] == 2
    assert record["metrics"]["sample_auroc"] is not None and record["metrics"]["image_auroc"] is not None
