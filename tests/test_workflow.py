"""End to end: ``patchcore train / evaluate / predict`` on tiny generated MVTec, AutoVI and folder data.

Every run uses a random-weight ResNet-18 on 48-pixel images, so a whole train + evaluate takes about a
second; the defects are bright squares on a smooth texture, which even random features find.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from patchcore.app import cli
from patchcore.engine.model import PatchCore

pytestmark = pytest.mark.usefixtures("single_torch_thread")

FAST_MODEL = {
    "backbone": "resnet18",
    "weights": "random",
    "resize": 48,
    "imagesize": 48,
    "batch_size": 4,
}

# ----------------------------------------------------------------------------- tiny data sets


def texture(width: int, height: int, seed: int) -> np.ndarray:
    """A smooth striped texture with a little noise, different per seed, as (H, W, 3) uint8."""
    y, x = np.mgrid[0:height, 0:width]
    rng = np.random.default_rng(seed)
    base = 128 + 40 * np.sin(x / 3.0 + seed * 0.1) * np.cos(y / 4.0) + rng.normal(0, 3, (height, width))
    return np.clip(np.stack([base, base * 0.9, base * 0.8], axis=-1), 0, 255).astype(np.uint8)


def save(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array)
    if mode is not None:
        image = image.convert(mode)
    image.save(path)
    return path


def with_square(image: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    top, left, bottom, right = box
    out = image.copy()
    out[top:bottom, left:right] = 255
    return out


def box_mask(width: int, height: int, box: tuple[int, int, int, int], value: int = 255) -> np.ndarray:
    top, left, bottom, right = box
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[top:bottom, left:right] = value
    return mask


def make_mvtec(root: Path, classes: tuple[str, ...] = ("bottle", "screw"), size: int = 48) -> Path:
    """MVTec AD layout: 6 train good, 3 test good, 3 test 'broken' with a bright square and its mask."""
    box = (16, 16, 30, 30)
    for c, name in enumerate(classes):
        d = root / name
        for i in range(6):
            save(d / "train" / "good" / f"{i:03d}.png", texture(size, size, 100 * c + i))
        for i in range(3):
            save(d / "test" / "good" / f"{i:03d}.png", texture(size, size, 100 * c + 10 + i))
            save(
                d / "test" / "broken" / f"{i:03d}.png",
                with_square(texture(size, size, 100 * c + 20 + i), box),
            )
            save(d / "ground_truth" / "broken" / f"{i:03d}_mask.png", box_mask(size, size, box))
        (d / "readme.txt").write_text("stray file")
    return root


def make_autovi(root: Path, name: str = "tank_screw", width: int = 80, height: int = 60) -> Path:
    """AutoVI layout on non-square images: two annotated defects (two mask PNGs) per defective image."""
    d = root / name / name  # the zip's extra level
    first, second = (10, 10, 22, 22), (35, 50, 45, 62)
    for i in range(6):
        save(d / "train" / "good" / f"{i:04d}.png", texture(width, height, i))
    for i in range(3):
        save(d / "test" / "good" / f"{i:04d}.png", texture(width, height, 10 + i))
        image = with_square(with_square(texture(width, height, 20 + i), first), second)
        save(d / "test" / "missing" / f"{i:04d}.png", image)
        gt = d / "ground_truth" / "missing" / f"{i:04d}"
        save(gt / "0000.png", box_mask(width, height, first, 255))
        save(gt / "0001.png", box_mask(width, height, second, 100), mode="RGBA")
    config = [
        {
            "defect_name": "missing",
            "pixel_value": 255,
            "saturation_threshold": 0.5,
            "relative_saturation": True,
        },
        {
            "defect_name": "loose",
            "pixel_value": 100,
            "saturation_threshold": 40,
            "relative_saturation": False,
        },
    ]
    (d / "defects_config.json").write_text(json.dumps(config))
    save(d / "defect_example.png", texture(width, height, 99))
    return root


def make_folder(root: Path, size: int = 48) -> Path:
    """One object of the user's own images; defect images have no masks (image labels only, like ELPV)."""
    for i in range(6):
        save(root / "train" / "good" / f"{i:03d}.png", texture(size, size, i))
    for i in range(3):
        save(root / "test" / "good" / f"{i:03d}.png", texture(size, size, 10 + i))
        save(
            root / "test" / "scratch" / f"{i:03d}.png",
            with_square(texture(size, size, 20 + i), (8, 8, 20, 20)),
        )
    return root


