"""Every refused input, and every path that once gave a silent wrong answer or lost work (issue 12).

One test (or one parametrized group) per row of the issue's table, in its order; each says what is done
and what must happen now. Models are random-weight ResNet-18s on 48-pixel images, so each test takes a
second or two.

Row "8 threads call predict on one fitted PatchCore" is pinned down by
tests/test_inference.py::test_eight_threads_predicting_on_one_model_get_exactly_the_serial_results
(8 threads x 50 images against a serial run, bit-identical).
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_workflow import make_folder, make_mvtec, read_csv, save, texture, with_square, write_config
from test_workflow import run_cli as workflow_cli

from patchcore import PatchCore
from patchcore.app import cli
from patchcore.app.cache import fit_cached
from patchcore.app.runs import INCOMPLETE_MARKER, run_state
from patchcore.data import load_image
from patchcore.engine.backbones import load_backbone
from patchcore.engine.model import ModelFileError, NonFiniteError
from patchcore.engine.params import ParamError

pytestmark = pytest.mark.usefixtures("single_torch_thread")

SRC = Path(__file__).resolve().parents[1] / "src"


def tiny_model(**overrides) -> PatchCore:
    params = dict(
        backbone="resnet18", weights="random", resize=32, imagesize=32, device="cpu", percentage=0.5,
        batch_size=4,
    )  # fmt: skip
    params.update(overrides)
    return PatchCore(**params)


def random_images(n: int, seed: int = 0, size: int = 32) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).normal(size=(n, 3, size, size)).astype(np.float32))


@pytest.fixture(scope="module")
def fitted() -> PatchCore:
    return tiny_model().fit(random_images(4))


def run_cli(*argv) -> tuple[int, str, str]:
    """The CLI in this process; a usage error's SystemExit becomes its exit status."""
    try:
        return workflow_cli(*argv)
    except SystemExit as exc:
        return int(exc.code), "", ""


