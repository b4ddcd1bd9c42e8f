"""AutoVI and MVTec LOCO numbers equal what the official scripts compute from the maps the project saved.

Each case trains a random-weight ResNet-18 on a tiny generated object (48x36 images, several annotated
defects per image, relative and absolute saturation thresholds, absolute ones smaller and larger than their
regions), with the geometry of the case (square crop, kept aspect ratio, up- and down-scaling, a fixed
distorting size), then reads the saved native-size maps with ``official_spro`` (the scripts' definitions:
50 sampled thresholds refined by bisection, strict ``map > t``) and compares every FPR limit. The
project's curve is exact over the maps' 16-bit levels; the scripts' is a refined sampling of the same
curve, so they agree to the sampling error (well under 2e-3 here).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from official_spro import LIMITS, official_numbers
from PIL import Image

from patchcore.app import cli

pytestmark = pytest.mark.usefixtures("single_torch_thread")

WIDTH, HEIGHT = 48, 36
AUTOVI_DEFECTS = [
    {"defect_name": "scratch", "pixel_value": 255, "saturation_threshold": 0.5, "relative_saturation": True},
    # Absolute: 6 px is smaller than the regions drawn, 400 px larger (then the whole region is needed).
    {"defect_name": "dent", "pixel_value": 100, "saturation_threshold": 6, "relative_saturation": False},
    {"defect_name": "hole", "pixel_value": 180, "saturation_threshold": 400, "relative_saturation": False},
]
LOCO_DEFECTS = [
    {"defect_name": "missing", "pixel_value": 255, "saturation_threshold": 1.0, "relative_saturation": True},
    {"defect_name": "extra", "pixel_value": 23, "saturation_threshold": 12, "relative_saturation": False},
    {"defect_name": "crack", "pixel_value": 41, "saturation_threshold": 0.3, "relative_saturation": True},
]


def texture(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    base = 120 + 30 * np.sin(x / 3.0 + seed) * np.cos(y / 5.0) + rng.normal(0, 6, (HEIGHT, WIDTH))
    return np.clip(np.stack([base, base * 0.9, base * 0.8], -1), 0, 255).astype(np.uint8)


def save(path: Path, array: np.ndarray, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array)
    (image.convert(mode) if mode else image).save(path)


def region(box: tuple[int, int, int, int], value: int) -> np.ndarray:
    top, left, bottom, right = box
    mask = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    mask[top:bottom, left:right] = value
    return mask


def make_object(root: Path, loco: bool) -> Path:
    """A tiny AutoVI- or LOCO-format object: each defect image has 1-2 annotated regions, some overlapping."""
    rng = np.random.default_rng(7 if loco else 3)
    kinds = ("logical_anomalies", "structural_anomalies") if loco else ("scratch_dent", "hole")
    values = (255, 23, 41) if loco else (255, 100, 180)
    obj = root / "toy"
    for i in range(8):
        save(obj / "train" / "good" / f"{i:03d}.png", texture(i))
    if loco:
        for i in range(2):
            save(obj / "validation" / "good" / f"{i:03d}.png", texture(50 + i))
    for i in range(4):
        save(obj / "test" / "good" / f"{i:03d}.png", texture(100 + i))
    for k, kind in enumerate(kinds):
        for i in range(4):
            image = texture(200 + 10 * k + i)
            masks = []
            for j in range(2 if k == 0 else 1):
                h, w = rng.integers(3, 10), rng.integers(3, 12)
                top, left = rng.integers(0, HEIGHT - h), rng.integers(0, WIDTH - w)
                box = (int(top), int(left), int(top + h), int(left + w))
                if i % 2 == 0:  # every other image: a faint defect, so the detections are imperfect
                    image[box[0] : box[2], box[1] : box[3]] = 250 if j == 0 else 20
                masks.append(region(box, values[(k + j) % 3]))
            save(obj / "test" / kind / f"{i:03d}.png", image)
            for j, mask in enumerate(masks):
                # AutoVI's script reads RGB(A) ground truth, LOCO's single-channel PNGs.
                save(obj / "ground_truth" / kind / f"{i:03d}" / f"{j:03d}.png", mask, None if loco else "RGB")
    (obj / "defects_config.json").write_text(json.dumps(LOCO_DEFECTS if loco else AUTOVI_DEFECTS))
    return root


GEOMETRIES = {
    "square_crop": {"resize": 48, "imagesize": 32},
    "keep_aspect_down": {"resize": 24, "imagesize": None},
    "keep_aspect_up": {"resize": 56, "imagesize": None},
    "fixed_size": {"resize": [40, 40], "imagesize": None},
}


def run_train(tmp_path: Path, kind: str, data: Path, geometry: dict, **evaluation) -> Path:
    config = {
        "project": "official",
        "group": "run",
        "seed": 0,
        "output_dir": str(tmp_path / "out"),
        "data": {"kind": kind, "root": str(data), "objects": ["toy"], "num_workers": 0},
        "model": {"backbone": "resnet18", "weights": "random", "batch_size": 4, **geometry},
        "evaluation": {"heatmaps": 0, "save_autovi_maps": True, **evaluation},
        "logging": {"progress": False},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        assert cli.main(["train", "--config", str(path)]) == 0, err.getvalue()
    return tmp_path / "out" / "official" / "run"


def project_numbers(run_dir: Path) -> tuple[dict, dict]:
    with (run_dir / "results.csv").open(newline="") as handle:
        row = next(csv.DictReader(handle))
    summary = json.loads((run_dir / "summary.json").read_text())["objects"][0]
    return row, summary


def compare(run_dir: Path, data: Path, loco: bool) -> dict:
    row, summary = project_numbers(run_dir)
    official = official_numbers(run_dir / "anomaly_maps" / "toy" / "test", data / "toy", loco)
    for limit in LIMITS:
        assert float(row[f"au_spro@{limit:g}"]) == pytest.approx(official["au_spro"][limit], abs=2e-3), limit
        for kind, per_limit in official["per_type"].items():
            ours = summary["stats"]["per_class"][kind]["au_spro"][f"{limit:g}"]
            assert ours == pytest.approx(per_limit[limit], abs=2e-3), (kind, limit)
    assert float(row["image_auroc_class_mean"]) == pytest.approx(official["image_auroc"]["mean"], abs=1e-9)
    for kind, value in official["image_auroc"].items():
        if kind != "mean":
            assert summary["stats"]["per_class"][kind]["image_auroc_map_max"] == pytest.approx(
                value, abs=1e-9
            )
    return {"project": {k: float(row[f"au_spro@{k:g}"]) for k in LIMITS}, "official": official["au_spro"]}


@pytest.fixture(scope="module")
def autovi_data(tmp_path_factory):
    return make_object(tmp_path_factory.mktemp("autovi"), loco=False)


@pytest.fixture(scope="module")
def loco_data(tmp_path_factory):
    return make_object(tmp_path_factory.mktemp("loco"), loco=True)


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_autovi_spro_equals_the_official_script_on_the_saved_maps(tmp_path, autovi_data, geometry):
    compare(run_train(tmp_path, "autovi", autovi_data, GEOMETRIES[geometry]), autovi_data, loco=False)


@pytest.mark.parametrize("geometry", ["square_crop", "keep_aspect_up"])
def test_loco_spro_equals_the_official_script_per_anomaly_type(tmp_path, loco_data, geometry):
    run_dir = run_train(tmp_path, "mvtec_loco", loco_data, GEOMETRIES[geometry])
    compare(run_dir, loco_data, loco=True)
    maps = sorted(p.relative_to(run_dir / "anomaly_maps" / "toy" / "test").as_posix()
                  for p in (run_dir / "anomaly_maps" / "toy" / "test").rglob("*.tiff"))  # fmt: skip
    assert len(maps) == 12 and maps[0] == "good/000.tiff"
    with Image.open(run_dir / "anomaly_maps" / "toy" / "test" / maps[0]) as image:
        assert image.mode == "F" and image.size == (WIDTH, HEIGHT)  # float TIFF at native size


@pytest.mark.parametrize(("kind", "loco"), [("autovi", False), ("mvtec_loco", True)])
def test_non_default_spro_fpr_limits_are_the_ones_computed(tmp_path, autovi_data, loco_data, kind, loco):
    """evaluation.spro_fpr_limits [0.02, 0.2]: exactly those columns, each equal to the official script's
    value at that limit. Catches limits ignored (the defaults computed) or one limit used for all."""
    data = loco_data if loco else autovi_data
    run_dir = run_train(tmp_path, kind, data, GEOMETRIES["square_crop"], spro_fpr_limits=[0.02, 0.2])
    row, _ = project_numbers(run_dir)
    assert sorted(k for k in row if k.startswith("au_spro")) == ["au_spro@0.02", "au_spro@0.2"]
    official = official_numbers(
        run_dir / "anomaly_maps" / "toy" / "test", data / "toy", loco, limits=(0.02, 0.2)
    )
    for limit in (0.02, 0.2):
        assert float(row[f"au_spro@{limit:g}"]) == pytest.approx(official["au_spro"][limit], abs=2e-3), limit
    assert abs(official["au_spro"][0.02] - official["au_spro"][0.2]) > 0.01  # the two limits tell apart