def write_config(path: Path, kind: str, root: Path, output_dir: Path, **sections) -> Path:
    data = {
        "project": "tiny",
        "group": "run",
        "seed": 0,
        "output_dir": str(output_dir),
        "data": {"kind": kind, "root": str(root), "num_workers": 0},
        "model": dict(FAST_MODEL),
        "evaluation": {"heatmaps": 2},
        "logging": {"progress": False},
    }
    for section, values in sections.items():
        data[section].update(values)
    path.write_text(yaml.safe_dump(data))
    return path


def run_cli(*argv: str) -> tuple[int, str, str]:
    """``patchcore.cli.main`` in this process; returns (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def heat_green(heatmap_png: Path) -> np.ndarray:
    """Green channel of the colour map recovered from the overlay half (blend = (image + heat) / 2).

    Green rises monotonically along the colour scale, so it measures how hot each pixel is drawn.
    """
    array = np.asarray(Image.open(heatmap_png).convert("RGB")).astype(np.int64)
    width = array.shape[1] // 2
    return 2 * array[:, width:, 1] - array[:, :width, 1]


@pytest.fixture(scope="module")
def mvtec_run(tmp_path_factory):
    """One ``patchcore train`` on a two-class MVTec-style tree, shared by the tests that inspect it."""
    base = tmp_path_factory.mktemp("mvtec")
    data = make_mvtec(base / "data")
    config = write_config(base / "tiny.yaml", "mvtec", data, base / "results")
    code, out, err = run_cli("train", "--config", config)
    assert code == 0, err
    run_dir = base / "results" / "tiny" / "run"
    return {"base": base, "data": data, "config": config, "run_dir": run_dir, "stdout": out, "stderr": err}


# ----------------------------------------------------------------------------- train


def test_train_saves_a_model_and_metadata_per_object(mvtec_run):
    models = mvtec_run["run_dir"] / "models"
    assert sorted(p.name for p in models.iterdir()) == [
        "patchcore_bottle.json",
        "patchcore_bottle.pt",
        "patchcore_screw.json",
        "patchcore_screw.pt",
    ]
    state = torch.load(models / "patchcore_bottle.pt", map_location="cpu", weights_only=True)
    bank = state["memory_bank"]
    assert bank.dtype == torch.float32 and bank.ndim == 2
    assert state["params"]["backbone"] == "resnet18"
    assert state["params"]["layers"] == ["layer2", "layer3"]
    assert state["stats"]["memory_size"] == bank.shape[0]
    assert state["stats"]["feature_dim"] == bank.shape[1]
    assert state["stats"]["object"] == "bottle"
    meta = json.loads((models / "patchcore_bottle.json").read_text())
    assert meta["object"] == "bottle"
    assert meta["stats"]["n_patches"] == state["stats"]["n_patches"]
    assert meta["metrics"]["image_auroc"] is not None
    assert meta["evaluation"]["map_max"] > meta["evaluation"]["map_min"]
    assert meta["calibration"] == {}  # no good images held out: no decision threshold


def test_train_results_csv_has_one_row_per_object_and_the_mean(mvtec_run):
    rows = read_csv(mvtec_run["run_dir"] / "results.csv")
    assert [r["object"] for r in rows] == ["bottle", "screw", "mean"]
    for key in ("image_auroc", "pixel_auroc", "pixel_auroc_anomalous", "au_pro"):
        values = [float(r[key]) for r in rows[:2]]
        assert all(0.0 <= v <= 1.0 for v in values)
        assert float(rows[2][key]) == pytest.approx(sum(values) / 2, abs=1e-6)
    # Bright squares on a smooth texture: found even with random features.
    assert float(rows[2]["image_auroc"]) >= 0.9
    assert float(rows[0]["n_patches"]) == 6 * 6 * 6  # 6 images, 6x6 layer2 grid at 48 px
    assert int(rows[0]["memory_size"]) == int(216 * 0.1)


def _slow_au_pro(masks: list[np.ndarray], maps: list[np.ndarray], limit: float) -> float:
    """AU-PRO written out: every distinct score a threshold (``map >= t``), PRO the mean over all 8-connected
    regions of all images of the covered fraction, FPR over all good pixels, trapezoids up to ``limit``
    (interpolated there), divided by ``limit``. Slow on purpose: one pass over every pixel per threshold."""
    from scipy.ndimage import label

    regions = []
    for i, mask in enumerate(masks):
        labelled, count = label(mask, structure=np.ones((3, 3)))
        regions += [(i, labelled == k) for k in range(1, count + 1)]
    n_good = sum(int((~m).sum()) for m in masks)
    fpr, pro = [0.0], [0.0]
    for t in np.unique(np.concatenate([m.ravel() for m in maps]))[::-1]:
        hit = [m >= t for m in maps]
        fpr.append(sum(int((h & ~m).sum()) for h, m in zip(hit, masks, strict=True)) / n_good)
        pro.append(float(np.mean([(hit[i] & r).sum() / r.sum() for i, r in regions])))
    area = 0.0
    for k in range(1, len(fpr)):
        x0, x1, y0, y1 = fpr[k - 1], fpr[k], pro[k - 1], pro[k]
        if x1 <= limit:
            area += 0.5 * (y0 + y1) * (x1 - x0)
        else:
            area += 0.5 * (y0 + y0 + (y1 - y0) * (limit - x0) / (x1 - x0)) * (limit - x0)
            break
    return area / limit


def test_train_pixel_metrics_equal_sklearn_and_a_slow_au_pro_on_the_saved_maps_and_masks(tmp_path):
    """Pixel AUROC (all images, defect images only) and AU-PRO recomputed from the files: the maps the run
    saved (16-bit, native size) and the mask PNGs read here. Catches masks transposed, flipped or resized
    to the wrong shape on their way to the metrics (the defects are thin, off-centre, non-square boxes on
    non-square images: each of those moves the ground truth off the detected region), metrics over the
    wrong images, and an ignored ``pro_fpr_limit`` (0.05 here; the value at 0.3 differs)."""
    from sklearn.metrics import roc_auc_score

    height, width = 48, 64
    boxes = [(6, 10, 14, 40), (30, 36, 36, 60), (4, 44, 22, 52)]  # (top, left, bottom, right)
    root = tmp_path / "data"
    d = root / "bottle"
    for i in range(6):
        save(d / "train" / "good" / f"{i:03d}.png", texture(width, height, i))
    for i, box in enumerate(boxes):
        save(d / "test" / "good" / f"{i:03d}.png", texture(width, height, 10 + i))
        save(d / "test" / "broken" / f"{i:03d}.png", with_square(texture(width, height, 20 + i), box))
        save(d / "ground_truth" / "broken" / f"{i:03d}_mask.png", box_mask(width, height, box))
    config = write_config(
        tmp_path / "c.yaml", "mvtec", root, tmp_path / "out",
        model={"resize": [height, width], "imagesize": None},
        evaluation={"heatmaps": 0, "save_autovi_maps": True, "pro_fpr_limit": 0.05},
    )  # fmt: skip
    code, _, err = run_cli("train", "-c", config)
    assert code == 0, err
    run_dir = tmp_path / "out" / "tiny" / "run"
    row = read_csv(run_dir / "results.csv")[0]
    maps, masks, defect = [], [], []
    for label in ("good", "broken"):
        for i in range(3):
            with Image.open(run_dir / "anomaly_maps" / "bottle" / "test" / label / f"{i:03d}.png") as image:
                maps.append(np.asarray(image, dtype=np.float64))
            mask_path = d / "ground_truth" / label / f"{i:03d}_mask.png"
            masks.append(
                np.asarray(Image.open(mask_path)) > 0
                if label == "broken"
                else np.zeros((height, width), bool)
            )
            defect.append(label == "broken")
    assert maps[0].shape == (height, width)
    truth = np.concatenate([m.ravel() for m in masks])
    scores = np.concatenate([m.ravel() for m in maps])
    expected_auroc = roc_auc_score(truth, scores)
    anomalous = [i for i, is_defect in enumerate(defect) if is_defect]
    expected_anomalous = roc_auc_score(
        np.concatenate([masks[i].ravel() for i in anomalous]),
        np.concatenate([maps[i].ravel() for i in anomalous]),
    )
    # The saved maps are the run's maps quantised to 16 bits: ties move the figures by far less than 1e-3.
    assert float(row["pixel_auroc"]) == pytest.approx(expected_auroc, abs=1e-3)
    assert float(row["pixel_auroc_anomalous"]) == pytest.approx(expected_anomalous, abs=1e-3)
    assert float(row["au_pro"]) == pytest.approx(_slow_au_pro(masks, maps, 0.05), abs=2e-3)
    assert abs(_slow_au_pro(masks, maps, 0.05) - _slow_au_pro(masks, maps, 0.3)) > 0.01
    # What a transposed / flipped ground truth would give, on these boxes: far from the run's figures.
    flipped = roc_auc_score(np.concatenate([m[::-1].ravel() for m in masks]), scores)
    assert abs(flipped - float(row["pixel_auroc"])) > 0.05


def test_train_leaves_no_temporary_files_and_no_autovi_maps_unless_asked(mvtec_run):
    run_dir = mvtec_run["run_dir"]
    assert not [p for p in run_dir.rglob("*") if p.name.startswith(".") or p.suffix == ".tmp"]
    assert not (run_dir / "anomaly_maps").exists()


def test_train_summary_json_has_bank_sizes_phase_times_and_metrics(mvtec_run):
    summary = json.loads((mvtec_run["run_dir"] / "summary.json").read_text())
    assert summary["project"] == "tiny" and summary["group"] == "run"
    assert summary["config"]["model"]["backbone"] == "resnet18"
    assert [o["object"] for o in summary["objects"]] == ["bottle", "screw"]
    for obj in summary["objects"]:
        stats = obj["stats"]
        assert stats["n_patches"] == 216
        assert stats["memory_size"] == 21
        assert stats["feature_dim"] == 1024
        assert stats["n_train_images"] == 6 and stats["n_test_images"] == 6
        for phase in ("extract_seconds", "coreset_seconds", "index_seconds", "predict_seconds"):
            assert stats[phase] >= 0
        assert set(obj["metrics"]) >= {"image_auroc", "pixel_auroc", "au_pro"}
        assert Path(obj["model"]).is_file()
    assert summary["mean"]["image_auroc"] == pytest.approx(
        sum(o["metrics"]["image_auroc"] for o in summary["objects"]) / 2
    )


def test_train_prints_the_markdown_summary_alone_on_stdout(mvtec_run):
    text = (mvtec_run["run_dir"] / "summary.md").read_text()
    assert "| bottle |" in text and "| screw |" in text and "| **mean** |" in text
    assert mvtec_run["stdout"].strip() == text.strip()


def test_train_logs_to_the_console_and_the_run_folder(mvtec_run):
    assert "bottle: fitting on 6 good images" in mvtec_run["stderr"]
    log_text = (mvtec_run["run_dir"] / "run.log").read_text()
    assert "bottle: fitting on 6 good images" in log_text
    assert "screw:" in log_text and "mean:" in log_text
    assert yaml.safe_load((mvtec_run["run_dir"] / "config.yaml").read_text())["model"]["resize"] == 48


def test_train_heatmaps_show_image_and_overlay_side_by_side_most_anomalous_first(mvtec_run):
    folder = mvtec_run["run_dir"] / "heatmaps" / "bottle"
    files = sorted(folder.iterdir())
    assert len(files) == 2  # evaluation.heatmaps=2
    assert all("broken" in f.name for f in files)  # the defective images score highest
    with Image.open(files[0]) as image:
        assert image.size == (2 * 48, 48)
        array = np.asarray(image.convert("RGB"))
    name = files[0].stem[4:].replace("_", "/", 2)  # 000_test_broken_002 -> test/broken/002
    original = np.asarray(Image.open(mvtec_run["data"] / "bottle" / f"{name}.png"))
    np.testing.assert_array_equal(array[:, :48], original)


def test_train_per_image_predictions_csv(mvtec_run):
    rows = read_csv(mvtec_run["run_dir"] / "predictions_bottle.csv")
    assert len(rows) == 6
    assert {r["label"] for r in rows} == {"good", "broken"}
    assert max(float(r["normalized_score"]) for r in rows) == pytest.approx(1.0)


def test_second_run_with_overrides_gets_a_new_folder_and_leaves_the_first_untouched(mvtec_run, tmp_path):
    first = mvtec_run["run_dir"]
    before = (first / "results.csv").read_bytes()
    code, _, err = run_cli(
        "train",
        "-c",
        mvtec_run["config"],
        "model.percentage=0.05",
        "data.objects=[bottle]",
        "evaluation.heatmaps=0",
        "logging.progress=true",
    )
    assert code == 0, err
    second = first.parent / "run_1"
    assert (first / "results.csv").read_bytes() == before
    rows = read_csv(second / "results.csv")
    assert [r["object"] for r in rows] == ["bottle", "mean"]
    assert int(rows[0]["memory_size"]) == int(216 * 0.05)
    assert not (second / "heatmaps").exists()
    assert yaml.safe_load((second / "config.yaml").read_text())["model"]["percentage"] == 0.05


def test_run_with_evaluation_disabled_saves_models_without_metrics(tmp_path):
    data = make_mvtec(tmp_path / "data", classes=("bottle",))
    config = write_config(tmp_path / "c.yaml", "mvtec", data, tmp_path / "out", evaluation={"enabled": False})
    code, _, err = run_cli("train", "-c", config)
    assert code == 0, err
    run_dir = tmp_path / "out" / "tiny" / "run"
    assert (run_dir / "models" / "patchcore_bottle.pt").is_file()
    assert [r["object"] for r in read_csv(run_dir / "results.csv")] == ["bottle", "mean"]
    assert not (run_dir / "heatmaps").exists()


# ----------------------------------------------------------------------------- evaluate


def _metric_rows(run_dir: Path, obj: str | None = None) -> dict[str, float]:
    """``{"<object>/<metric>": value}`` of a run's results.csv (one object's, without the prefix, if given)."""
    keys = ("image_auroc", "image_f1_max", "pixel_auroc", "pixel_auroc_anomalous", "au_pro")
    rows = read_csv(run_dir / "results.csv")
    if obj is not None:
        return {k: float(r[k]) for r in rows if r["object"] == obj for k in keys}
    return {f"{r['object']}/{k}": float(r[k]) for r in rows for k in keys}


def test_evaluate_saved_models_gives_the_train_runs_metrics(mvtec_run):
    models = mvtec_run["run_dir"] / "models"
    code, out, err = run_cli("evaluate", "--model", models, "--config", mvtec_run["config"])
    assert code == 0, err
    eval_dir = mvtec_run["run_dir"].parent / "run_eval"
    assert _metric_rows(eval_dir) == pytest.approx(_metric_rows(mvtec_run["run_dir"]), rel=1e-6)
    summary = json.loads((eval_dir / "summary.json").read_text())
    assert summary["models"] == [str(models / "patchcore_bottle.pt"), str(models / "patchcore_screw.pt")]
    assert summary["objects"][0]["stats"]["memory_size"] == 21
    assert "| **mean** |" in out
    assert len(list((eval_dir / "heatmaps" / "bottle").iterdir())) == 2


def test_evaluate_one_model_with_data_and_root_flags_and_no_config(mvtec_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = mvtec_run["run_dir"] / "models" / "patchcore_screw.pt"
    code, _, err = run_cli(
        "evaluate", "-m", model, "--data", "mvtec", "--root", mvtec_run["data"], "--no-progress",
        "data.num_workers=0", "evaluation.heatmaps=0",
    )  # fmt: skip
    assert code == 0, err
    eval_dir = tmp_path / "results" / "patchcore" / "default_eval"
    assert [r["object"] for r in read_csv(eval_dir / "results.csv")] == ["screw", "mean"]
    assert _metric_rows(eval_dir, "screw") == pytest.approx(
        _metric_rows(mvtec_run["run_dir"], "screw"), rel=1e-6
    )


# ----------------------------------------------------------------------------- predict


def test_predict_prints_json_lines_and_writes_predictions_and_heatmaps(mvtec_run, tmp_path):
    model = mvtec_run["run_dir"] / "models" / "patchcore_bottle.pt"
    test = mvtec_run["data"] / "bottle" / "test"
    images = [test / "good" / "000.png", test / "broken" / "000.png"]
    out_dir = tmp_path / "pred"
    code, out, err = run_cli("predict", "--model", model, *images, "--out", out_dir)
    assert code == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["image"] for r in records] == [str(p) for p in images]
    saved = [json.loads(line) for line in (out_dir / "predictions.jsonl").read_text().splitlines()]
    assert saved == records
    good, broken = records
    assert broken["score"] > good["score"]
    # The train run held no good images out: no decision (the test set's F1 threshold is only a figure).
    assert (good["anomalous"], broken["anomalous"]) == (None, None)
    assert all(r["calibration"].startswith("not calibrated") for r in records)
    assert 0.0 <= good["normalized_score"] < broken["normalized_score"]
    for record in records:
        with Image.open(record["heatmap"]) as heatmap:
            assert heatmap.size == (96, 48) and heatmap.mode == "RGB"
            assert Path(record["heatmap"]).parent == out_dir


def test_predict_scores_match_the_evaluation_of_the_train_run(mvtec_run, tmp_path):
    model = mvtec_run["run_dir"] / "models" / "patchcore_bottle.pt"
    code, out, _ = run_cli(
        "predict", "-m", model, mvtec_run["data"] / "bottle" / "test", "-o", tmp_path, "--no-heatmaps"
    )
    assert code == 0
    object_dir = mvtec_run["data"] / "bottle"
    records = [json.loads(line) for line in out.splitlines()]
    predicted = {
        Path(r["image"]).relative_to(object_dir).with_suffix("").as_posix(): r["score"] for r in records
    }
    evaluated = {
        r["name"]: float(r["image_score"]) for r in read_csv(mvtec_run["run_dir"] / "predictions_bottle.csv")
    }
    assert predicted == pytest.approx(evaluated, abs=1e-5)
    assert not list(tmp_path.glob("*.png"))


def test_predict_heatmaps_are_not_normalised_per_image(mvtec_run, tmp_path):
    model = mvtec_run["run_dir"] / "models" / "patchcore_bottle.pt"
    test = mvtec_run["data"] / "bottle" / "test"
    code, out, _ = run_cli(
        "predict", "-m", model, test / "good" / "001.png", test / "broken" / "001.png", "-o", tmp_path
    )
    assert code == 0
    good, broken = (json.loads(line) for line in out.splitlines())
    good_heat, broken_heat = heat_green(Path(good["heatmap"])), heat_green(Path(broken["heatmap"]))
    # Per-image normalisation would draw both maps' maxima at the top of the scale.
    assert broken_heat.max() > 200
    assert good_heat.max() < 100
    # The hot spot sits on the bright square.
    assert broken_heat[16:30, 16:30].mean() > broken_heat.mean() + 30


def test_predict_takes_a_folder_and_images_of_other_sizes(mvtec_run, tmp_path):
    folder = tmp_path / "inbox"
    save(folder / "a.png", texture(48, 48, 500))
    save(folder / "nested" / "b.jpg", texture(64, 40, 501))
    save(folder / "other" / "a.png", with_square(texture(48, 48, 502), (5, 5, 15, 15)))
    save(folder / "C.PNG", texture(48, 48, 503))
    (folder / "notes.txt").write_text("not an image")
    # What macOS zips and notebooks leave behind: hidden, and not images of the product.
    (folder / "._a.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    save(folder / ".ipynb_checkpoints" / "a-checkpoint.png", texture(48, 48, 504))
    model = mvtec_run["run_dir"] / "models" / "patchcore_bottle.pt"
    code, out, err = run_cli("predict", "-m", model, folder, "-o", tmp_path / "pred")
    assert code == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    assert sorted(Path(r["image"]).name for r in records) == ["C.PNG", "a.png", "a.png", "b.jpg"]
    heatmaps = {Path(r["heatmap"]).name for r in records}
    assert len(heatmaps) == 4  # two a.png: distinct heatmap names
    b = next(r for r in records if r["image"].endswith("b.jpg"))
    with Image.open(b["heatmap"]) as heatmap:
        assert heatmap.size == (2 * 64, 40)  # native resolution of that image


def test_predict_with_a_python_subprocess_keeps_stdout_to_json_lines(mvtec_run, tmp_path):
    model = mvtec_run["run_dir"] / "models" / "patchcore_screw.pt"
    image = mvtec_run["data"] / "screw" / "test" / "broken" / "002.png"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "patchcore.app.cli",
            "predict",
            "-m",
            str(model),
            str(image),
            "-o",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    (record,) = [json.loads(line) for line in done.stdout.splitlines()]
    assert record["image"] == str(image)
    assert record["anomalous"] is None and record["threshold"] is None  # not calibrated
    assert Path(record["heatmap"]).is_file()


# ----------------------------------------------------------------------------- AutoVI and folder data


def test_autovi_non_square_run_reports_spro_and_writes_maps_in_the_official_layout(tmp_path):
    data = make_autovi(tmp_path / "autovi")
    config = write_config(
        tmp_path / "autovi.yaml", "autovi", data, tmp_path / "out",
        model={"imagesize": None}, evaluation={"save_autovi_maps": True},
    )  # fmt: skip
    code, _, err = run_cli("train", "-c", config)
    assert code == 0, err
    run_dir = tmp_path / "out" / "tiny" / "run"
    (row, mean) = read_csv(run_dir / "results.csv")
    assert (row["object"], mean["object"]) == ("tank_screw", "mean")
    spro_keys = ["au_spro@0.01", "au_spro@0.05", "au_spro@0.1", "au_spro@0.3", "au_spro@1"]
    for key in spro_keys:
        assert 0.0 <= float(row[key]) <= 1.0
    assert "au_pro" not in row  # sPRO replaces PRO on AutoVI
    assert float(row["au_spro@1"]) >= float(row["au_spro@0.05"])
    assert float(row["image_auroc"]) >= 0.9
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(spro_keys) <= set(summary["objects"][0]["metrics"])
    assert summary["objects"][0]["stats"]["input_size"] == [48, 64]  # aspect ratio kept, no crop

    maps = run_dir / "anomaly_maps" / "tank_screw" / "test"
    names = sorted(p.relative_to(maps).as_posix() for p in maps.rglob("*.png"))
    assert names == [f"{label}/{i:04d}.png" for label in ("good", "missing") for i in range(3)]
    for path in maps.rglob("*.png"):
        with Image.open(path) as image:
            assert image.size == (80, 60)  # native resolution
            assert len(image.getbands()) == 1
    # One normalisation for the whole test set: the defective maps reach higher than the good ones.
    good = max(np.asarray(Image.open(p)).max() for p in (maps / "good").iterdir())
    bad = max(np.asarray(Image.open(p)).max() for p in (maps / "missing").iterdir())
    assert bad > good
    hottest = np.asarray(Image.open(maps / "missing" / "0000.png")).astype(np.float64)
    assert hottest[10:22, 10:22].mean() > hottest.mean()  # the map is mapped back onto the image

    heatmaps = sorted((run_dir / "heatmaps" / "tank_screw").iterdir())
    assert len(heatmaps) == 2
    for path in heatmaps:
        with Image.open(path) as image:
            assert image.size == (2 * 80, 60)  # image | overlay at native resolution


def test_centre_crop_heatmaps_come_back_at_native_resolution_over_the_defect(tmp_path):
    data = make_mvtec(tmp_path / "data", classes=("bottle",), size=48)
    config = write_config(
        tmp_path / "c.yaml", "mvtec", data, tmp_path / "out", model={"resize": 56, "imagesize": 40}
    )
    code, _, err = run_cli("train", "-c", config, "evaluation.heatmaps=1")
    assert code == 0, err
    run_dir = tmp_path / "out" / "tiny" / "run"
    assert json.loads((run_dir / "summary.json").read_text())["objects"][0]["stats"]["input_size"] == [40, 40]
    (heatmap,) = (run_dir / "heatmaps" / "bottle").iterdir()
    with Image.open(heatmap) as image:
        assert image.size == (2 * 48, 48)
    heat = heat_green(heatmap)
    assert heat[16:30, 16:30].mean() > heat.mean() + 30  # the crop is undone: the hot spot is on the square


def test_folder_data_without_masks_reports_pixel_metrics_as_na(tmp_path):
    data = make_folder(tmp_path / "cells")
    config = write_config(tmp_path / "folder.yaml", "folder", data, tmp_path / "out")
    code, out, err = run_cli("train", "-c", config)
    assert code == 0, err
    run_dir = tmp_path / "out" / "tiny" / "run"
    rows = read_csv(run_dir / "results.csv")
    assert [r["object"] for r in rows] == ["cells", "mean"]
    for row in rows:
        assert float(row["image_auroc"]) >= 0.9
        assert row["pixel_auroc"] == "n/a"
        assert row["au_pro"] == "n/a"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["objects"][0]["metrics"]["pixel_auroc"] is None
    assert summary["mean"]["au_pro"] is None
    assert "| n/a |" in (run_dir / "summary.md").read_text()


def test_model_fitted_by_train_rebuilds_with_the_same_transform(mvtec_run):
    model = PatchCore.load(mvtec_run["run_dir"] / "models" / "patchcore_bottle.pt", device="cpu")
    assert model.transform.output_size((48, 48)) == (48, 48)
    assert model.evaluation_.f1_threshold > 0 and model.calibration_ is None


def test_train_reuses_cached_features_when_only_the_coreset_changes(tmp_path):
    data = make_mvtec(tmp_path / "data")
    cache = tmp_path / "cache"
    config = write_config(
        tmp_path / "c.yaml", "mvtec", data, tmp_path / "results", model={"feature_cache": str(cache)}
    )
    code, _, err = run_cli("train", "--config", config)
    assert code == 0, err
    code, _, err = run_cli("train", "--config", config, "model.percentage=0.5")
    assert code == 0, err
    first = json.loads((tmp_path / "results" / "tiny" / "run" / "summary.json").read_text())
    second = json.loads((tmp_path / "results" / "tiny" / "run_1" / "summary.json").read_text())
    assert {o["stats"]["feature_cache"] for o in first["objects"]} == {"miss"}
    assert {o["stats"]["feature_cache"] for o in second["objects"]} == {"hit"}
    assert all(
        o["stats"]["memory_size"] > p["stats"]["memory_size"]
        for o, p in zip(second["objects"], first["objects"], strict=True)
    )


# ----------------------------------------------------------------------------- VisA end to end


def make_visa(root: Path, size: int = 48) -> Path:
    """VisA layout (split_csv/1cls.csv, Data/Images/{Normal,Anomaly}, class-id masks): one object, 6 train
    normal, 3 test normal, 3 anomalous with a bright box, the last one without a mask."""
    box = (16, 8, 26, 40)
    rows = ["object,split,label,image,mask"]
    images = root / "candle" / "Data" / "Images"
    for i in range(9):
        save(images / "Normal" / f"{i:03d}.png", texture(size, size, i))
        rows.append(f"candle,{'train' if i < 6 else 'test'},normal,candle/Data/Images/Normal/{i:03d}.png,")
    for i in range(3):
        save(images / "Anomaly" / f"{i:03d}.png", with_square(texture(size, size, 20 + i), box))
        mask = ""
        if i < 2:
            save(
                root / "candle" / "Data" / "Masks" / "Anomaly" / f"{i:03d}.png", box_mask(size, size, box, 3)
            )
            mask = f"candle/Data/Masks/Anomaly/{i:03d}.png"
        rows.append(f"candle,test,anomaly,candle/Data/Images/Anomaly/{i:03d}.png,{mask}")
    (root / "split_csv").mkdir(parents=True)
    (root / "split_csv" / "1cls.csv").write_text("\n".join(rows) + "\n")
    return root


def test_train_end_to_end_on_the_shipped_visa_config_with_small_settings(tmp_path):
    """`patchcore train -c configs/visa.yaml` on a tiny VisA tree: catches a VisA run that loses the CSV's
    split (Normal/ test images trained on), reads class-id masks (value 3) as good pixels, or counts the
    defect without a mask in the pixel metrics."""
    from sklearn.metrics import roc_auc_score

    data = make_visa(tmp_path / "visa")
    config = Path(__file__).resolve().parents[1] / "configs" / "visa.yaml"
    code, _, err = run_cli(
        "train", "-c", config, f"data.root={data}", f"output_dir={tmp_path / 'out'}", "data.num_workers=0",
        "model.backbone=resnet18", "model.weights=random", "model.resize=48", "model.imagesize=48",
        "model.batch_size=4", "evaluation.heatmaps=0", "evaluation.save_autovi_maps=true", "--no-progress",
    )  # fmt: skip
    assert code == 0, err
    run_dir = tmp_path / "out" / "visa" / "wrn50_l23_p3_c10"
    row = read_csv(run_dir / "results.csv")[0]
    assert row["object"] == "candle" and int(row["n_train_images"]) == 6 and int(row["n_test_images"]) == 6
    summary = json.loads((run_dir / "summary.json").read_text())["objects"][0]["stats"]
    assert (summary["pixel_metric_defect_images"], summary["defect_images"]) == (2, 3)
    maps_dir = run_dir / "anomaly_maps" / "candle" / "test"
    pairs = []
    for label, count in (("good", 3), ("anomaly", 2)):
        for path in sorted((maps_dir / label).glob("*.png"))[:count]:
            score_map = np.asarray(Image.open(path), dtype=np.float64)
            truth = np.zeros(score_map.shape, bool)
            if label == "anomaly":
                truth = np.asarray(Image.open(data / "candle" / "Data" / "Masks" / "Anomaly" / path.name)) > 0
            pairs.append((score_map, truth))
    expected = roc_auc_score(
        np.concatenate([t.ravel() for _, t in pairs]), np.concatenate([m.ravel() for m, _ in pairs])
    )
    assert float(row["pixel_auroc"]) == pytest.approx(expected, abs=1e-3)
    assert float(row["image_auroc"]) >= 0.9