def error_line(err: str, command: str) -> str:
    """The one stderr line of a refused command (no traceback)."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err
    assert lines and lines[-1].startswith(f"patchcore {command}: error: "), err
    return lines[-1]


def run_dirs(output_dir: Path) -> list[Path]:
    return sorted(p for p in output_dir.glob("*/*") if p.is_dir())


# ------------------------------------------------------------- set_params after fit


@pytest.mark.parametrize(
    "change", [{"patchsize": 5}, {"layers": ["layer2"]}, {"target_embed_dimension": 64}, {"resize": 40}]
)
def test_changing_a_feature_setting_after_fit_unfits_the_model_so_predict_and_save_refuse(change, tmp_path):
    model = tiny_model().fit(random_images(4))
    model.set_params(**change)
    name = next(iter(change))
    with pytest.raises(RuntimeError, match=f"not fitted: {name} was changed"):
        model.predict(random_images(1, seed=1))
    with pytest.raises(RuntimeError, match=f"not fitted: {name} was changed"):
        model.save(tmp_path / "model.pt")
    assert not (tmp_path / "model.pt").exists()
    model.fit(random_images(4))  # a new fit with the new value is fine
    assert model.get_params()[name] == next(iter(change.values()))


def test_changing_a_search_setting_after_fit_keeps_the_fit(fitted):
    """The bank stays bit for bit, and the scores are those of the new setting on that bank: the mean of
    the 2 nearest bank rows' Euclidean distances per patch (a float64 brute force written here), maximum
    per image. Catches: set_params unfitting or re-sampling the bank, the old index (k = 1) kept, and the
    new kind searching another bank."""
    model = PatchCore.from_state_dict(fitted.state_dict(), device="cpu")
    images = random_images(2, seed=1)
    before = model.predict(images).image_scores
    model.set_params(num_neighbors=2, index_kind="pruned")
    np.testing.assert_array_equal(model.memory_bank_, fitted.memory_bank_)
    after = model.predict(images).image_scores
    rows, grid = model._patch_features()(images)
    features = rows.double().numpy()
    bank = fitted.memory_bank_.astype(np.float64)
    distances = np.sqrt(((features[:, None, :] - bank[None]) ** 2).sum(-1))
    expected = np.sort(distances, axis=1)[:, :2].mean(1).reshape(len(images), -1).max(1)
    np.testing.assert_allclose(after, expected, rtol=1e-5)
    assert not np.allclose(after, before, rtol=1e-3)  # k = 2 really differs from k = 1 here


# ------------------------------------------------------------- two runs share cache_dir


def test_two_runs_sharing_a_cache_never_fail_and_get_the_same_bank(tmp_path):
    images = random_images(5)
    expected = tiny_model().fit(images).memory_bank_
    for round_ in range(4):  # the old cache failed about one run in three
        cache = tmp_path / f"cache{round_}"
        barrier = threading.Barrier(2)
        banks, errors = [], []

        def run(barrier=barrier, cache=cache, banks=banks, errors=errors) -> None:
            try:
                model = tiny_model()
                barrier.wait()
                banks.append(fit_cached(model, images, cache).memory_bank_)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=run) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        for bank in banks:
            np.testing.assert_array_equal(bank, expected)
        assert [p.name for p in cache.iterdir() if not p.name.startswith(".")] != []
        assert not [p for p in cache.iterdir() if p.name.startswith((".staging", ".trash"))]


# ------------------------------------------------------------- cache entry overwritten with zeros


def test_cache_entry_overwritten_with_zeros_is_recomputed_with_a_warning(tmp_path, caplog):
    images = random_images(5)
    first = fit_cached(tiny_model(), images, tmp_path)
    (feature_file,) = tmp_path.glob("*/features.f32")
    feature_file.write_bytes(bytes(feature_file.stat().st_size))  # same size, all zeros
    with caplog.at_level(logging.WARNING, logger="patchcore"):
        again = fit_cached(tiny_model(), images, tmp_path)
    assert again.stats_.feature_cache == "miss"
    assert "is corrupted (checksum" in caplog.text and "recomputing it" in caplog.text
    np.testing.assert_array_equal(again.memory_bank_, first.memory_bank_)
    assert fit_cached(tiny_model(), images, tmp_path).stats_.feature_cache == "hit"  # repaired


# ------------------------------------------------------------- one unreadable test image


def test_unreadable_test_image_is_refused_before_the_run_folder_is_created(tmp_path):
    data = make_mvtec(tmp_path / "data", classes=("bottle",))
    bad = data / "bottle" / "test" / "broken" / "001.png"
    bad.write_text("not an image")
    config = write_config(tmp_path / "c.yaml", "mvtec", data, tmp_path / "out")
    code, _, err = run_cli("train", "--config", config)
    assert code == 2
    assert error_line(err, "train").startswith(f"patchcore train: error: cannot read image {bad}")
    assert run_dirs(tmp_path / "out") == []


def test_image_that_fails_only_when_decoded_during_evaluation_keeps_the_fitted_model(tmp_path):
    data = make_mvtec(tmp_path / "data", classes=("bottle",))
    bad = data / "bottle" / "test" / "good" / "001.png"
    bad.write_bytes(bad.read_bytes()[:-60])  # the header is fine, the pixels are cut off
    config = write_config(tmp_path / "c.yaml", "mvtec", data, tmp_path / "out")
    code, _, err = run_cli("train", "--config", config)
    assert code == 2 and str(bad) in error_line(err, "train")
    (run_dir,) = run_dirs(tmp_path / "out")
    model = PatchCore.load(run_dir / "models" / "patchcore_bottle.pt", device="cpu")  # the fit survived
    assert model.stats_.object == "bottle"
    assert run_state(run_dir).objects == {"bottle": "fitted"}


# ------------------------------------------------------------- predict --out twice


def test_predict_into_a_non_empty_out_folder_is_refused_unless_overwrite(fitted, tmp_path):
    model = fitted.save(tmp_path / "patchcore_obj.pt")
    image = save(tmp_path / "img.png", texture(32, 32, 0))
    out = tmp_path / "pred"
    assert run_cli("predict", "-m", model, image, "--out", out)[0] == 0
    before = (out / "predictions.jsonl").read_bytes()
    code, _, err = run_cli("predict", "-m", model, image, "--out", out)
    assert code == 2
    assert error_line(err, "predict") == (
        f"patchcore predict: error: --out folder {out} is not empty (2 entries: img_heatmap.png, "
        "predictions.jsonl); pass --overwrite to replace earlier results, or choose another folder"
    )
    assert (out / "predictions.jsonl").read_bytes() == before
    assert run_cli("predict", "-m", model, image, "--out", out, "--overwrite")[0] == 0


# ------------------------------------------------------------- --batch-size -1


@pytest.mark.parametrize("value", ["-1", "0", "two"])
def test_predict_batch_size_below_one_exits_2(fitted, tmp_path, value, capsys):
    model = fitted.save(tmp_path / "patchcore_obj.pt")
    image = save(tmp_path / "img.png", texture(32, 32, 0))
    with pytest.raises(SystemExit) as exited:
        cli.main(["predict", "-m", str(model), str(image), "--out", str(tmp_path / "p"), "--batch-size", value])
    assert exited.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    shown = repr(value) if value == "two" else value
    assert err == (
        f"patchcore predict: error: argument --batch-size: must be an integer >= 1, got {shown} "
        "(see patchcore predict --help)\n"
    )
    assert not (tmp_path / "p").exists()


# ------------------------------------------------------------- config values out of range


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.patchsize=2", "key 'model.patchsize' must be an odd integer >= 1, got 2"),
        ("model.target_embed_dimension=0", "key 'model.target_embed_dimension' must be >= 1, got 0"),
        ("model.device=tpu", "key 'model.device' must be auto, cpu, cuda, cuda:N or mps, got 'tpu'"),
        ("data.num_workers=-1", "key 'data.num_workers' must be >= 0, got -1"),
        ("model.resize=-5", "key 'model.resize' must be an integer >= 1 or a [height, width] pair of them, got -5"),
        ("evaluation.pro_fpr_limit=2", "key 'evaluation.pro_fpr_limit' must be in (0, 1], got 2"),
        # A degenerate bank rather than a traceback: refused as well.
        ("model.projection_dim=0", "key 'model.projection_dim' must be >= 1, got 0"),
        ("model.num_starting_points=0", "key 'model.num_starting_points' must be >= 1, got 0"),
    ],
)
def test_out_of_range_config_value_exits_2_naming_the_key_before_a_run_folder_exists(tmp_path, override, message):
    data = make_folder(tmp_path / "data")
    config = write_config(tmp_path / "c.yaml", "folder", data, tmp_path / "out")
    code, _, err = run_cli("train", "--config", config, override)
    assert code == 2
    assert error_line(err, "train") == f"patchcore train: error: {config} (with overrides {override}): {message}"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"patchsize": 2}, "PatchCore parameter 'patchsize' must be an odd integer >= 1, got 2"),
        ({"projection_dim": 0}, "PatchCore parameter 'projection_dim' must be >= 1, got 0"),
        ({"percentage": 0.0}, "PatchCore parameter 'percentage' must be in (0, 1], got 0.0"),
        ({"batch_size": "8"}, "PatchCore parameter 'batch_size' must be an integer, got '8'"),
    ],
)
def test_the_estimator_refuses_the_same_values_when_constructed(params, message):
    with pytest.raises(ParamError) as caught:
        PatchCore(**params)
    assert str(caught.value) == message


# ------------------------------------------------------------- a YAML section written twice


def test_yaml_section_written_twice_exits_2_naming_the_key_and_the_file(tmp_path):
    data = make_folder(tmp_path / "data")
    config = write_config(tmp_path / "c.yaml", "folder", data, tmp_path / "out")
    config.write_text(config.read_text() + "model:\n  percentage: 0.5\n")
    code, _, err = run_cli("train", "--config", config)
    assert code == 2
    line = error_line(err, "train")
    assert line.startswith(f"patchcore train: error: {config}: key 'model' is written twice (lines ")
    assert line.endswith("YAML would silently keep only the last one")


def test_key_written_twice_inside_a_section_is_refused_too(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  patchsize: 3\n  percentage: 0.1\n  patchsize: 5\n")
    code, _, err = run_cli("train", "--config", path)
    assert code == 2
    assert "key 'patchsize' is written twice (lines 2 and 4)" in error_line(err, "train")


# ------------------------------------------------------------- edited model file


def test_model_file_with_edited_parameters_is_refused(fitted, tmp_path):
    path = fitted.save(tmp_path / "model.pt")
    state = torch.load(path, weights_only=True)
    state["params"]["patchsize"] = 5
    torch.save(state, path)
    with pytest.raises(ModelFileError, match="was modified after it was saved"):
        PatchCore.load(path)
    code, _, err = run_cli("predict", "-m", path, save(tmp_path / "i.png", texture(32, 32, 0)), "-o", tmp_path / "p")
    assert code == 2 and "was modified after it was saved" in error_line(err, "predict")


def test_model_file_whose_parameters_disagree_with_its_bank_is_refused_even_with_a_matching_digest(fitted):
    from patchcore.engine.persistence import state_digest as _state_digest

    state = fitted.state_dict()
    state["params"]["target_embed_dimension"] = 64
    state["digest"] = _state_digest(state)
    with pytest.raises(ModelFileError, match="target_embed_dimension is 64 but the memory bank has"):
        PatchCore.from_state_dict(state)
    state = fitted.state_dict()
    state["params"]["percentage"] = 0.1
    state["digest"] = _state_digest(state)
    with pytest.raises(ModelFileError, match="percentage 0.1 of 64 patches gives a bank of 6, the file holds 32"):
        PatchCore.from_state_dict(state)


# ------------------------------------------------------------- NaN in the features


@pytest.fixture(scope="module")
def nan_weights(tmp_path_factory) -> Path:
    network, _, _ = load_backbone("resnet18", "random", seed=0)
    state = network.state_dict()
    state["layer1.0.conv1.weight"][0] = float("nan")
    path = tmp_path_factory.mktemp("weights") / "nan.pth"
    torch.save(state, path)
    return path


def test_nan_features_from_bad_weights_stop_the_fit_naming_the_image_file(tmp_path, nan_weights):
    data = make_folder(tmp_path / "data")
    config = write_config(tmp_path / "c.yaml", "folder", data, tmp_path / "out")
    code, _, err = run_cli("train", "--config", config, f"model.weights={nan_weights}")
    assert code == 2
    assert error_line(err, "train").startswith(
        "patchcore train: error: non-finite (NaN or inf) patch features for image "
        f"{data / 'train' / 'good' / '000.png'}, {data / 'train' / 'good' / '001.png'}"
    )
    with pytest.raises(NonFiniteError, match="image position 0 of the input"):
        tiny_model(weights=str(nan_weights)).fit(random_images(2))


def test_nan_scores_at_prediction_name_the_image_file(fitted, tmp_path, monkeypatch):
    from patchcore.engine.features import PatchFeatures

    paths = [save(tmp_path / f"img{i}.png", texture(32, 32, i)) for i in range(3)]
    original = PatchFeatures.__call__

    def poisoned(self, batch):  # the second image of each batch comes out as NaN
        rows, grid = original(self, batch)
        per_image = rows.shape[0] // len(batch)
        rows = rows.clone()
        if len(batch) > 1:
            rows[per_image : 2 * per_image] = float("nan")
        return rows, grid

    monkeypatch.setattr(PatchFeatures, "__call__", poisoned)
    model = fitted.save(tmp_path / "patchcore_obj.pt")
    code, _, err = run_cli("predict", "-m", model, *paths, "-o", tmp_path / "p")
    assert code == 2
    assert error_line(err, "predict") == (
        f"patchcore predict: error: non-finite (NaN or inf) patch features for image {paths[1]}: bad backbone "
        "weights or a broken image?"
    )


# ------------------------------------------------------------- mixed sizes with imagesize null


def test_training_images_of_mixed_sizes_without_a_crop_are_refused_up_front_naming_two(tmp_path):
    data = make_folder(tmp_path / "data")
    odd = save(data / "train" / "good" / "005.png", texture(64, 40, 5))
    config = write_config(tmp_path / "c.yaml", "folder", data, tmp_path / "out")
    code, _, err = run_cli("train", "--config", config, "model.imagesize=null", "model.resize=null")
    assert code == 2
    assert error_line(err, "train") == (
        f"patchcore train: error: data train: images of different sizes cannot be batched: "
        f"{data / 'train' / 'good' / '000.png'} is 48x48 -> 48x48, {odd} is 64x40 -> 64x40 (width x height, after "
        "resize/crop); set model.imagesize (a crop) or model.resize: [h, w]"
    )
    assert run_dirs(tmp_path / "out") == []


# ------------------------------------------------------------- evaluate with another backbone


def test_evaluate_reports_the_models_backbone_not_the_configs(tmp_path):
    data = make_folder(tmp_path / "data")
    config = write_config(tmp_path / "c.yaml", "folder", data, tmp_path / "out", evaluation={"heatmaps": 0})
    assert run_cli("train", "--config", config)[0] == 0
    (run_dir,) = run_dirs(tmp_path / "out")
    other = write_config(
        tmp_path / "other.yaml", "folder", data, tmp_path / "out", model={"backbone": "resnet50"},
        evaluation={"heatmaps": 0},
    )  # fmt: skip
    code, out, err = run_cli("evaluate", "-m", run_dir, "-c", other)
    assert code == 0, err
    assert "- backbone: resnet18" in out and "resnet50" not in out
    summary = json.loads((tmp_path / "out" / "tiny" / "run_eval" / "summary.json").read_text())
    assert summary["backbone"] == "resnet18" and summary["layers"] == ["layer2", "layer3"]


# ------------------------------------------------------------- unwritable output


def unwritable_folder(tmp_path: Path) -> Path:
    """A folder nobody may create files in: /sys as root (permissions do not stop root), else chmod 555."""
    if os.geteuid() == 0:
        return Path("/sys/patchcore-test-out")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    return locked / "out"


def test_predict_into_an_unwritable_folder_or_onto_a_file_exits_2(fitted, tmp_path):
    model = fitted.save(tmp_path / "patchcore_obj.pt")
    image = save(tmp_path / "img.png", texture(32, 32, 0))
    target = unwritable_folder(tmp_path)
    code, _, err = run_cli("predict", "-m", model, image, "--out", target)
    assert code == 2
    assert error_line(err, "predict").startswith(f"patchcore predict: error: cannot create --out folder {target}: ")
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    code, _, err = run_cli("predict", "-m", model, image, "--out", a_file)
    assert code == 2
    assert error_line(err, "predict") == f"patchcore predict: error: --out folder {a_file} is an existing file, not a folder"
    assert a_file.read_text() == "keep me"


def test_train_into_an_unwritable_output_dir_or_a_file_exits_2(tmp_path):
    data = make_folder(tmp_path / "data")
    target = unwritable_folder(tmp_path)
    config = write_config(tmp_path / "c.yaml", "folder", data, target)
    code, _, err = run_cli("train", "--config", config)
    assert code == 2
    assert error_line(err, "train").startswith(f"patchcore train: error: cannot create output folder {target}/tiny: ")
    a_file = tmp_path / "results"
    a_file.write_text("")
    config = write_config(tmp_path / "c.yaml", "folder", data, a_file)
    code, _, err = run_cli("train", "--config", config)
    assert code == 2
    assert error_line(err, "train") == f"patchcore train: error: output folder {a_file}/tiny is inside a file, not a folder"


# ------------------------------------------------------------- kill -9 during a run

KILLED_RUN = """
import os, signal, sys
from patchcore.app import cli
from patchcore.engine.store import FeatureStore
real = FeatureStore.append
def append_then_die(self, rows):
    real(self, rows)
    self._handle.flush()
    os.kill(os.getpid(), signal.SIGKILL)  # killed while streaming training features to disk
