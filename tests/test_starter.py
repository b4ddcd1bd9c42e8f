"""The first hour: ``patchcore train FOLDER``, ``patchcore init [KIND]``, and ``--help`` naming every data kind."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from patchcore.app import cli
from patchcore.app.config import config_to_dict, load_config
from patchcore.app.starter import FOLDER_CALIBRATION_FRACTION, folder_overrides, starter_yaml
from patchcore.data import DATASETS

FAST = ["model.backbone=resnet18", "model.weights=random", "model.resize=32", "model.imagesize=32",
        "data.num_workers=0", "evaluation.heatmaps=0", "--no-progress"]  # fmt: skip


def _save(path: Path, gray: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(np.stack([gray] * 3, -1), 0, 255).astype(np.uint8)).save(path)


def _parts(root: Path, test: bool) -> Path:
    y, x = np.mgrid[0:40, 0:40]
    for i in range(6):
        _save(root / "train" / "good" / f"{i:03d}.png", 120 + 30 * np.sin(x / 4.0 + 0.1 * i))
    if test:
        _save(root / "test" / "good" / "000.png", 120 + 30 * np.sin(x / 4.0))
        crack = 120 + 30 * np.sin(x / 4.0)
        crack[12:28, 12:28] = 255
        _save(root / "test" / "crack" / "000.png", crack)
    return root


@pytest.mark.parametrize("with_test", [False, True])
def test_train_on_a_folder_needs_no_config(tmp_path, capsys, with_test):
    parts = _parts(tmp_path / "parts", with_test)
    out = tmp_path / "results"
    assert cli.main(["train", str(parts), f"output_dir={out}", *FAST]) == 0
    run = out / "parts" / "default"  # the project is named after the folder
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["data"]["kind"] == "folder" and config["data"]["root"] == str(parts)
    assert config["evaluation"]["calibration_fraction"] == FOLDER_CALIBRATION_FRACTION
    record = json.loads((run / "models" / "patchcore_parts.json").read_text())
    # decides good / defective from held-out goods
    assert record["calibration"]["image_threshold"] is not None
    assert not (run / "incomplete").exists()
    if with_test:
        assert record["metrics"]["image_auroc"] is not None
    else:
        assert record["metrics"] == {}  # train only: model + calibration, no metrics
    # the paper's settings apart from what the command line overrode
    defaults = config_to_dict(load_config(None, ["data.kind=folder", "data.root=x"]))["model"]
    overridden = {"backbone", "weights", "resize", "imagesize"}
    assert {k: v for k, v in config["model"].items() if k not in overridden} == {
        k: v for k, v in defaults.items() if k not in overridden
    }


def test_folder_overrides_come_first_so_the_users_own_win(tmp_path):
    parts = _parts(tmp_path / "my parts: v2", test=False)
    config = load_config(
        None, folder_overrides([str(parts), "project=mine", "evaluation.calibration_fraction=0"], None)
    )
    assert (config.project, config.data.root, config.evaluation.calibration_fraction) == (
        "mine",
        str(parts),
        0.0,
    )
    assert config.data.kind == "folder"


def test_a_folder_with_a_config_or_a_missing_folder_exits_2_with_one_line(tmp_path, capsys):
    parts = _parts(tmp_path / "parts", test=False)
    config = tmp_path / "c.yaml"
    config.write_text("data:\n  kind: folder\n  root: x\n")
    assert cli.main(["train", str(parts), "-c", str(config)]) == 2
    assert "either a configuration file or a folder" in capsys.readouterr().err
    assert cli.main(["train", str(tmp_path / "nope"), f"output_dir={tmp_path / 'out'}"]) == 2
    assert "is neither a KEY=VALUE override nor a folder" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", sorted(DATASETS))
def test_init_writes_every_key_at_its_default_with_comments_and_it_loads(tmp_path, kind):
    target = tmp_path / "patchcore.yaml"
    assert cli.main(["init", kind, "--out", str(target)]) == 0
    text = target.read_text()
    config = load_config(target)
    expected = config_to_dict(load_config(None, [f"data.kind={kind}", "data.root=x", f"project={kind}"]))
    loaded = config_to_dict(config)
    expected["data"]["root"] = loaded["data"]["root"]
    expected.pop("federated"), loaded.pop("federated")
    assert loaded == expected
    assert (loaded["data"]["root"] is None) == (kind == "elpv")
    # every key line carries its help as a comment
    key_lines = [line for line in text.splitlines() if ":" in line and not line.lstrip().startswith("#")]
    assert all("  # " in line for line in key_lines if not line.rstrip().endswith(":"))
    assert "  percentage: 0.1  # memory bank size as a fraction of all training patches" in text


def test_init_refuses_to_replace_a_file_and_an_unknown_kind(tmp_path, capsys):
    target = tmp_path / "patchcore.yaml"
    target.write_text("mine")
    assert cli.main(["init", "mvtec", "--out", str(target)]) == 2
    assert "exists; use --force" in capsys.readouterr().err
    assert target.read_text() == "mine"
    assert cli.main(["init", "mvtec", "--out", str(target), "--force"]) == 0
    assert cli.main(["init", "nope", "--out", str(tmp_path / "x.yaml")]) == 2
    assert "unknown data kind 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["train", "init"])
def test_help_lists_every_data_kind(capsys, command):
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    out = capsys.readouterr().out
    for kind in DATASETS:
        assert any(line.split()[:1] == [kind] for line in out.splitlines()), kind


def test_starter_of_a_kind_is_stable_text():
    assert starter_yaml("folder") == starter_yaml("folder")
    assert 'kind: "folder"' in starter_yaml("folder")
