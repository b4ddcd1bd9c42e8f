"""The ``patchcore`` command line: bad input gives exit status 2 and a one-line message naming the culprit."""

from __future__ import annotations

import importlib.util
import json
import multiprocessing
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from patchcore import __version__
from patchcore.app import cli
from patchcore.data import DataError
from patchcore.engine.model import PatchCore

FAST_MODEL = {"backbone": "resnet18", "weights": "random", "resize": 48, "imagesize": 48, "batch_size": 4}


def _image(path: Path, seed: int, size: tuple[int, int] = (48, 48)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    base = 128 + 40 * np.sin(x / 3.0 + seed) * np.cos(y / 4.0)
    Image.fromarray(np.clip(np.stack([base] * 3, -1), 0, 255).astype(np.uint8)).save(path)
    return path


def _mask(path: Path, size: tuple[int, int] = (48, 48)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    mask = np.zeros((h, w), dtype=np.uint8)
    mask[h // 3 : h // 2, w // 3 : w // 2] = 255
    Image.fromarray(mask).save(path)
    return path


def _mvtec(root: Path, name: str = "bottle") -> Path:
    for i in range(4):
        _image(root / name / "train" / "good" / f"{i:03d}.png", i)
    for i in range(2):
        _image(root / name / "test" / "good" / f"{i:03d}.png", 10 + i)
        _image(root / name / "test" / "broken" / f"{i:03d}.png", 20 + i)
        _mask(root / name / "ground_truth" / "broken" / f"{i:03d}_mask.png")
    return root


def _config(tmp_path: Path, data_root: Path | str, **extra) -> Path:
    data = {
        "project": "cli",
        "group": "g",
        "output_dir": str(tmp_path / "out"),
        "data": {"kind": "mvtec", "root": str(data_root), "num_workers": 0},
        "model": dict(FAST_MODEL),
        "evaluation": {"heatmaps": 0},
        "logging": {"progress": False},
    }
    data.update(extra)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _error_line(capsys, command: str, alone: bool = True) -> str:
    """The one-line error message the CLI wrote last to stderr.

    ``alone``: it is all of stderr (the error came before the run started logging its progress).
    """
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    prefix = f"patchcore {command}: error: "
    assert lines and lines[-1].startswith(prefix), err
    assert sum(line.startswith(prefix) for line in lines) == 1, err
    assert "Traceback" not in err
    if alone:
        assert len(lines) == 1, err
    return lines[-1]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    """A small fitted model, saved as ``patchcore train`` would."""
    base = tmp_path_factory.mktemp("model")
    images = [_image(base / "train" / f"{i}.png", i) for i in range(4)]
    model = PatchCore(**FAST_MODEL, device="cpu").fit([str(p) for p in images])
    return model.save(base / "patchcore_bottle.pt")


# ----------------------------------------------------------------------------- plain commands


def test_version_is_printed(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"patchcore {__version__}"


def test_backbones_lists_the_registry(capsys):
    assert cli.main(["backbones"]) == 0
    names = capsys.readouterr().out.split()
    assert {"wideresnet50", "resnet18", "efficientnet-lite0", "timm:<model"} <= set(names)


def test_missing_subcommand_or_required_option_is_a_usage_error(capsys):
    for argv in ([], ["predict", "image.png"], ["train", "--log-online", "tensorboard"]):
        with pytest.raises(SystemExit) as info:
            cli.main(argv)
        assert info.value.code == 2
    capsys.readouterr()


# ----------------------------------------------------------------------------- configuration errors


def test_unknown_config_key_exits_2_naming_the_key_and_the_file(tmp_path, capsys):
    config = _config(tmp_path, tmp_path, model={**FAST_MODEL, "bakbone": "resnet18"})
    assert cli.main(["train", "--config", str(config)]) == 2
    line = _error_line(capsys, "train")
    assert "model.bakbone" in line and str(config) in line
    assert not (tmp_path / "out").exists()


def test_wrong_type_in_config_exits_2_naming_the_key_and_the_file(tmp_path, capsys):
    config = _config(tmp_path, tmp_path, seed="zero")
    assert cli.main(["train", "-c", str(config)]) == 2
    line = _error_line(capsys, "train")
    assert "'seed'" in line and str(config) in line


def test_bad_override_exits_2_naming_it(tmp_path, capsys):
    config = _config(tmp_path, tmp_path)
    assert cli.main(["train", "-c", str(config), "model.batch_size=lots"]) == 2
    assert "model.batch_size" in _error_line(capsys, "train")
    assert cli.main(["train", "-c", str(config), "model.unknown=1"]) == 2
    assert "model.unknown" in _error_line(capsys, "train")


def test_missing_config_file_exits_2(tmp_path, capsys):
    assert cli.main(["train", "-c", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml" in _error_line(capsys, "train")


# ----------------------------------------------------------------------------- data errors


def test_missing_data_folder_exits_2_and_takes_no_run_folder(tmp_path, capsys):
    missing = tmp_path / "no_such_data"
    config = _config(tmp_path, missing)
    assert cli.main(["train", "-c", str(config)]) == 2
    assert str(missing) in _error_line(capsys, "train")
    assert not (tmp_path / "out" / "cli" / "g").exists()
    # Fixed, the run gets the group's own folder, not g_1.
    _mvtec(missing)
    assert cli.main(["train", "-c", str(config)]) == 0
    capsys.readouterr()
    assert sorted(p.name for p in (tmp_path / "out" / "cli").iterdir()) == ["g"]


def test_mask_of_wrong_size_exits_2_naming_both_files(tmp_path, capsys):
    root = _mvtec(tmp_path / "data")
    bad_mask = _mask(root / "bottle" / "ground_truth" / "broken" / "001_mask.png", size=(32, 32))
    assert cli.main(["train", "-c", str(_config(tmp_path, root))]) == 2
    line = _error_line(capsys, "train", alone=False)
    assert str(bad_mask) in line
    assert str(root / "bottle" / "test" / "broken" / "001.png") in line


@pytest.mark.parametrize("workers", [0, 2])
def test_undecodable_training_image_exits_2_with_one_line_naming_it(tmp_path, capsys, workers):
    root = _mvtec(tmp_path / "data")
    broken = root / "bottle" / "train" / "good" / "002.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    config = _config(tmp_path, root)
    # With workers the error comes back from another process, wrapped in that process's traceback.
    assert cli.main(["train", "-c", str(config), f"data.num_workers={workers}"]) == 2
    line = _error_line(capsys, "train", alone=False)
    assert line.startswith(f"patchcore train: error: cannot read image {broken}")
    # The failed loader's worker processes are stopped at once, not left for a later (stalling) collection.
    assert multiprocessing.active_children() == []


def test_one_line_keeps_the_original_message_of_a_data_loader_worker_error():
    wrapped = DataError(
        "Caught DataError in DataLoader worker process 0.\n"
        "Original Traceback (most recent call last):\n"
        '  File "x.py", line 1, in f\n'
        "    raise DataError(...)\n"
        "patchcore.data.base.DataError: cannot read image /d/a.png: Truncated File Read\n"
    )
    assert cli._one_line(wrapped) == "cannot read image /d/a.png: Truncated File Read"
    assert cli._one_line(ValueError("first\n\n  second ")) == "first second"


def test_tracker_package_missing_exits_2_saying_what_to_install(tmp_path, capsys, monkeypatch):
    """Catches a tracker that fails late (after the run folder exists) or with a traceback when its package
    is missing. CI installs both trackers, so their absence is simulated: find_spec answers None for them."""
    real_find_spec = importlib.util.find_spec
    missing = ("wandb", "mlflow")
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name in missing else real_find_spec(name, *a)
    )
    config = _config(tmp_path, _mvtec(tmp_path / "data"))
    for name in missing:
        assert cli.main(["train", "-c", str(config), "--log-online", name]) == 2
        line = _error_line(capsys, "train")
        assert f"--log-online {name}" in line and f"pip install {name}" in line
        assert cli.main(["train", "-c", str(config), f"logging.online={name}"]) == 2
        assert f"pip install {name}" in _error_line(capsys, "train")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- model and image errors


def _corrupt_copies(model_file: Path, tmp_path: Path) -> list[Path]:
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(model_file.read_bytes()[:2000])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"garbage" * 100)
    pickled = tmp_path / "pickled.pt"
    torch.save({"format": "something else"}, pickled)
    return [truncated, garbage, pickled]


def test_corrupt_model_file_exits_2_for_predict(model_file, tmp_path, capsys):
    image = _image(tmp_path / "x.png", 3)
    for bad in _corrupt_copies(model_file, tmp_path):
        assert cli.main(["predict", "-m", str(bad), str(image), "-o", str(tmp_path / "p")]) == 2
        line = _error_line(capsys, "predict")
        assert str(bad) in line and "model file" in line
    assert not (tmp_path / "p" / "predictions.jsonl").exists()


def test_corrupt_or_missing_model_file_exits_2_for_evaluate(model_file, tmp_path, capsys):
    config = _config(tmp_path, _mvtec(tmp_path / "data"))
    for bad in [*_corrupt_copies(model_file, tmp_path), tmp_path / "missing.pt"]:
        assert cli.main(["evaluate", "-m", str(bad), "-c", str(config)]) == 2
        assert str(bad) in _error_line(capsys, "evaluate")


def test_evaluate_model_of_an_object_not_in_the_data_exits_2(model_file, tmp_path, capsys):
    config = _config(tmp_path, _mvtec(tmp_path / "data", name="cable"))
    assert cli.main(["evaluate", "-m", str(model_file), "-c", str(config)]) == 2
    line = _error_line(capsys, "evaluate")
    assert "'bottle'" in line and "cable" in line


def test_undecodable_or_missing_image_exits_2_naming_it(model_file, tmp_path, capsys):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    good = _image(tmp_path / "fine.png", 1)
    for bad in (broken, tmp_path / "absent.png"):
        assert (
            cli.main(["predict", "-m", str(model_file), str(good), str(bad), "-o", str(tmp_path / "p")]) == 2
        )
        assert str(bad) in _error_line(capsys, "predict")
    empty = tmp_path / "empty_folder"
    empty.mkdir()
    assert cli.main(["predict", "-m", str(model_file), str(empty)]) == 2
    assert str(empty) in _error_line(capsys, "predict")


def _unit_from_heatmap(path: Path) -> np.ndarray:
    """The [0, 1] map a heatmap PNG shows, read back from its pixels: the right half is the image blended
    half and half with the colour scale, so colour = 2 * right - left; each colour is inverted to the
    nearest value of a fine sampling of the scale (the palette's path is monotone in its values)."""
    from patchcore.heatmaps import colorize

    pixels = np.asarray(Image.open(path), dtype=np.float64)
    width = pixels.shape[1] // 2
    colour = 2.0 * pixels[:, width:] - pixels[:, :width]
    values = np.linspace(0.0, 1.0, 2049)
    palette = colorize(values).astype(np.float64)  # (2049, 3)
    distances = ((colour.reshape(-1, 1, 3) - palette[None]) ** 2).sum(-1)
    return values[distances.argmin(1)].reshape(colour.shape[:2])


def test_predict_with_a_model_never_evaluated_uses_one_range_for_all_images(model_file, tmp_path, capsys):
    """Three images with different score ranges, scored one per batch: every heatmap's pixels must show its
    map scaled by ONE range, the minimum and maximum over all three maps (computed here from the estimator's
    own maps, not from predict). Catches: a per-image range (every heatmap reaching the top colour), a
    per-batch range (the same, with --batch-size 1), the first image's range, and normalised scores not
    taken over the call (with two images min-max is always [0, 1]; with three the middle one must sit at its
    own place)."""
    images = [_image(tmp_path / "plain.png", 40)]
    for name, box, value in (("spot", (20, 20, 26, 26), 255), ("patch", (6, 6, 30, 30), 0)):
        pixels = np.asarray(Image.open(_image(tmp_path / f"{name}.png", 41))).copy()
        top, left, bottom, right = box
        pixels[top:bottom, left:right] = value
        Image.fromarray(pixels).save(tmp_path / f"{name}.png")
        images.append(tmp_path / f"{name}.png")
    out = tmp_path / "p"
    argv = ["predict", "-m", str(model_file), *map(str, images), "-o", str(out), "--batch-size", "1"]
    assert cli.main(argv) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["anomalous"] for r in records] == [None, None, None]  # no threshold without a calibration

    model = PatchCore.load(model_file, device="cpu")
    batch = torch.stack([model.transform(Image.open(p)) for p in images])
    reference = model.predict(batch)
    maps, scores = reference.anomaly_maps, reference.image_scores
    low, high = float(maps.min()), float(maps.max())
    expected_scores = (scores - scores.min()) / (scores.max() - scores.min())
    assert [r["score"] for r in records] == pytest.approx(scores.tolist(), rel=1e-5)
    assert [r["normalized_score"] for r in records] == pytest.approx(expected_scores.tolist(), abs=1e-6)
    assert 0.05 < sorted(expected_scores)[1] < 0.95  # the middle image is not at an end of the range
    peaks = []
    for record, amap in zip(records, maps, strict=True):
        shown = _unit_from_heatmap(Path(record["heatmap"]))
        expected = (amap - low) / (high - low)  # 48 x 48 images: the map is at native size
        assert shown.shape == expected.shape
        assert np.abs(shown - expected).max() < 0.03
        peaks.append(float(expected.max()))
    assert max(peaks) == pytest.approx(1.0) and min(peaks) < 0.9  # the ranges really differ


# ----------------------------------------------------------------------------- the installed command


def test_installed_patchcore_command_exits_2_with_one_line_on_an_unknown_key(tmp_path):
    command = Path(sys.executable).parent / "patchcore"
    if not command.is_file():
        pytest.skip(f"console script not installed beside {sys.executable}")
    config = _config(tmp_path, tmp_path, evaluation={"heatmap": 3})
    done = subprocess.run(
        [str(command), "train", "-c", str(config), "model.percentage=0.05"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "evaluation.heatmap" in lines[0] and str(config) in lines[0]
    assert done.stdout == ""


def test_predict_with_other_backbone_weights_exits_2_saying_which_were_used(model_file, tmp_path, capsys):
    from patchcore.engine.backbones import load_backbone

    network, _, _ = load_backbone("resnet18", "random", seed=12345)
    other = tmp_path / "other.pth"
    torch.save(network.state_dict(), other)
    good = _image(tmp_path / "fine.png", 1)
    code = cli.main(
        ["predict", "-m", str(model_file), str(good), "--weights", str(other), "-o", str(tmp_path / "p")]
    )
    assert code == 2
    assert "fitted with backbone weights" in _error_line(capsys, "predict")