FeatureStore.append = append_then_die
sys.exit(cli.main(["train", "--config", sys.argv[1], *sys.argv[2:]]))
"""


def test_a_run_killed_with_sigkill_stays_marked_incomplete_and_its_temp_files_go_at_the_next_start(tmp_path):
    data = make_folder(tmp_path / "data")
    config = write_config(tmp_path / "c.yaml", "folder", data, tmp_path / "out")
    env = {**os.environ, "PYTHONPATH": str(SRC), "TMPDIR": str(tmp_path / "systemp")}
    (tmp_path / "systemp").mkdir()
    cache_override = f"model.feature_cache={tmp_path / 'cache'}"

    def killed_run(*overrides: str) -> Path:
        done = subprocess.run(
            [sys.executable, "-c", KILLED_RUN, str(config), *overrides], env=env, capture_output=True, timeout=300
        )
        assert done.returncode == -signal.SIGKILL, done.stderr.decode()
        run_dir = run_dirs(tmp_path / "out")[-1]
        assert (run_dir / INCOMPLETE_MARKER).is_file()
        assert run_state(run_dir).objects == {"data": "pending"}
        return run_dir

    killed = killed_run()
    assert list((killed / "tmp").glob("patchcore-*/train_features.f32"))  # the temp files are in the run
    assert list((tmp_path / "systemp").iterdir()) == []  # nothing in the system temp folder
    killed_cached = killed_run(cache_override)
    assert not (killed / "tmp").exists()  # the next start removed them
    assert (killed / INCOMPLETE_MARKER).is_file()  # and the marker still says the run never finished
    assert [p.name[:9] for p in (tmp_path / "cache").iterdir() if p.name != ".lock"] == [".staging-"]

    # The next run, of the same project and cache, removes what the killed ones left and finishes.
    code, _, err = run_cli("train", "--config", config, cache_override)
    assert code == 0, err
    assert not (killed_cached / "tmp").exists()
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".staging")]
    finished = run_dirs(tmp_path / "out")[-1]
    assert not (finished / INCOMPLETE_MARKER).exists() and not (finished / "tmp").exists()

    # evaluate refuses the killed run's model (there is none yet), and any model it did not record as fitted.
    (killed / "models").mkdir()
    (killed / "models" / "patchcore_data.pt").write_bytes((finished / "models" / "patchcore_data.pt").read_bytes())
    code, _, err = run_cli("evaluate", "-m", killed / "models" / "patchcore_data.pt", "-c", config)
    assert code == 2
    assert f"belongs to run {killed}, which did not finish fitting it" in error_line(err, "evaluate")


# ------------------------------------------------------------- EXIF orientation


def test_jpeg_with_exif_orientation_is_read_upright(tmp_path):
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, :10] = 255  # a white band on the left of the stored pixels
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "camera.jpg"
    image.save(path, exif=exif, quality=95)
    upright = np.asarray(load_image(path))
    assert upright.shape == (40, 20, 3)  # width and height trade places
    assert upright[:10].mean() > 200 and upright[-10:].mean() < 50  # the band is now at the top

    from patchcore.data.check import image_size

    assert image_size(path) == (40, 20)  # the up-front check sees the same size


# ------------------------------------------------------------- commas in names


def test_object_and_file_names_with_commas_keep_their_csv_columns(tmp_path):
    data = make_folder(tmp_path / "bottle, green")
    for path in (data / "test" / "scratch").iterdir():
        path.rename(path.with_name(path.stem + ',"x".png'))
    config = write_config(tmp_path / "c.yaml", "folder", data, tmp_path / "out", evaluation={"heatmaps": 0})
    code, _, err = run_cli("train", "--config", config)
    assert code == 0, err
    (run_dir,) = run_dirs(tmp_path / "out")
    rows = read_csv(run_dir / "results.csv")
    assert [r["object"] for r in rows] == ["bottle, green", "mean"]
    predictions = read_csv(run_dir / "predictions_bottle_green.csv")
    assert len(predictions) == 6
    assert {r["label"] for r in predictions} == {"good", "scratch"}
    assert 'test/scratch/000,"x"' in {r["name"] for r in predictions}
    assert all(0.0 <= float(r["normalized_score"]) <= 1.0 for r in predictions)


# ------------------------------------------------------------- every bad argument: one line, exit 2


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--config"],
        ["train", "--nonsense"],
        ["predict", "-m", "x.pt"],
        ["evaluate"],
        ["frobnicate"],
    ],
)
def test_bad_arguments_give_one_line_and_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exited:  # what the installed command's main() does, in this process
        cli.main(argv)
    assert exited.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("patchcore") and "error: " in err and err.rstrip().endswith("--help)")


def test_patchcore_params_lists_every_declared_key_with_its_constraint():
    from patchcore.engine.params import PARAMS

    code, out, _ = run_cli("params")
    assert code == 0
    for p in PARAMS:
        assert (f"model.{p.name} " in out) == p.in_config
    assert re.search(r"^model.patchsize +an integer; an odd integer >= 1; default 3$", out, re.M)
    assert re.search(r"^data.num_workers +an integer; >= 0; default 2$", out, re.M)
    assert "model.feature_cache " in out and "evaluation.pro_fpr_limit " in out


# ------------------------------------------------------------- the determinism contract (README)


def test_same_seed_and_threads_is_bit_identical_and_other_thread_counts_agree_within_1e_4():
    train, queries = random_images(6, seed=0, size=48), random_images(3, seed=1, size=48)
    threads_before = torch.get_num_threads()

    def run(threads: int):
        torch.set_num_threads(threads)
        model = tiny_model(resize=48, imagesize=48, percentage=0.25, search_threads=threads).fit(train)
        return model.memory_bank_, model.predict(queries)

    try:
        bank1, one = run(1)
        bank1_again, one_again = run(1)
        bank2, two = run(2)
    finally:
        torch.set_num_threads(threads_before)
    np.testing.assert_array_equal(bank1, bank1_again)
    np.testing.assert_array_equal(one.image_scores, one_again.image_scores)
    np.testing.assert_array_equal(one.anomaly_maps, one_again.anomaly_maps)
    assert bank2.shape == bank1.shape
    np.testing.assert_allclose(two.image_scores, one.image_scores, rtol=1e-4)
    np.testing.assert_allclose(two.patch_scores, one.patch_scores, rtol=1e-4)


# ============================================================= issue 24: hostile input (non-service rows)
#
# One test (or group) per row of issue 24's table that is not the service's, in its order. Service rows
# (1, 5, 6, 7b, 17, 18, 21, 22's serve flags) are in tests/test_service*.py.


@pytest.fixture(scope="module")
def model_file(fitted, tmp_path_factory) -> Path:
    return fitted.save(tmp_path_factory.mktemp("issue24") / "patchcore_obj.pt")


def textures(folder: Path, n: int, seed: int = 0, size: int = 32) -> list[Path]:
    return [save(folder / f"{i:03d}.png", texture(size, size, seed + i)) for i in range(n)]


@pytest.fixture
def count_scoring(monkeypatch) -> list[int]:
    """How many batches the torch backend scored (every scoring path goes through it)."""
    from patchcore.deploy.inference import TorchBackend

    calls: list[int] = []
    original = TorchBackend.score

    def counted(self, batch):
        calls.append(len(batch))
        return original(self, batch)

    monkeypatch.setattr(TorchBackend, "score", counted)
    return calls


# ------------------------------------------------------------- row 2: a tampered exported graph


def _export(model: Path, out: Path, *extra: str) -> tuple[int, str]:
    code, _, err = run_cli("export", "-m", model, "--format", "onnx", "--out", out, *extra)
    return code, err


def test_exported_graph_with_a_scaled_bank_initializer_is_refused_at_load(model_file, tmp_path):
    """Row 2. Catches: an export folder loaded without checking its files against the export's digests."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from onnx import numpy_helper

    from patchcore.deploy.errors import DeployError
    from patchcore.deploy.inference import Predictor

    out = tmp_path / "exported"
    assert _export(model_file, out)[0] == 0
    meta = json.loads((out / "patchcore_export.json").read_text())
    assert meta["model_digest"] == torch.load(model_file, weights_only=True)["digest"]
    Predictor.load(out, runtime="onnx")  # the untouched export loads
    graph = onnx.load(out / "patchcore.onnx")
    fitted_bank = torch.load(model_file, weights_only=True)["memory_bank"]
    (bank,) = [t for t in graph.graph.initializer if list(t.dims) == list(fitted_bank.T.shape)]  # (D, M)
    bank.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(bank) * 1.5, bank.name))
    onnx.save(graph, out / "patchcore.onnx")
    with pytest.raises(DeployError, match="patchcore.onnx does not belong to the export"):
        Predictor.load(out, runtime="onnx")
    # An edited threshold in the JSON is refused too.
    assert _export(model_file, out, "--overwrite")[0] == 0
    meta = json.loads((out / "patchcore_export.json").read_text())
    meta["info"]["stats"]["memory_size"] = 1
    (out / "patchcore_export.json").write_text(json.dumps(meta))
    with pytest.raises(DeployError, match="modified after the export"):
        Predictor.load(out, runtime="onnx")


