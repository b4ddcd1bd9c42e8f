"""MVTec AD 2: the loader on generated trees in the real layout, the evaluation against the public definitions
(tests/official_mvtec_ad2.py, written independently), and the submission against the upload checker's rules.

The trees use the real folder and file names (``NNN_regular.png``, ``NNN_<lighting>.png``,
``ground_truth/bad/<stem>_mask.png`` with 0 / 255, ``test_private/NNN_regular.png``,
``test_private_mixed/NNN_mixed.png``) at small non-square sizes (the real images are 1400x1900 to 4224x1056).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import official_mvtec_ad2 as official
import pytest
import tifffile
import torch
from PIL import Image

from patchcore.app import cli
from patchcore.data import DATASETS, DataError, load_dataset
from patchcore.engine.model import PatchCore
from patchcore.evaluation.mvtec_ad2 import (
    NativeProAccumulator,
    SegF1Counts,
    ValidationStats,
    native_maps,
    save_float16_tiff,
    write_submission,
)

SIZE = (56, 40)  # width, height
LIGHTINGS = ("regular", "overexposed", "shift_1")


def _texture(seed: int) -> np.ndarray:
    w, h = SIZE
    y, x = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(seed)
    return 110 + 35 * np.sin(x / 3.0 + 0.2 * seed) * np.cos(y / 4.0) + rng.normal(0, 3, (h, w))


def _png(path: Path, gray: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(np.stack([gray] * 3, -1), 0, 255).astype(np.uint8)).save(path)


def _ad2_object(root: Path, name: str, n_train: int = 4, n_val: int = 3, n_private: int = 2) -> Path:
    obj = root / name
    for i in range(n_train):
        _png(obj / "train" / "good" / f"{i:03d}_regular.png", _texture(i))
    for i in range(n_val):
        _png(obj / "validation" / "good" / f"{i:03d}_regular.png", _texture(50 + i))
    for i, lighting in enumerate(LIGHTINGS):
        _png(obj / "test_public" / "good" / f"{i:03d}_{lighting}.png", _texture(100 + i))
        image = _texture(200 + i)
        mask = np.zeros((SIZE[1], SIZE[0]), dtype=np.uint8)
        top, left = 6 + 4 * i, 10 + 7 * i
        image[top : top + 9, left : left + 11] = 250
        mask[top : top + 9, left : left + 11] = 255
        _png(obj / "test_public" / "bad" / f"{i:03d}_{lighting}.png", image)
        (obj / "test_public" / "ground_truth" / "bad").mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask).save(
            obj / "test_public" / "ground_truth" / "bad" / f"{i:03d}_{lighting}_mask.png"
        )
    for i in range(n_private):
        _png(obj / "test_private" / f"{i:03d}_regular.png", _texture(300 + i))
        _png(obj / "test_private_mixed" / f"{i:03d}_mixed.png", _texture(400 + i))
    # what the dataset class's glob leaves out: macOS AppleDouble files, notes, other names
    (obj / "train" / "good" / "._000_regular.png").write_bytes(b"\x00")
    (obj / "test_public" / "bad" / "notes.txt").write_text("x")
    _png(obj / "test_private" / "preview.png", _texture(9))
    return obj


def test_the_loader_reads_the_public_layout(tmp_path):
    _ad2_object(tmp_path, "vial")
    _ad2_object(tmp_path, "can")
    objects = load_dataset("mvtec_ad2", tmp_path)
    assert "mvtec_ad2" in DATASETS
    assert [o.name for o in objects] == ["can", "vial"]  # the official order, those present
    obj = objects[0]
    assert [s.name for s in obj.train] == [f"train/good/{i:03d}_regular" for i in range(4)]
    assert [s.name for s in obj.validation] == [f"validation/good/{i:03d}_regular" for i in range(3)]
    assert not {s.image_path for s in obj.validation} & {s.image_path for s in obj.train}
    assert [(s.label, s.image_path.name) for s in obj.test] == [
        ("good", "000_regular.png"), ("good", "001_overexposed.png"), ("good", "002_shift_1.png"),
        ("bad", "000_regular.png"), ("bad", "001_overexposed.png"), ("bad", "002_shift_1.png"),
    ]  # fmt: skip
    bad = [s for s in obj.test if s.is_anomalous]
    assert [s.mask_paths[0].relative_to(obj.root).as_posix() for s in bad] == [
        f"test_public/ground_truth/bad/{i:03d}_{lighting}_mask.png" for i, lighting in enumerate(LIGHTINGS)
    ]
    assert all(not s.mask_paths for s in obj.test if not s.is_anomalous)
    assert {k: [s.image_path.name for s in v] for k, v in obj.unlabelled.items()} == {
        "test_private": ["000_regular.png", "001_regular.png"],
        "test_private_mixed": ["000_mixed.png", "001_mixed.png"],
    }
    assert obj.protocol.name == "mvtec_ad2" and obj.has_masks


def test_a_defect_image_without_its_mask_is_an_error_naming_it(tmp_path):
    obj = _ad2_object(tmp_path, "rice")
    (obj / "test_public" / "ground_truth" / "bad" / "001_overexposed_mask.png").unlink()
    with pytest.raises(
        DataError, match=r"mask .*001_overexposed_mask\.png of defect image .*001_overexposed\.png"
    ):
        load_dataset("mvtec_ad2", tmp_path)
    with pytest.raises(DataError, match="no MVTec AD 2 object folders"):
        load_dataset("mvtec_ad2", tmp_path / "rice" / "train")


def _random_case(seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """float16 maps (ties, negative values) and masks with several regions, two touching diagonally."""
    rng = np.random.default_rng(seed)
    maps, masks = [], []
    for i in range(6):
        mask = np.zeros((30, 44), dtype=np.uint8)
        if i % 2:
            mask[3:9, 4:12] = 255
            mask[9:14, 12:20] = 255  # touches the first corner to corner: one 8-connected region
            mask[20:27, 30 + i : 38 + i] = 255
        amap = rng.gamma(2.0, 1.0, mask.shape) - 0.5 + 2.5 * (mask != 0) * rng.random(mask.shape)
        maps.append(amap.astype(np.float16))
        masks.append(mask)
    return maps, masks


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_au_pro_and_image_auroc_match_the_public_definition(seed):
    maps, masks = _random_case(seed)
    accumulator = NativeProAccumulator()
    for amap, mask in zip(maps, masks, strict=True):
        accumulator.add(amap, mask if mask.any() else None)
    differences = []
    for limit in (0.05, 0.3, 1.0):
        ours = accumulator.au_pro(limit)
        reference = official.au_pro(maps, masks, limit)
        differences.append(abs(ours - reference))
        assert ours == pytest.approx(reference, abs=1e-6), limit
    # the largest difference seen on these cases (float32 FPRs in the script, float64 here): below 1e-6
    assert max(differences) < 1e-6
    fpr, pro = accumulator.curve()
    ref_fpr, ref_pro = official.pro_curve(maps, masks)
    assert fpr.shape == ref_fpr.shape and np.allclose(fpr, ref_fpr, atol=1e-6) and np.allclose(pro, ref_pro)
    from patchcore.evaluation.metrics import image_auroc

    labels = [int(m.any()) for m in masks]
    assert image_auroc(np.array(labels), np.array([float(m.max()) for m in maps])) == pytest.approx(
        official.classification_auroc(maps, labels), abs=1e-12
    )


def test_segmentation_threshold_and_f1_match_the_public_definition():
    maps, masks = _random_case(7)
    validation = [np.random.default_rng(i).gamma(2.0, 1.0, (30, 44)).astype(np.float16) for i in range(3)]
    stats = ValidationStats()
    for amap in validation:
        stats.add(amap)
    threshold = stats.threshold()
    assert threshold == pytest.approx(official.segmentation_threshold(validation), rel=1e-12)
    counts = SegF1Counts()
    thresholded = []
    for amap, mask in zip(maps, masks, strict=True):
        binary = amap.astype(np.float32) > np.float32(threshold)
        counts.add(binary, mask)
        thresholded.append(np.where(binary, 255, 0).astype(np.uint8))
    assert counts.f1() == pytest.approx(official.seg_f1(thresholded, masks), abs=1e-12)


def test_float16_tiffs_read_back_exactly_as_the_checker_reads_them(tmp_path):
    values = (np.random.default_rng(0).normal(0, 3, (17, 23))).astype(np.float16)
    values[0, 0] = np.float16(65504)
    path = save_float16_tiff(tmp_path / "000_regular.tiff", values)
    read = tifffile.imread(path)
    assert read.dtype == np.float16 and read.ndim == 2 and read.shape == (17, 23)
    assert np.array_equal(read.view(np.uint16), values.view(np.uint16))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> PatchCore:
    root = tmp_path_factory.mktemp("ad2model")
    obj = _ad2_object(root, "can")
    model = PatchCore(backbone="resnet18", weights="random", resize=32, imagesize=None, device="cpu",
                      percentage=0.5, batch_size=4)  # fmt: skip
    torch.manual_seed(0)
    return model.fit([str(p) for p in sorted((obj / "train" / "good").glob("0*.png"))])


def test_the_submission_passes_the_upload_checkers_rules(tmp_path, tiny_model):
    root = tmp_path / "data"
    for name in official.OBJECTS:
        _ad2_object(root, name, n_train=1, n_val=1, n_private=3)
    objects = load_dataset("mvtec_ad2", root)
    submission = tmp_path / "submission"
    for obj in objects:
        assert write_submission(tiny_model, obj, submission, threshold=0.5, batch_size=4) == 6
    official.check_submission(submission, dict.fromkeys(official.OBJECTS, 3))
    # native size, and the thresholded PNG is the TIFF above the threshold
    tiff = tifffile.imread(submission / "anomaly_images" / "vial" / "test_private_mixed" / "002_mixed.tiff")
    png = np.asarray(
        Image.open(
            submission / "anomaly_images_thresholded" / "vial" / "test_private_mixed" / "002_mixed.png"
        )
    )
    assert tiff.shape == png.shape == (SIZE[1], SIZE[0])
    assert np.array_equal(png == 255, tiff.astype(np.float32) > 0.5)
    # the checker's rules can fail: a float32 map, a missing file, a stray folder
    from patchcore.heatmaps import save_map_tiff

    broken = submission / "anomaly_images" / "can" / "test_private" / "000_regular.tiff"
    save_map_tiff(broken, np.zeros((4, 4), dtype=np.float32))
    with pytest.raises(official.SubmissionError, match="float32"):
        official.check_submission(submission, dict.fromkeys(official.OBJECTS, 3))
    broken.unlink()
    with pytest.raises(official.SubmissionError, match="000_regular.tiff"):
        official.check_submission(submission, dict.fromkeys(official.OBJECTS, 3))


def test_training_on_mvtec_ad2_calibrates_on_validation_and_evaluates_as_the_public_code(tmp_path, capsys):
    root = tmp_path / "data"
    _ad2_object(root, "walnuts")
    out = tmp_path / "results"
    code = cli.main([
        "train", "data.kind=mvtec_ad2", f"data.root={root}", f"output_dir={out}", "project=ad2",
        "model.backbone=resnet18", "model.weights=random", "model.resize=32", "model.imagesize=null",
        "model.percentage=0.5", "data.num_workers=0", "evaluation.heatmaps=0", "evaluation.save_autovi_maps=true",
        "--no-progress",
    ])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    run = out / "ad2" / "default"
    record = json.loads((run / "models" / "patchcore_walnuts.json").read_text())
    assert record["stats"]["n_train_images"] == 4  # validation goods never trained on
    assert "3 held-out good images" in record["calibration"]["source"]
    metrics = record["metrics"]
    assert set(metrics) >= {"au_pro@0.05", "image_auroc_map_max", "seg_f1", "image_auroc", "pixel_auroc"}
    assert "au_pro" not in metrics

    # the public definitions on the files the run wrote (the evaluation script's layout)
    obj = load_dataset("mvtec_ad2", root)[0]
    maps_dir = run / "anomaly_maps" / "walnuts" / "test_public"
    maps = [official.read_map(maps_dir / s.label / f"{s.image_path.stem}.tiff") for s in obj.test]
    masks = [official.read_mask(s.mask_paths[0]) if s.mask_paths else np.zeros(m.shape, np.uint8)
             for s, m in zip(obj.test, maps, strict=True)]  # fmt: skip
    assert all(m.dtype == np.float16 and m.shape == (SIZE[1], SIZE[0]) for m in maps)
    assert metrics["au_pro@0.05"] == pytest.approx(official.au_pro(maps, masks, 0.05), abs=1e-6)
    labels = [int(s.is_anomalous) for s in obj.test]
    assert metrics["image_auroc_map_max"] == pytest.approx(
        official.classification_auroc(maps, labels), abs=1e-12
    )
    model = PatchCore.load(run / "models" / "patchcore_walnuts.pt", device="cpu")
    validation = [amap for _, amap in native_maps(model, obj.validation, batch_size=4)]
    threshold = official.segmentation_threshold(validation)
    assert record["stats"]["segmentation_threshold"] == pytest.approx(threshold, rel=1e-9)
    thresholded = [np.where(m.astype(np.float32) > np.float32(threshold), 255, 0) for m in maps]
    assert metrics["seg_f1"] == pytest.approx(official.seg_f1(thresholded, masks), abs=1e-12)
    # the private sets: the submission of this object, in the server's layout
    submission = run / "mvtec_ad2_submission"
    assert sorted(p.relative_to(submission).as_posix() for p in submission.rglob("*.*")) == sorted(
        [f"anomaly_images/walnuts/test_private/{i:03d}_regular.tiff" for i in range(2)]
        + [f"anomaly_images/walnuts/test_private_mixed/{i:03d}_mixed.tiff" for i in range(2)]
        + [f"anomaly_images_thresholded/walnuts/test_private/{i:03d}_regular.png" for i in range(2)]
        + [f"anomaly_images_thresholded/walnuts/test_private_mixed/{i:03d}_mixed.png" for i in range(2)]
    )
    predictions = (run / "predictions_walnuts.csv").read_text()
    assert "test_private" not in predictions and "validation" not in predictions
