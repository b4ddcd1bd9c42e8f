"""defects_config.json checked like the official scripts, MVTec LOCO and VisA layouts, warnings for empty truth."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_official_eval import make_object

from patchcore.data import DataError, load_dataset, saturation_for
from patchcore.data.autovi import load_defects_config


def _config(tmp_path: Path, entries: list[dict]) -> Path:
    path = tmp_path / "defects_config.json"
    path.write_text(json.dumps(entries))
    return path


def _entry(**changes) -> dict:
    return {
        "defect_name": "dent",
        "pixel_value": 100,
        "saturation_threshold": 6,
        "relative_saturation": False,
    } | changes


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"relative_saturation": "false"}, "relative_saturation must be a JSON boolean"),
        ({"relative_saturation": True, "saturation_threshold": 1.5}, r"float in \(0, 1\]"),
        ({"relative_saturation": True, "saturation_threshold": 0.0}, r"float in \(0, 1\]"),
        ({"relative_saturation": True, "saturation_threshold": 1}, r"float in \(0, 1\]"),
        ({"saturation_threshold": None}, "saturation_threshold is null"),
        ({"saturation_threshold": 6.5}, "positive integer pixel count"),
        ({"pixel_value": 0}, "pixel_value must be an integer in 1..255"),
        ({"pixel_value": 300}, "pixel_value must be an integer in 1..255"),
    ],
)
def test_defects_config_is_checked_as_strictly_as_the_official_script(tmp_path, change, message):
    path = _config(tmp_path, [_entry(defect_name="ok"), _entry(**({"pixel_value": 7} | change))])
    with pytest.raises(DataError, match=message) as caught:
        load_defects_config(path)
    assert str(path) in str(caught.value) and "entry 1" in str(caught.value)  # names the file and the entry


def test_duplicate_pixel_value_keeps_the_last_entry_like_the_official_script_and_warns(tmp_path, caplog):
    path = _config(
        tmp_path, [_entry(saturation_threshold=6), _entry(defect_name="hole", saturation_threshold=40)]
    )
    with caplog.at_level(logging.WARNING, logger="patchcore"):
        config = load_defects_config(path)
    assert "pixel_value 100 is given by entries 0 and 1" in caplog.text
    assert saturation_for(config, 100) == (40.0, False)


def test_loco_layout_loads_validation_goods_and_per_type_labels(tmp_path):
    make_object(tmp_path, loco=True)
    (obj,) = load_dataset("mvtec_loco", tmp_path, ["toy"])
    assert obj.protocol.name == "mvtec_loco" and obj.mask_format == "valued"
    assert [s.name for s in obj.validation] == ["validation/good/000", "validation/good/001"]
    assert {s.label for s in obj.test} == {"good", "logical_anomalies", "structural_anomalies"}
    assert len([s for s in obj.test if s.label == "logical_anomalies"][0].mask_paths) == 2
    (tmp_path / "toy" / "test" / "mystery").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "toy" / "test" / "mystery" / "000.png")
    with pytest.raises(DataError, match="mystery"):
        load_dataset("mvtec_loco", tmp_path, ["toy"])


def _visa_tree(root: Path) -> Path:
    rows = ["object,split,label,image,mask"]
    for obj in ("candle", "pcb1"):
        images = root / obj / "Data" / "Images"
        for i in range(3):
            for folder in ("Normal", "Anomaly"):
                (images / folder).mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (12, 10), (i * 40, 0, 0)).save(
                    images / folder / f"{i:03d}.JPG", format="JPEG"
                )
            rows.append(f"{obj},{'train' if i < 2 else 'test'},normal,{obj}/Data/Images/Normal/{i:03d}.JPG,")
        masks = root / obj / "Data" / "Masks" / "Anomaly"
        masks.mkdir(parents=True)
        for i in range(3):
            label = np.zeros((10, 12), dtype=np.uint8)
            label[2:5, 3:7] = 3  # a class id: looks black, still a defect
            Image.fromarray(label).save(masks / f"{i:03d}.png")
            mask = f"{obj}/Data/Masks/Anomaly/{i:03d}.png" if i < 2 else ""  # one anomaly without a mask
            rows.append(f"{obj},test,anomaly,{obj}/Data/Images/Anomaly/{i:03d}.JPG,{mask}")
    (root / "split_csv").mkdir()
    (root / "split_csv" / "1cls.csv").write_bytes(("\r\n".join(rows) + "\r\n").encode())
    return root


def test_visa_split_comes_from_1cls_csv_with_name_collisions_and_class_id_masks(tmp_path):
    objs = load_dataset("visa", _visa_tree(tmp_path))
    assert [o.name for o in objs] == ["candle", "pcb1"]
    candle = objs[0]
    assert [s.name for s in candle.train] == ["Data/Images/Normal/000", "Data/Images/Normal/001"]
    names = [s.name for s in candle.test]
    assert "Data/Images/Normal/002" in names and "Data/Images/Anomaly/002" in names  # same stem, both kept
    assert len(set(names)) == len(names) == 4
    assert candle.has_masks and [bool(s.mask_paths) for s in candle.test if s.is_anomalous] == [
        True,
        True,
        False,
    ]
    (pcb,) = load_dataset("visa", tmp_path, ["pcb1"])
    assert pcb.root == tmp_path / "pcb1"
    with pytest.raises(DataError, match="'pcb9' is not in"):
        load_dataset("visa", tmp_path, ["pcb9"])


def test_visa_class_id_masks_count_as_defects_after_the_transform(tmp_path):
    from patchcore.data import ImageDataset, ImageTransform

    (candle,) = load_dataset("visa", _visa_tree(tmp_path), ["candle"])
    dataset = ImageDataset(candle.test, ImageTransform(resize=None, imagesize=None), with_masks=True)
    item = next(dataset[i] for i, s in enumerate(candle.test) if s.mask_paths)
    assert int(item["mask"].sum()) == 12  # the 3x4 region of class id 3