# ------------------------------------------------------------- rows 3 and 4d: one decoding path


def test_an_upload_decodes_exactly_as_predict_reads_the_file_exif_orientation_included(tmp_path):
    """Row 3. Catches: the service's upload path skipping exif_transpose (or any second decoder)."""
    from patchcore.deploy.uploads import decode_upload

    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, :10] = 255
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6
    path = tmp_path / "camera.jpg"
    image.save(path, exif=exif, quality=95)
    uploaded = np.asarray(decode_upload(path.read_bytes(), 1 << 20, 10_000, "camera.jpg"))
    assert uploaded.shape == (40, 20, 3) and uploaded[:10].mean() > 200  # upright
    np.testing.assert_array_equal(uploaded, np.asarray(load_image(path)))


def test_sixteen_bit_images_differing_in_one_pixel_decode_to_the_same_scale(tmp_path, fitted):
    """Row 4d. Catches: a wide image scaled by its own maximum (4095 -> 255, but 4096 -> 128)."""
    from patchcore.deploy.uploads import decode_upload

    base = (np.random.default_rng(0).integers(0, 4095, (32, 32))).astype(np.uint16)
    base[0, 0] = 4095
    other = base.copy()
    other[0, 0] = 4096
    paths = []
    for name, array in (("a.png", base), ("b.png", other)):
        Image.fromarray(array).save(tmp_path / name)
        paths.append(tmp_path / name)
    a, b = (np.asarray(load_image(p)).astype(int) for p in paths)
    assert np.abs(a - b).max() <= 1  # the 16-bit container's scale for both: 65535 -> 255
    np.testing.assert_array_equal(a[..., 0], np.rint(base * (255 / 65535)).astype(int))
    np.testing.assert_array_equal(np.asarray(decode_upload(paths[1].read_bytes(), 1 << 20, 10_000)), b)
    scores = PatchCore.from_state_dict(fitted.state_dict(), device="cpu").score([str(p) for p in paths])
    assert scores[0] == pytest.approx(scores[1], rel=1e-2)


