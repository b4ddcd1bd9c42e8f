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
from test_workflow import make_folder, make_mvtec, read_csv, save, texture, write_config
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
    model = PatchCore.from_state_dict(fitted.state_dict(), device="cpu")
    model.set_params(num_neighbors=2, index_kind="pruned")
    assert model.predict(random_images(1, seed=1)).image_scores.shape == (1,)


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
