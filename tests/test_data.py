"""Tests for patchcore.data: loaders, transforms, dataset and collate."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms as T

from patchcore.data import (
    DATASETS,
    DataError,
    ImageDataset,
    ImageTransform,
    collate_samples,
    load_autovi,
    load_dataset,
    load_elpv,
    load_folder,
    load_image,
    load_mask,
    load_mvtec,
    saturation_for,
)

# ----------------------------------------------------------------------------- helpers


def _img(path: Path, size_wh: tuple[int, int] = (32, 32), seed: int = 0, mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    w, h = size_wh
    arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(arr, "RGB").convert(mode).save(path)
    return path


def _mask(path: Path, size_wh: tuple[int, int] = (32, 32), value: int = 255, mode: str = "L") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size_wh
    arr = np.zeros((h, w), dtype=np.uint8)
    arr[h // 4 : h // 2, w // 4 : w // 2] = value
    img = Image.fromarray(arr, "L")
    if mode == "RGB":
        img = Image.merge("RGB", (img, img, img))
    elif mode == "RGBA":
        img = Image.merge("RGBA", (img, img, img, Image.new("L", img.size, 255)))
    img.save(path)
    return path


def _mvtec_class(root: Path, name: str) -> Path:
    c = root / name
    for i in range(3):
        _img(c / "train" / "good" / f"{i:03d}.png", seed=i)
    _img(c / "test" / "good" / "000.png", seed=10)
    for i in range(2):
        _img(c / "test" / "crack" / f"{i:03d}.png", seed=20 + i)
        _mask(c / "ground_truth" / "crack" / f"{i:03d}_mask.png")
    return c


AUTOVI_CONFIG = [
    {"defect_name": "missing", "pixel_value": 255, "saturation_threshold": 1.0, "relative_saturation": True},
    {"defect_name": "scratch", "pixel_value": 128, "saturation_threshold": 200, "relative_saturation": False},
]


def _autovi_object(obj: Path) -> Path:
    size = (40, 30)  # non-square, like the real 1000x750 images
    obj.mkdir(parents=True, exist_ok=True)
    (obj / "defects_config.json").write_text(json.dumps(AUTOVI_CONFIG))
    _img(obj / "defect_example.png", size)
    for i in range(2):
        _img(obj / "train" / "good" / f"{i:04d}.png", size, seed=i)
    _img(obj / "test" / "good" / "0000.png", size, seed=5)
    _img(obj / "test" / "missing" / "0000.png", size, seed=6)
    gt = obj / "ground_truth" / "missing" / "0000"
    _mask(gt / "0000.png", size, 255, "L")
    _mask(gt / "0001.png", size, 128, "RGB")
    _mask(gt / "0002.png", size, 255, "RGBA")
    return obj


# ----------------------------------------------------------------------------- MVTec


def test_mvtec_loads_classes_in_canonical_order_with_masks(tmp_path):
    _mvtec_class(tmp_path, "screw")
    _mvtec_class(tmp_path, "bottle")
    objs = load_mvtec(tmp_path)
    assert [o.name for o in objs] == ["bottle", "screw"]
    bottle = objs[0]
    assert bottle.has_masks and bottle.mask_format == "binary" and bottle.root == tmp_path / "bottle"
    assert [s.name for s in bottle.train] == ["train/good/000", "train/good/001", "train/good/002"]
    assert all(s.label == "good" and not s.mask_paths for s in bottle.train)
    assert [s.name for s in bottle.test] == ["test/crack/000", "test/crack/001", "test/good/000"]
    crack = bottle.test[0]
    assert crack.is_anomalous and crack.mask_paths == (tmp_path / "bottle/ground_truth/crack/000_mask.png",)
    assert not bottle.test[2].is_anomalous and bottle.test[2].mask_paths == ()


def test_mvtec_ignores_stray_files_and_folders(tmp_path):
    c = _mvtec_class(tmp_path, "bottle")
    (c / "train" / "good" / ".DS_Store").write_bytes(b"\0\1")
    (c / "train" / "good" / "readme.txt").write_text("hi")
    (c / "train" / "good" / "._000.png").write_bytes(b"AppleDouble")
    (c / "test" / ".ipynb_checkpoints").mkdir()
    (c / "test" / "notes").mkdir()
    (c / "test" / "notes" / "todo.txt").write_text("x")
    _img(c / "train" / "good" / "003.PNG", seed=3)  # upper-case extension still counts
    (tmp_path / "license.txt").write_text("cc")
    obj = load_mvtec(tmp_path, ["bottle"])[0]
    assert [p.image_path.name for p in obj.train] == ["000.png", "001.png", "002.png", "003.PNG"]
    assert {s.label for s in obj.test} == {"good", "crack"}


def test_mvtec_missing_root_or_class_names_the_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match=str(missing)):
        load_mvtec(missing)
    _mvtec_class(tmp_path, "bottle")
    with pytest.raises(DataError, match=str(tmp_path / "cable")):
        load_mvtec(tmp_path, ["cable"])
    with pytest.raises(DataError, match="no MVTec AD class"):
        load_mvtec(tmp_path / "bottle" / "train")


def test_mvtec_defect_image_without_mask_names_expected_mask(tmp_path):
    c = _mvtec_class(tmp_path, "bottle")
    (c / "ground_truth" / "crack" / "001_mask.png").unlink()
    with pytest.raises(DataError, match=str(c / "ground_truth" / "crack" / "001_mask.png")):
        load_mvtec(tmp_path)


# ----------------------------------------------------------------------------- AutoVI


@pytest.mark.parametrize("nested", [False, True])
def test_autovi_loads_both_nestings_with_several_masks(tmp_path, nested):
    obj_dir = tmp_path / "pipe_clip" / "pipe_clip" if nested else tmp_path / "pipe_clip"
    _autovi_object(obj_dir)
    (obj, *rest) = load_autovi(tmp_path)
    assert not rest
    assert obj.name == "pipe_clip" and obj.root == obj_dir
    assert obj.mask_format == "valued" and obj.has_masks and obj.defects_config == AUTOVI_CONFIG
    assert [s.name for s in obj.train] == ["train/good/0000", "train/good/0001"]
    assert [s.name for s in obj.test] == ["test/good/0000", "test/missing/0000"]
    defect = obj.test[1]
    assert [p.name for p in defect.mask_paths] == ["0000.png", "0001.png", "0002.png"]
    assert load_autovi(tmp_path, ["pipe_clip"])[0].root == obj_dir


def test_autovi_mask_channels_keep_pixel_values_on_non_square_images(tmp_path):
    _autovi_object(tmp_path / "tank_screw")
    obj = load_autovi(tmp_path)[0]
    ds = ImageDataset(obj.test, ImageTransform(resize=None, imagesize=None), with_masks=True)
    good, defect = ds[0], ds[1]
    assert defect["original_size"] == (30, 40) and defect["image"].shape == (3, 30, 40)
    assert defect["mask_channels"].shape == (3, 30, 40) and defect["mask_channels"].dtype == torch.uint8
    assert [sorted(torch.unique(c).tolist()) for c in defect["mask_channels"]] == [
        [0, 255],
        [0, 128],
        [0, 255],
    ]
    assert sorted(torch.unique(defect["mask"]).tolist()) == [0, 1]
    assert good["mask_channels"].shape == (0, 30, 40) and int(good["mask"].sum()) == 0
    assert saturation_for(obj.defects_config, 128) == (200.0, False)
    assert saturation_for(obj.defects_config, 255) == (1.0, True)
    with pytest.raises(DataError, match="7"):
        saturation_for(obj.defects_config, 7)


def test_autovi_defect_without_ground_truth_folder_is_an_error(tmp_path):
    obj_dir = _autovi_object(tmp_path / "pipe_clip")
    _img(obj_dir / "test" / "missing" / "0001.png", (40, 30))
    with pytest.raises(DataError, match=str(obj_dir / "ground_truth" / "missing" / "0001")):
        load_autovi(tmp_path)


def test_autovi_requested_object_missing_names_the_path(tmp_path):
    _autovi_object(tmp_path / "pipe_clip")
    with pytest.raises(DataError, match=str(tmp_path / "engine_wiring")):
        load_autovi(tmp_path, ["engine_wiring"])


# ----------------------------------------------------------------------------- folder


def _folder_object(obj: Path, masks: bool = True) -> Path:
    for i in range(2):
        _img(obj / "train" / "good" / f"a{i}.jpg", seed=i)
    _img(obj / "test" / "good" / "g0.png", seed=3)
    _img(obj / "test" / "dent" / "d0.png", seed=4)
    _img(obj / "test" / "dent" / "d1.png", seed=5)
    if masks:
        _mask(obj / "ground_truth" / "dent" / "d0_mask.png")
        _mask(obj / "ground_truth" / "dent" / "d1.png")
    return obj


def test_folder_single_object(tmp_path):
    _folder_object(tmp_path / "widget")
    (obj,) = load_folder(tmp_path / "widget")
    assert obj.name == "widget" and obj.has_masks and obj.mask_format == "binary"
    assert [s.name for s in obj.train] == ["train/good/a0", "train/good/a1"]
    assert [(s.name, s.label) for s in obj.test] == [
        ("test/dent/d0", "dent"),
        ("test/dent/d1", "dent"),
        ("test/good/g0", "good"),
    ]
    assert obj.test[0].mask_paths[0].name == "d0_mask.png" and obj.test[1].mask_paths[0].name == "d1.png"
    assert load_folder(tmp_path / "widget", name="part")[0].name == "part"


def test_folder_multi_object_with_filter_and_optional_masks(tmp_path):
    _folder_object(tmp_path / "b_part", masks=False)
    _folder_object(tmp_path / "a_part")
    (tmp_path / "not_an_object").mkdir()
    objs = load_folder(tmp_path)
    assert [o.name for o in objs] == ["a_part", "b_part"]
    assert objs[0].has_masks and not objs[1].has_masks
    assert all(not s.mask_paths for s in objs[1].test)
    assert [o.name for o in load_folder(tmp_path, ["b_part"])] == ["b_part"]
    with pytest.raises(DataError, match=str(tmp_path / "c_part")):
        load_folder(tmp_path, ["c_part"])


def test_folder_train_only_is_fine(tmp_path):
    _img(tmp_path / "x" / "train" / "good" / "0.png")
    (obj,) = load_folder(tmp_path / "x")
    assert len(obj.train) == 1 and obj.test == [] and not obj.has_masks


def test_folder_missing_or_empty_folders_name_the_path(tmp_path):
    with pytest.raises(DataError, match=str(tmp_path / "missing")):
        load_folder(tmp_path / "missing")
    (tmp_path / "empty" / "train" / "good").mkdir(parents=True)
    with pytest.raises(DataError, match=str(tmp_path / "empty" / "train" / "good")):
        load_folder(tmp_path / "empty")
    (tmp_path / "nogood" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match=str(tmp_path / "nogood" / "train" / "good")):
        load_folder(tmp_path / "nogood")


# ----------------------------------------------------------------------------- ELPV


def test_elpv_counts_from_installed_package():
    objs = {o.name: o for o in load_elpv()}
    assert set(objs) == {"mono", "poly"}
    for name, n_good, n_bad in (("mono", 588, 313), ("poly", 920, 402)):
        obj = objs[name]
        assert not obj.has_masks
        assert len(obj.train) == math.floor(2 / 3 * n_good)
        assert all(s.label == "good" for s in obj.train)
        test_good = [s for s in obj.test if not s.is_anomalous]
        test_bad = [s for s in obj.test if s.is_anomalous]
        assert len(obj.train) + len(test_good) == n_good and len(test_bad) == n_bad
        assert {s.label for s in test_bad} == {"defective"}
    first = objs["mono"].train[0]
    assert first.image_path.is_file() and first.name.startswith("images/cell")


def test_elpv_uncertain_cells_and_object_filter():
    (mono,) = load_elpv(objects=["mono"], include_uncertain=True)
    assert sum(s.is_anomalous for s in mono.test) == 313 + 56  # 2/3 cells join, 1/3 cells stay out
    with pytest.raises(DataError, match="unknown"):
        load_elpv(objects=["cdte"])


# ----------------------------------------------------------------------------- dataset


def test_unreadable_image_is_reported_by_path(tmp_path):
    _mvtec_class(tmp_path, "bottle")
    bad = tmp_path / "bottle" / "train" / "good" / "001.png"
    bad.write_bytes(b"this is not a png")
    obj = load_mvtec(tmp_path)[0]
    ds = ImageDataset(obj.train, ImageTransform(16, 16))
    ds[0]
    with pytest.raises(DataError, match=str(bad)):
        ds[1]


def test_mask_of_wrong_size_names_both_files(tmp_path):
    c = _mvtec_class(tmp_path, "bottle")
    mask = _mask(c / "ground_truth" / "crack" / "000_mask.png", (20, 32))
    obj = load_mvtec(tmp_path)[0]
    ds = ImageDataset(obj.test, ImageTransform(16, 16), with_masks=True)
    with pytest.raises(DataError) as err:
        ds[0]
    assert str(mask) in str(err.value) and str(c / "test" / "crack" / "000.png") in str(err.value)


def test_collate_with_dataloader(tmp_path):
    _mvtec_class(tmp_path, "bottle")
    obj = load_mvtec(tmp_path)[0]
    ds = ImageDataset(obj.test, ImageTransform(24, 16), with_masks=True)
    batches = list(DataLoader(ds, batch_size=2, collate_fn=collate_samples))
    assert [len(b["label"]) for b in batches] == [2, 1]
    b = batches[0]
    assert b["image"].shape == (2, 3, 16, 16) and b["image"].dtype == torch.float32
    assert b["label"].tolist() == [1, 1] and b["index"].tolist() == [0, 1]
    assert b["mask"].shape == (2, 16, 16) and b["mask"].dtype == torch.uint8
    assert set(torch.unique(b["mask"]).tolist()) <= {0, 1} and b["mask"].sum() > 0
    assert [m.shape for m in b["mask_channels"]] == [(1, 16, 16), (1, 16, 16)]
    assert b["original_size"] == [(32, 32), (32, 32)]
    assert batches[1]["label"].tolist() == [0] and batches[1]["mask"].sum() == 0


def test_collate_without_masks_has_no_mask_keys(tmp_path):
    _mvtec_class(tmp_path, "bottle")
    ds = ImageDataset(load_mvtec(tmp_path)[0].train, ImageTransform(16, 16))
    batch = collate_samples([ds[0], ds[1]])
    assert "mask" not in batch and "mask_channels" not in batch


# ----------------------------------------------------------------------------- transforms


@pytest.mark.parametrize(
    ("resize", "imagesize", "size_wh"),
    [
        (256, 224, (300, 300)),
        (40, 32, (50, 37)),
        ((20, 30), 16, (41, 29)),
        (None, None, (40, 30)),
        (24, None, (40, 30)),
        (256, 224, (200, 300)),  # portrait
        (None, 64, (40, 31)),  # crop larger than the image: zero padding, odd margins
        (30, 40, (50, 37)),  # crop larger than the resized image
        ((30, 20), (24, 28), (41, 29)),
    ],
)
def test_image_transform_equals_torchvision_compose(tmp_path, resize, imagesize, size_wh):
    image = load_image(_img(tmp_path / "x.png", size_wh, seed=1))
    steps = ([T.Resize(resize)] if resize is not None else []) + (
        [T.CenterCrop(imagesize)] if imagesize is not None else []
    )
    reference = T.Compose([*steps, T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    tf = ImageTransform(resize, imagesize)
    out = tf(image)
    assert out.dtype == torch.float32
    assert torch.equal(out, reference(image))
    assert tuple(out.shape[1:]) == tf.output_size((size_wh[1], size_wh[0]))


@pytest.mark.parametrize(("resize", "imagesize"), [(29, 23), (None, 64), ((20, 30), None), (64, 70)])
def test_mask_transform_equals_torchvision_nearest_resize_and_centre_crop(resize, imagesize):
    mask = Image.fromarray(np.random.default_rng(2).integers(0, 256, (37, 53)).astype(np.uint8), "L")
    steps = ([T.Resize(resize, interpolation=T.InterpolationMode.NEAREST)] if resize is not None else []) + (
        [T.CenterCrop(imagesize)] if imagesize is not None else []
    )
    expected = np.array(T.Compose(steps)(mask), dtype=np.uint8)
    assert np.array_equal(ImageTransform(resize, imagesize).mask(mask).numpy(), expected)


def test_the_command_line_starts_without_importing_torchvision():
    # The transform is written out (equal to torchvision's, tests above) so that every command starts
    # about 1.3 s sooner; torchvision is imported only for a torchvision backbone.
    import subprocess
    import sys

    code = "import sys, patchcore.app.cli, patchcore.app.predict, patchcore.deploy.service; print('torchvision' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_mask_transform_uses_nearest_and_keeps_values():
    rng = np.random.default_rng(0)
    values = np.array([0, 64, 200], dtype=np.uint8)
    mask = values[rng.integers(0, 3, (37, 53))]
    tf = ImageTransform(29, 23)
    out = tf.mask(mask)
    assert out.shape == (23, 23) and out.dtype == torch.uint8
    assert set(torch.unique(out).tolist()) <= {0, 64, 200}
    binary = tf.mask(Image.fromarray((mask > 0).astype(np.uint8) * 255, "L"))
    assert set(torch.unique(binary).tolist()) <= {0, 255}
    # the mask and the image share their geometry
    assert tuple(out.shape) == tf.output_size((37, 53))


def test_to_original_restores_shape_and_fills_outside_crop_with_minimum():
    tf = ImageTransform(resize=16, imagesize=None)
    amap = np.random.default_rng(0).random(tf.output_size((30, 40))).astype(np.float32)
    assert amap.shape == (16, 21)
    back = tf.to_original(amap, (30, 40))
    assert back.shape == (30, 40) and back.dtype == np.float32

    cropped = ImageTransform(resize=32, imagesize=16)
    amap = np.full((16, 16), 5.0, dtype=np.float32)
    amap[0, 0] = 1.0
    back = cropped.to_original(amap, (64, 64))
    assert back.shape == (64, 64)
    assert back[0, 0] == pytest.approx(1.0) and back[32, 32] == pytest.approx(5.0)
    # a map at feature resolution is resized to the crop first
    assert cropped.to_original(np.zeros((4, 4)), (50, 70)).shape == (50, 70)


@pytest.mark.parametrize("crop", [16, (35, 45), (20, 50), (29, 39)])
def test_to_original_puts_the_crop_back_where_it_came_from(crop):
    # Without resizing, the crop (possibly padded, like CenterCrop does) must land exactly on the
    # pixels it was taken from; everything else gets the map's minimum.
    original = np.random.default_rng(0).integers(1, 255, (31, 41)).astype(np.uint8)
    tf = ImageTransform(resize=None, imagesize=crop)
    cropped = tf.mask(original).numpy().astype(np.float32)
    back = tf.to_original(cropped, original.shape)
    covered = back != cropped.min()
    assert covered.any()
    np.testing.assert_array_equal(back[covered], original[covered])
    assert np.all(back[~covered] == cropped.min())


def test_transform_dict_round_trip_is_json_able():
    tf = ImageTransform(resize=(300, 400), imagesize=None, mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2))
    d = json.loads(json.dumps(tf.to_dict()))
    assert d["resize"] == [300, 400]
    assert ImageTransform.from_dict(d) == tf
    assert ImageTransform.from_dict({}) == ImageTransform()
    with pytest.raises(ValueError, match="unknown"):
        ImageTransform.from_dict({"size": 3})


def test_sixteen_bit_and_rgba_images_load_as_rgb(tmp_path):
    arr16 = np.zeros((8, 10), dtype=np.uint16)
    arr16[:, 5:] = 4095  # 12-bit data in a 16-bit container
    arr16[0, 0] = 2048
    path16 = tmp_path / "deep.png"
    Image.fromarray(arr16).save(path16)
    assert Image.open(path16).mode.startswith("I")
    img = load_image(path16)
    rgb = np.asarray(img)
    assert img.mode == "RGB" and rgb.shape == (8, 10, 3)
    # Scaled (not clipped) by the container's 16 bits, never by the image's own maximum (issue 24 row 4d).
    assert rgb[0, 9, 0] == round(4095 * 255 / 65535) and rgb[1, 1, 0] == 0
    assert rgb[0, 0, 0] == round(2048 * 255 / 65535)

    rgba = _img(tmp_path / "alpha.png", (12, 9), mode="RGBA")
    img = load_image(rgba)
    assert img.mode == "RGB" and img.size == (12, 9)
    assert ImageTransform(8, 8)(Image.open(rgba)).shape == (3, 8, 8)
    gray = load_image(_img(tmp_path / "gray.png", mode="L"))
    assert gray.mode == "RGB"


def test_load_mask_reads_channel_zero_of_all_modes(tmp_path):
    for mode in ("L", "RGB", "RGBA"):
        arr = load_mask(_mask(tmp_path / f"{mode}.png", (10, 8), 128, mode))
        assert arr.shape == (8, 10) and arr.dtype == np.uint8 and set(np.unique(arr)) == {0, 128}
    Image.fromarray(np.eye(6, dtype=bool)).save(tmp_path / "one.png")
    assert set(np.unique(load_mask(tmp_path / "one.png"))) == {0, 255}
    (tmp_path / "bad.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match=str(tmp_path / "bad.png")):
        load_mask(tmp_path / "bad.png")


# ----------------------------------------------------------------------------- registry


def test_load_dataset_dispatches_and_rejects_unknown_kind(tmp_path):
    assert set(DATASETS) == {"mvtec", "autovi", "folder", "elpv", "mvtec_loco", "visa", "mvtec_ad2", "real_iad"}
    _mvtec_class(tmp_path, "bottle")
    assert [o.name for o in load_dataset("mvtec", tmp_path)] == ["bottle"]
    assert [o.name for o in load_dataset("elpv", None, ["poly"], train_fraction=0.5)] == ["poly"]
    with pytest.raises(ValueError, match="mvtec, autovi, folder, elpv, mvtec_loco, visa, mvtec_ad2, real_iad"):
        load_dataset("btad", tmp_path)