# ------------------------------------------------------------- row 4b: the same images given twice


def test_calibration_counts_each_distinct_image_once(model_file, tmp_path, caplog):
    """Row 4b. Catches: a calibration that counts repeated paths (or copies of one file) as new images."""
    calib = tmp_path / "calib"
    paths = textures(calib, 10)
    (tmp_path / "copy.png").write_bytes(paths[0].read_bytes())
    model = tmp_path / "m.pt"
    model.write_bytes(model_file.read_bytes())
    with caplog.at_level(logging.WARNING, logger="patchcore"):
        code, out, err = run_cli("calibrate", "-m", model, calib, calib, paths[0], paths[0], tmp_path / "copy.png")
    assert code == 0, err
    assert json.loads(out)["n_images"] == 10
    assert "23 image files given, 10 distinct images (13 repeats" in caplog.text


# ------------------------------------------------------------- rows 4c and 11: export into a used folder


def test_export_into_a_non_empty_folder_is_refused_unless_overwrite_and_then_holds_one_export(
    model_file, fitted, tmp_path
):
    """Rows 4c and 11. Catches: an export that writes into (or deletes from) a used folder, and a loader
    that serves a folder whose graph and JSON come from two exports."""
    pytest.importorskip("onnxruntime")
    from patchcore.deploy.errors import DeployError
    from patchcore.deploy.inference import Predictor

    out = tmp_path / "x"
    assert _export(model_file, out)[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    code, err = _export(model_file, out)
    assert code == 2
    assert error_line(err, "export").startswith(f"patchcore export: error: --out folder {out} is not empty (2 entries")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # Another model's export, then its graph copied beside the first export's JSON: refused at load.
    other = tiny_model(seed=7).fit(random_images(4, seed=3)).save(tmp_path / "other.pt")
    assert _export(other, tmp_path / "y")[0] == 0
    (out / "patchcore.onnx").write_bytes((tmp_path / "y" / "patchcore.onnx").read_bytes())
    with pytest.raises(DeployError, match="does not belong to the export"):
        Predictor.load(out, runtime="onnx")
    # A stray graph file of another format (an earlier OpenVINO export) is refused too.
    assert _export(model_file, out, "--overwrite")[0] == 0
    assert sorted(p.name for p in out.iterdir()) == ["patchcore.onnx", "patchcore_export.json"]
    Predictor.load(out, runtime="onnx")
    (out / "patchcore.xml").write_text("<net/>")
    with pytest.raises(DeployError, match="mixes exports: patchcore.xml"):
        Predictor.load(out, runtime="onnx")
    assert _export(model_file, out, "--overwrite")[0] == 0  # --overwrite clears it
    assert not (out / "patchcore.xml").exists()


# ------------------------------------------------------------- row 4e: predict --out inside its inputs


def test_predict_out_inside_an_input_folder_is_refused_and_writes_nothing(model_file, tmp_path, count_scoring):
    """Row 4e. Catches: heatmaps written among the good images a later calibration reads."""
    folder = tmp_path / "good"
    textures(folder, 3)
    before = sorted(p.name for p in folder.iterdir())
    for out in (folder, folder / "predictions"):
        code, _, err = run_cli("predict", "-m", model_file, folder, "--out", out, "--overwrite")
        assert code == 2
        assert error_line(err, "predict") == (
            f"patchcore predict: error: --out folder {out} is inside the input folder {folder}: its heatmaps "
            "would be mixed with the images; choose a folder outside the inputs"
        )
    assert sorted(p.name for p in folder.iterdir()) == before and count_scoring == []


# ------------------------------------------------------------- rows 7c and 20: predict on long lists


def test_predict_streams_each_result_before_the_next_batch_is_scored(model_file, tmp_path, count_scoring):
    """Rows 7c and 20. Catches: results (and their maps) collected for all images and written at the end."""
    from patchcore.app.predict import predict_images

    paths = textures(tmp_path / "in", 8)
    out = tmp_path / "out"
    seen: list[tuple[int, int]] = []  # (batches scored so far, lines in predictions.jsonl) per record

    def emit(record):
        lines = (out / "predictions.jsonl").read_text().splitlines()
        seen.append((len(count_scoring), len(lines)))
        assert json.loads(lines[-1]) == record

    state = torch.load(model_file, weights_only=True)
    state["calibration"] = {}
    calibrated = tmp_path / "calibrated.pt"
    fitted_model = PatchCore.from_state_dict(state, device="cpu")
    from patchcore.deploy.calibration import calibrate
    from patchcore.deploy.inference import Predictor

    fitted_model.calibration_ = calibrate(Predictor(fitted_model), paths[:4], 0.2)
    fitted_model.save(calibrated)
    count_scoring.clear()
    assert predict_images(calibrated, paths, out, batch_size=2, emit=emit) == 8
    assert seen[0] == (1, 1)  # the first line was out when one batch of four had been scored
    assert [s[1] for s in seen] == list(range(1, 9))


def test_predict_of_an_uncalibrated_model_writes_the_same_results_through_its_spill_file(model_file, tmp_path):
    """Row 7c. Catches: the two-pass path (maps spilled to disk for the call's range) reading a map back
    at the wrong offset or shape, or leaving its temporary file."""
    from patchcore.app.predict import predict_images
    from patchcore.deploy.inference import Predictor

    paths = textures(tmp_path / "in", 5) + [save(tmp_path / "in" / "wide.png", texture(48, 32, 9))]
    records: list[dict] = []
    predict_images(model_file, paths, tmp_path / "out", batch_size=2, emit=records.append)
    expected = Predictor.load(model_file, device="cpu").predict(paths)
    assert [r["score"] for r in records] == [p.score for p in expected]
    assert [r["normalized_score"] for r in records] == [p.normalized_score for p in expected]
    for record, prediction in zip(records, expected, strict=True):
        heat = np.asarray(Image.open(record["heatmap"]))
        assert heat.shape[:2] == (prediction.original_size[0], 2 * prediction.original_size[1])
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.name.startswith(".")) == []


def test_scoring_keeps_no_decoded_file_waiting_for_its_batch(model_file, tmp_path, monkeypatch, count_scoring):
    """Rows 7c and 20. Catches: the full-resolution images of a batch (and of the batch prepared meanwhile)
    kept until the batch is scored: peak memory then grew with the number of images up to 2 x batch_size."""
    import weakref

    from patchcore.deploy import inference

    paths = textures(tmp_path / "in", 12)
    decoded: list[weakref.ref] = []
    alive_at_scoring: list[int] = []

    def tracked_load(path):
        image = load_image(path)
        decoded.append(weakref.ref(image))
        return image

    original = inference.TorchBackend.score

    def score(self, batch):
        alive_at_scoring.append(sum(ref() is not None for ref in decoded))
        return original(self, batch)

    monkeypatch.setattr(inference, "load_image", tracked_load)
    monkeypatch.setattr(inference.TorchBackend, "score", score)
    predictor = inference.Predictor.load(model_file, device="cpu")
    results = list(predictor.score_batches(paths, batch_size=6))
    assert len(decoded) == 12 and [r[3] for r in results] == [(32, 32)] * 12  # sizes still reported
    assert len(alive_at_scoring) == 2
    assert max(alive_at_scoring) <= 1  # at most the one the decoding thread is working on


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux's peak-RSS reset")
def test_predict_peak_memory_does_not_grow_with_the_number_of_images(model_file, tmp_path):
    """Rows 7c and 20, measured: the peak resident memory of one ``predict_images`` call (VmHWM, reset through
    /proc/self/clear_refs before the call, minus VmRSS before it) on 4 and then on 16 camera-sized images
    (1500 x 1500 JPEGs, 6.75 MB each decoded) in batches of 16. Catches any full-resolution buffer kept
    beyond its own image's scoring: the old code held the batch's decoded images (16 x 6.75 = 108 MB
    against 27 MB)."""
    from patchcore.app.predict import predict_images

    rng = np.random.default_rng(0)
    folder = tmp_path / "camera"
    folder.mkdir()
    ramp = np.tile(np.linspace(40, 200, 1500, dtype=np.float32), (1500, 1))[..., None]
    for i in range(16):
        noise = np.kron(rng.normal(0, 20, (150, 150, 3)).astype(np.float32), np.ones((10, 10, 1), np.float32))
        Image.fromarray(np.clip(ramp + noise, 0, 255).astype(np.uint8)).save(folder / f"{i:02d}.jpg", quality=85)
    paths = sorted(folder.iterdir())

    def peak_increase_mb(images: list[Path], out: Path) -> float:
        before = _status_kb("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS now
        predict_images(model_file, images, out, device="cpu", batch_size=16, heatmaps=False)
        return (_status_kb("VmHWM") - before) / 1024.0

    peak_increase_mb(paths[:1], tmp_path / "warm")  # first-call allocations (thread pools, caches) out of the way
    few = peak_increase_mb(paths[:4], tmp_path / "few")
    many = peak_increase_mb(paths, tmp_path / "many")
    assert many - few < 30, f"peak above the RSS before the call: {few:.0f} MB for 4 images, {many:.0f} MB for 16"


def test_a_truncated_image_last_in_the_list_stops_predict_before_any_scoring(model_file, tmp_path, count_scoring):
    """Row 20. Catches: images decoded only as they are scored (the bad one found after the others)."""
    paths = textures(tmp_path / "in", 6)
    data = paths[-1].read_bytes()
    paths[-1].write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    code, stdout, err = run_cli("predict", "-m", model_file, *paths, "--out", out)
    assert code == 2 and stdout == ""
    line = error_line(err, "predict")
    assert str(paths[-1]) in line and "truncated" in line and "--skip-bad" in line
    assert count_scoring == [] and not out.exists()
    # --skip-bad: scored without it, named on stderr.
    code, stdout, err = run_cli("predict", "-m", model_file, *paths, "--out", out, "--skip-bad", "--no-progress")
    assert code == 0, err
    assert [json.loads(line)["image"] for line in stdout.splitlines()] == [str(p) for p in paths[:-1]]
    assert sum(count_scoring) == 5


def test_predict_shows_progress_on_stderr_unless_turned_off(model_file, tmp_path, capsys):
    """Row 20. Catches: a long predict with nothing on stderr until it ends."""
    from patchcore.app.predict import predict_images

    paths = textures(tmp_path / "in", 3)
    predict_images(model_file, paths, tmp_path / "a", progress=True, heatmaps=False)
    err = capsys.readouterr().err
    assert "predict check" in err and "predict score" in err and "3/3" in err
    predict_images(model_file, paths, tmp_path / "b", progress=False, heatmaps=False)
    assert "predict score" not in capsys.readouterr().err


# ------------------------------------------------------------- row 12: calibrations replacing each other


def test_a_calibration_names_the_one_it_replaces(model_file, tmp_path, caplog):
    """Row 12. Catches: a certified calibration replaced silently by a smaller one."""
    model = tmp_path / "m.pt"
    model.write_bytes(model_file.read_bytes())
    assert run_cli("calibrate", "-m", model, *textures(tmp_path / "a", 30), "--false-alarm-rate", "0.05")[0] == 0
    with caplog.at_level(logging.WARNING, logger="patchcore"):
        code, _, err = run_cli("calibrate", "-m", model, *textures(tmp_path / "b", 3, 50), "--false-alarm-rate", "0.4")
    assert code == 0, err
    assert f"this calibration replaces the one in {model}: threshold" in caplog.text
    assert "false-alarm rate 0.05 from 30 good images" in caplog.text


def test_a_model_file_written_while_calibrating_is_not_overwritten(model_file, tmp_path, monkeypatch):
    """Row 12. Catches: two calibrations at once, both rc 0, one result lost (no lock or compare-and-swap)."""
    from patchcore.deploy.calibration import calibrate
    from patchcore.deploy.inference import Predictor, TorchBackend

    model = tmp_path / "m.pt"
    model.write_bytes(model_file.read_bytes())
    images = textures(tmp_path / "good", 4)
    original = TorchBackend.score
    written: list[bytes] = []

    def other_writer(self, batch):  # another calibration finishes while this one scores
        if not written:
            written.append(b"")
            other = PatchCore.load(model, device="cpu")
            other.calibration_ = calibrate(Predictor(other), images[:2], 0.4)
            other.save(model)
            written[0] = model.read_bytes()
        return original(self, batch)

    monkeypatch.setattr(TorchBackend, "score", other_writer)
    code, _, err = run_cli("calibrate", "-m", model, *images)
    assert code == 2
    assert error_line(err, "calibrate") == (
        f"patchcore calibrate: error: {model} changed while this calibration ran (another calibration or a "
        "training wrote it); nothing written: run calibrate again"
    )
    assert model.read_bytes() == written[0] != model_file.read_bytes()


# ------------------------------------------------------------- rows 13 and 16: where calibrate writes


def test_calibrate_refuses_a_read_only_model_file_or_folder_before_scoring(model_file, tmp_path, count_scoring):
    """Rows 13 and 16. Catches: a mode-0444 model replaced (root ignores the mode), and a read-only target
    found only after all the scoring."""
    images = textures(tmp_path / "good", 3)
    model = tmp_path / "m.pt"
    model.write_bytes(model_file.read_bytes())
    model.chmod(0o444)
    code, _, err = run_cli("calibrate", "-m", model, *images)
    assert code == 2
    assert error_line(err, "calibrate") == (
        f"patchcore calibrate: error: model file {model} is read-only (mode 0444); make it writable, or write "
        "the calibrated model elsewhere with --out"
    )
    assert model.read_bytes() == model_file.read_bytes()
    target = unwritable_folder(tmp_path) / "m.pt"
    code, _, err = run_cli("calibrate", "-m", model, *images, "--out", target)
    assert code == 2 and f"cannot write {target}" in error_line(err, "calibrate")
    assert count_scoring == []


@pytest.mark.parametrize("value", ["0", "-1"])
def test_calibrate_batch_size_below_one_exits_2(model_file, value, capsys):
    """Row 16. Catches: a batch size handed to the scorer unchecked (a traceback after loading)."""
    with pytest.raises(SystemExit) as exited:
        cli.main(["calibrate", "-m", str(model_file), str(model_file), "--batch-size", value])
    assert exited.value.code == 2
    assert "argument --batch-size: must be an integer >= 1" in capsys.readouterr().err


def test_export_out_a_file_under_a_file_or_unwritable_exits_2_writing_nothing(model_file, tmp_path):
    """Row 16. Catches: export's --out created blindly (tracebacks, or a file replaced by a folder)."""
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    cases = {
        a_file: f"--out folder {a_file} is an existing file, not a folder",
        a_file / "sub": f"--out folder {a_file / 'sub'} is inside a file ({a_file}), not a folder",
        unwritable_folder(tmp_path): f"cannot write the --out folder {unwritable_folder(tmp_path)}: ",
    }
    for out, message in cases.items():
        code, err = _export(model_file, out)
        assert code == 2
        assert error_line(err, "export").startswith(f"patchcore export: error: {message}")
    assert a_file.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["notes.txt"] + (["locked"] if os.geteuid() else []))


# ------------------------------------------------------------- row 22: pipes and wrong files


def test_params_into_a_closed_pipe_ends_quietly():
    """Row 22. Catches: `patchcore params | head` ending in a BrokenPipeError traceback."""
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    process = subprocess.Popen(
        [sys.executable, "-m", "patchcore.app.cli", "params"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    process.stdout.close()  # the reader is gone before the first write
    err = process.stderr.read().decode()
    assert process.wait(timeout=120) == 0
    assert err == ""


@pytest.mark.parametrize("kind", ["png", "json", "pickle"])
def test_a_file_that_is_not_a_model_gives_one_line_without_torchs_advice(model_file, tmp_path, kind):
    """Row 22. Catches: torch.load's message (and its advice to set weights_only=False) passed on."""
    path = tmp_path / f"wrong.{kind}"
    if kind == "png":
        save(path, texture(8, 8, 0))
        expected = "is not a patchcore model file: it is a PNG image"
    elif kind == "json":
        path.write_text(json.dumps({"object": "bottle", "metrics": {}}))
        expected = "it is JSON text (a model's .json sidecar? pass the .pt file beside it)"
    else:
        torch.save({"run": os.system}, path)  # a pickle that would call code
        expected = "holds Python objects beyond plain tensors and numbers, which are refused"
    image = save(tmp_path / "img.png", texture(32, 32, 0))
    code, _, err = run_cli("predict", "-m", path, image, "--out", tmp_path / "p")
    assert code == 2
    line = error_line(err, "predict")
    assert str(path) in line and expected in line and "weights_only" not in line
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("rate", ["1e-300", "nan", "0.5", "inf", "-0.01"])
def test_false_alarm_rate_out_of_its_range_exits_2_in_one_line(model_file, rate, capsys):
    """Row 22. Catches: a rate of 1e-300 accepted (a 300-digit image count 'needed')."""
    with pytest.raises(SystemExit) as exited:
        cli.main(["calibrate", "-m", str(model_file), str(model_file), "--false-alarm-rate", rate])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "argument --false-alarm-rate: must be in [1e-06, 0.5)" in err


def test_weights_that_are_a_text_file_give_one_clear_line(model_file, tmp_path):
    """Row 22. Catches: 'cannot read weights file: 101' (torch's unpickler on a text file)."""
    notes = tmp_path / "notes.txt"
    notes.write_text("101 things to remember\n")
    image = save(tmp_path / "img.png", texture(32, 32, 0))
    code, _, err = run_cli("predict", "-m", model_file, image, "--weights", notes, "--out", tmp_path / "p")
    assert code == 2
    assert error_line(err, "predict") == (
        f"patchcore predict: error: weights file {notes} is not a PyTorch weights file: it is a text file"
    )


# ------------------------------------------------------------- row 4: defects among the "good" images


def test_calibration_on_goods_half_full_of_defects_names_them_and_a_clean_set_raises_nothing(tmp_path, caplog):
    """Row 4. Catches: a calibration that certifies a defect's score as the threshold without a word."""
    from _deploy import make_images
    from _deploy import tiny_model as textured_model

    images = make_images(tmp_path / "images")
    model = textured_model(images).save(tmp_path / "m.pt")
    defects = [
        save(tmp_path / "mixed" / f"defect_{i}.png", with_square(texture(48, 48, 400 + i), (10 + i, 10, 26 + i, 26)))
        for i in range(10)
    ]
    for path in images["calib"][:10]:
        (tmp_path / "mixed" / path.name).write_bytes(path.read_bytes())
    with caplog.at_level(logging.WARNING, logger="patchcore"):
        assert run_cli("calibrate", "-m", model, images["calib"][0].parent, "--out", tmp_path / "clean.pt")[0] == 0
    assert "outliers" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="patchcore"):
        code, out, err = run_cli("calibrate", "-m", model, tmp_path / "mixed", "--out", tmp_path / "mixed.pt")
    assert code == 0, err
    (warning,) = [r.getMessage() for r in caplog.records if "outliers" in r.getMessage()]
    assert warning.startswith("10 of 20 'good' images score as obvious outliers")
    assert sum(str(p) in warning for p in defects) == 5 and "and 5 more" in warning  # the 5 highest shown
    assert "so defects scoring like them would pass as good" in warning
    assert not any(p.name in warning for p in images["calib"][:10])
