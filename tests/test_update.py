"""Learning on the line: ``PatchCore.partial_fit`` (the coreset continued over new good images), versions,
history, ``rollback`` / ``remove_update``, the guard against teaching a defect, the calibration's honesty
after an update, model files, and the ``patchcore update / history / rollback`` commands.

Tiny random-weight ResNet-18 models on 48-pixel textured images (see tests/_deploy.py)."""

from __future__ import annotations

import copy
import hashlib
import json
import shutil

import numpy as np
import PIL.Image
import pytest
import torch
from _deploy import SIZE, make_images
from test_workflow import run_cli, save, texture

from patchcore import PatchCore
from patchcore.deploy.calibration import calibrate, describe_calibration, refresh_calibration
from patchcore.deploy.inference import Predictor
from patchcore.engine.coreset import bank_distances, project, random_projection
from patchcore.engine.model import UpdateError, UpdateRefused
from patchcore.engine.persistence import ModelFileError, state_digest
from patchcore.engine.records import UpdateRecord

pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    out = make_images(tmp_path_factory.mktemp("images"))
    root = out["train"][0].parent.parent
    # New good parts: another texture family (a "new supplier"), which the fit never saw.
    out["new"] = [save(root / "new" / f"{i:03d}.png", _shifted(500 + i)) for i in range(6)]
    return out


def _shifted(seed: int) -> np.ndarray:
    """A good texture with a different look (a new supplier): the stripes turned, a little brighter. It
    scores above the calibrated threshold (a false alarm) and below the guard's limit."""
    base = texture(SIZE, SIZE, seed).astype(np.int32)
    return np.clip(np.rot90(base, 1) + 10, 0, 255).astype(np.uint8)


def _fit(images, **params) -> PatchCore:
    settings = dict(backbone="resnet18", weights="random", resize=SIZE, imagesize=SIZE, device="cpu",
                    percentage=0.5, batch_size=4)  # fmt: skip
    settings.update(params)
    model = PatchCore(**settings).fit([str(p) for p in images["train"]])
    model.calibration_ = calibrate(Predictor(model), images["calib"], 0.1, source="calib")
    return model


@pytest.fixture(scope="module")
def fitted(images):
    return _fit(images)


@pytest.fixture
def model(fitted):
    return copy.deepcopy(fitted)


def _paths(paths) -> list[str]:
    return [str(p) for p in paths]


def _rows(model: PatchCore, path: str) -> np.ndarray:
    """The patch features of one image, as the model extracts them."""
    image = model.transform(PIL.Image.open(path).convert("RGB")).unsqueeze(0)
    rows, _ = model._patch_features()(image)
    return rows.numpy()


def _test_images(images) -> list[str]:
    return _paths(images["good"] + images["bad"] + images["new"])


# ----------------------------------------------------------------------------- the continuation


def test_fit_records_the_projection_its_coreset_used_and_the_covering_radius(fitted):
    space = fitted.coreset_space_
    dim = fitted.memory_bank_.shape[1]
    np.testing.assert_array_equal(space.projection, random_projection(dim, 128, np.random.default_rng(0)))
    # Every bank row is at distance 0 from the bank; the radius is what the greedy loop left for the rest.
    assert space.radius > 0
    assert fitted.version_ == 0 and fitted.history_ == () and not fitted.row_versions_.any()


def test_a_patch_of_an_added_image_scores_at_most_the_covering_radius(images):
    # Coreset in the feature space itself (no projection): the radius is in the units of the scores.
    model = _fit(images, sampler="greedy_coreset", projection_dim=None)
    assert model.coreset_space_.projection is None
    radius = model.coreset_space_.radius
    new = _paths(images["new"][:3])
    before = model.predict(new, return_maps=False).patch_scores
    assert before.max() > 2 * radius  # the new look is not covered yet
    record = model.partial_fit(new)
    after = model.predict(new, return_maps=False).patch_scores
    assert record.rows_added > 0 and record.target_radius == radius
    # The coreset's float32 formula and the index's differ in the last bits.
    assert after.max() <= radius * (1 + 1e-4) + 1e-5
    assert record.radius_after <= radius < record.radius_before


def test_with_a_projection_every_new_patch_lies_within_the_radius_where_the_coreset_measured(model, images):
    new = _paths(images["new"][:3])
    record = model.partial_fit(new)
    rows = np.concatenate([_rows(model, p) for p in new])
    z = project(rows, model.coreset_space_.projection)
    distances = bank_distances(z, project(model.memory_bank_, model.coreset_space_.projection))
    assert float(distances.max()) <= model.coreset_space_.radius * (1 + 1e-5)
    assert record.rows_added == int((model.row_versions_ == 1).sum()) > 0
    # Far fewer rows than patches: only what the bank did not cover.
    assert record.rows_added < len(rows) / 2


def test_fraction_and_count_rules_add_that_many_rows(model, images):
    new = _paths(images["new"][:2])
    patches = 2 * int(np.prod(model.patch_grid_))
    assert model.partial_fit(new, until=5).rows_added == 5
    assert model.partial_fit(_paths(images["new"][2:4]), until=0.1).rows_added == int(patches * 0.1)
    assert [r.rule for r in model.history_] == ["count 5", "fraction 0.1"]
    with pytest.raises(ValueError, match="fraction"):
        model.partial_fit(new, until=1.5)
    with pytest.raises(ValueError, match="count"):
        model.partial_fit(new, until=0)


def test_paths_pil_images_and_tensors_teach_the_same_rows(fitted, images):
    paths = _paths(images["new"][:2])
    pil = [PIL.Image.open(p).convert("RGB") for p in paths]
    tensors = torch.stack([fitted.transform(im) for im in pil])
    banks, records = [], []
    for given in (paths, pil, tensors):
        model = copy.deepcopy(fitted)
        records.append(model.partial_fit(given))
        banks.append(model.memory_bank_)
    np.testing.assert_array_equal(banks[0], banks[1])
    np.testing.assert_array_equal(banks[0], banks[2])
    assert records[0].images[0].sha256 == hashlib.sha256(images["new"][0].read_bytes()).hexdigest()
    assert records[0].images[0].path == paths[0]
    assert records[1].images[0].path == "" and records[2].images[0].path == ""
    assert len({r.images[0].sha256 for r in records}) == 3  # file bytes, pixels, tensor values


def test_the_index_grows_and_exact_search_matches_float64_brute_force_after_several_updates(images):
    for kind in ("flat", "pruned"):
        model = _fit(images, index_kind=kind)
        for i in range(3):
            model.partial_fit(_paths(images["new"][2 * i : 2 * i + 2]), until=0.2)
        index = model._search_index()
        assert len(index) == len(model.memory_bank_) == len(model.row_versions_)
        queries = np.concatenate([_rows(model, p) for p in _test_images(images)])
        squared, nearest = index.search(queries, 3)
        bank = model.memory_bank_.astype(np.float64)
        truth = ((queries.astype(np.float64)[:, None, :] - bank[None]) ** 2).sum(-1)
        order = np.argsort(truth, axis=1, kind="stable")[:, :3]
        expected = np.take_along_axis(truth, order, axis=1)
        np.testing.assert_allclose(squared, expected, rtol=1e-4, atol=1e-4)
        # The nearest row is the float64 nearest wherever the two nearest are not tied to float32 precision.
        clear = expected[:, 1] - expected[:, 0] > 1e-4 * expected[:, 1] + 1e-4
        assert clear.mean() > 0.5
        np.testing.assert_array_equal(nearest[clear, 0], order[clear, 0])


# ----------------------------------------------------------------------------- versions and undo


@pytest.mark.parametrize("kind", ["flat", "pruned"])
def test_rollback_gives_each_version_its_scores_bit_for_bit(images, kind):
    model = _fit(images, index_kind=kind)
    test = _test_images(images)
    scores = [model.predict(test).anomaly_maps]
    for i in range(3):
        model.partial_fit(_paths(images["new"][2 * i : 2 * i + 2]), note=f"batch {i}")
        scores.append(model.predict(test).anomaly_maps)
    assert not np.array_equal(scores[0], scores[3])
    model.rollback(2)
    assert model.version_ == 2 and [r.version for r in model.history_] == [1, 2]
    np.testing.assert_array_equal(model.predict(test).anomaly_maps, scores[2])
    model.rollback(0)
    assert model.version_ == 0 and model.history_ == () and len(model.memory_bank_) == model.stats_.memory_size
    np.testing.assert_array_equal(model.predict(test).anomaly_maps, scores[0])
    # And a model loaded from a file with updates in it, rolled back, scores as the fit did.
    model.partial_fit(_paths(images["new"][:2]))
    assert model.version_ == 1  # the versions count on from the one rolled back to


def test_rolled_back_file_scores_as_the_fitted_model(fitted, images, tmp_path):
    test = _test_images(images)
    expected = fitted.predict(test).anomaly_maps
    model = copy.deepcopy(fitted)
    model.partial_fit(_paths(images["new"][:3]))
    loaded = PatchCore.load(model.save(tmp_path / "m.pt"), device="cpu")
    np.testing.assert_array_equal(loaded.rollback(0).predict(test).anomaly_maps, expected)


def test_removing_one_update_keeps_the_rows_and_the_effect_of_the_later_ones(model, images):
    fit_rows = model.memory_bank_.copy()
    bad, new = _paths(images["bad"][:2]), _paths(images["new"][:3])
    flagged = model.score(bad)
    model.partial_fit(bad, force=True, note="a defect, wrongly accepted")  # version 1
    assert (model.score(bad) < flagged / 2).all()  # the defect is no longer seen
    model.partial_fit(new, note="new supplier")  # version 2
    later = model.memory_bank_[model.row_versions_ == 2].copy()
    taught = model.score(new)
    model.remove_update(1)
    np.testing.assert_array_equal(model.memory_bank_, np.concatenate([fit_rows, later]))
    assert model.version_ == 2 and model.history_[0].removed and not model.history_[1].removed
    assert model.history_[0].note == "a defect, wrongly accepted"
    assert (model.score(bad) > 0.95 * flagged).all()  # seen again (the new supplier's rows are not near)
    np.testing.assert_allclose(model.score(new), taught, rtol=1e-5)  # what update 2 taught stays
    with pytest.raises(UpdateError, match="already removed"):
        model.remove_update(1)
    with pytest.raises(UpdateError, match="no version 7"):
        model.rollback(7)
    with pytest.raises(UpdateError, match="no version 0"):
        model.remove_update(0)


def test_predictions_running_during_updates_see_one_version_or_the_next_never_half_an_update(model, images):
    import threading

    probe = _paths(images["new"][3:4])
    versions = [float(model.score(probe)[0])]
    seen: list[float] = []
    errors: list[BaseException] = []
    done = threading.Event()

    def predict_loop() -> None:
        try:
            while not done.is_set():
                seen.append(float(model.score(probe)[0]))
        except BaseException as exc:  # pragma: no cover - the failure this test looks for
            errors.append(exc)

    thread = threading.Thread(target=predict_loop)
    thread.start()
    try:
        for i in range(3):
            model.partial_fit(_paths(images["new"][i : i + 1]), until=7)
            versions.append(float(model.score(probe)[0]))
    finally:
        done.set()
        thread.join(timeout=120)
    assert not errors and seen
    assert set(seen) <= set(versions)


# ----------------------------------------------------------------------------- the guard


def test_guard_refuses_an_image_far_above_the_good_scores_and_changes_nothing(model, images):
    before = (model.memory_bank_.copy(), model.version_, model.history_)
    with pytest.raises(UpdateRefused) as refused:
        model.partial_fit(_paths(images["new"][:1] + images["bad"][:1]))
    assert refused.value.limit == pytest.approx(2 * model.calibration_.good_score_max)
    assert refused.value.score > refused.value.limit
    assert refused.value.positions == [1] and refused.value.names == [str(images["bad"][0])]
    np.testing.assert_array_equal(model.memory_bank_, before[0])
    assert (model.version_, model.history_) == before[1:]
    # A looser guard lets it through; force does too, and says so.
    assert model.partial_fit(_paths(images["bad"][:1]), guard=1e6).forced is False
    record = model.partial_fit(_paths(images["bad"][1:2]), force=True, note="operator insists")
    assert record.forced and record.guard_limit == pytest.approx(2 * model.calibration_.good_score_max)


def test_an_uncalibrated_model_refuses_updates_unless_forced(model, images):
    model.calibration_ = None
    with pytest.raises(UpdateRefused, match="no calibration") as refused:
        model.partial_fit(_paths(images["new"][:1]))
    assert refused.value.limit is None
    assert model.partial_fit(_paths(images["new"][:1]), force=True).forced


# ----------------------------------------------------------------------------- the calibration stays honest


def test_after_an_update_the_calibration_says_it_predates_it_or_is_recomputed(model, images, tmp_path):
    old = model.calibration_
    model.partial_fit(_paths(images["new"][:2]))
    text = describe_calibration(model.calibration_, model)
    assert "before the updates up to version 1" in text and "still holds" in text
    fresh, line = refresh_calibration(Predictor(model))
    assert "re-scored 20 good images" in line
    assert fresh.model_version == 1 and model.calibration_ is fresh
    # A bank that only grew: no good image scores higher, so the threshold can only go down.
    assert fresh.image_threshold <= old.image_threshold and fresh.good_score_max <= old.good_score_max
    assert "before the updates" not in describe_calibration(fresh, model)


def test_a_calibration_whose_images_moved_is_kept_and_says_why(model, images, tmp_path):
    moved = [shutil.copy(p, tmp_path / p.name) for p in images["calib"]]
    model.calibration_ = calibrate(Predictor(model), moved, 0.1, source="moved")
    (tmp_path / images["calib"][3].name).unlink()
    model.partial_fit(_paths(images["new"][:2]))
    kept, line = refresh_calibration(Predictor(model))
    assert kept.model_version == 0 and "1 of its 20 good images are missing or changed" in line
    assert "the bank only grew since" in line


def test_taking_out_rows_the_calibration_was_computed_with_voids_its_bound(model, images):
    model.partial_fit(_paths(images["new"][:2]))
    model.calibration_ = calibrate(Predictor(model), images["calib"], 0.1, source="calib")  # at version 1
    model.partial_fit(_paths(images["new"][2:4]))
    model.remove_update(2)  # rows it never saw: the bound holds
    assert not model.calibration_.invalidated
    model.rollback(0)  # rows it was computed with
    assert "rolled back to version 0" in model.calibration_.invalidated
    assert "NO LONGER HOLDS" in describe_calibration(model.calibration_, model)


# ----------------------------------------------------------------------------- model files


def test_history_and_row_versions_round_trip_through_the_model_file(model, images, tmp_path):
    model.partial_fit(_paths(images["new"][:2]), note="supplier B | lot 7")
    model.partial_fit(_paths(images["bad"][:1]), force=True, note="forced")
    model.partial_fit(_paths(images["new"][2:4]), until=3)
    model.remove_update(2)
    loaded = PatchCore.load(model.save(tmp_path / "m.pt"), device="cpu")
    assert loaded.history_ == model.history_ and all(isinstance(r, UpdateRecord) for r in loaded.history_)
    assert loaded.version_ == 3
    np.testing.assert_array_equal(loaded.row_versions_, model.row_versions_)
    np.testing.assert_array_equal(loaded.coreset_space_.projection, model.coreset_space_.projection)
    assert loaded.coreset_space_.radius == model.coreset_space_.radius
    np.testing.assert_array_equal(loaded.score(_paths(images["new"])), model.score(_paths(images["new"])))


def test_an_edited_history_or_row_versions_are_refused(model, images, tmp_path):
    model.partial_fit(_paths(images["new"][:2]), note="original")
    state = model.state_dict()
    edited = copy.deepcopy(state)
    edited["history"][0]["note"] = "edited"
    with pytest.raises(ModelFileError, match="modified after it was saved"):
        PatchCore.from_state_dict(edited)
    edited = copy.deepcopy(state)
    edited["row_versions"][:] = 0  # rows claimed by the fit, with a digest that matches
    edited["digest"] = state_digest(edited)
    with pytest.raises(ModelFileError, match="version 0"):
        PatchCore.from_state_dict(edited)
    edited = copy.deepcopy(state)
    edited["coreset_projection"] = edited["coreset_projection"] * 2
    with pytest.raises(ModelFileError, match="modified after it was saved"):
        PatchCore.from_state_dict(edited)


def _format_2_digest(state: dict) -> str:
    """The digest format-2 files were written with (main before updates), verbatim."""
    digest = hashlib.sha256()
    record = {k: v for k, v in state.items() if k not in ("memory_bank", "versions", "digest")}
    digest.update(json.dumps(record, sort_keys=True, default=str).encode())
    bank = state["memory_bank"].detach().cpu().contiguous()
    digest.update(f"{tuple(bank.shape)}:{bank.dtype}".encode())
    digest.update(bank.numpy().tobytes())
    return digest.hexdigest()


def test_a_format_2_file_loads_as_version_0_and_learns_with_a_fraction(fitted, images, tmp_path):
    state = fitted.state_dict()
    for key in ("row_versions", "version", "history", "coreset_space", "coreset_projection"):
        del state[key]
    state["format_version"] = 2
    state["digest"] = _format_2_digest(state)
    path = tmp_path / "old.pt"
    torch.save(state, path)
    old = PatchCore.load(path, device="cpu")
    assert old.version_ == 0 and old.history_ == () and old.coreset_space_ is None
    np.testing.assert_array_equal(old.score(_test_images(images)), fitted.score(_test_images(images)))
    with pytest.raises(UpdateError, match="no covering radius"):
        old.partial_fit(_paths(images["new"][:1]))
    assert old.partial_fit(_paths(images["new"][:1]), until=0.05).rows_added == int(
        np.prod(old.patch_grid_) * 0.05
    )
    assert PatchCore.load(old.save(tmp_path / "new.pt"), device="cpu").version_ == 1


# ----------------------------------------------------------------------------- the commands


def _cli(*argv) -> tuple[int, str, str]:
    """run_cli, with argparse's refusals (SystemExit in this process) as their exit status."""
    import contextlib
    import io

    from patchcore.app import cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main([str(a) for a in argv])
        except SystemExit as exc:
            code = int(exc.code or 0)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def model_file(fitted, tmp_path):
    return fitted.save(tmp_path / "patchcore_tiny.pt")


def test_update_history_and_rollback_commands(model_file, images, tmp_path):
    code, out, err = run_cli("update", "-m", model_file, images["new"][0], images["new"][1], "--note", "supplier B")
    assert code == 0, err
    record = json.loads(out)
    assert record["version"] == 1 and record["note"] == "supplier B" and record["n_images"] == 2
    assert "re-scored 20 good images at model version 1" in err
    model = PatchCore.load(model_file, device="cpu")
    assert model.version_ == 1 and model.calibration_.model_version == 1
    # A folder works too, with another rule.
    code, out, err = run_cli("update", "-m", model_file, images["new"][2].parent, "--until", "4")
    assert code == 0, err and json.loads(out)["rows_added"] == 4
    code, out, err = run_cli("history", "-m", model_file)
    assert code == 0, err
    assert "| 1 |" in out and "supplier B" in out and "count 4" in out and out.startswith("version 2;")
    code, out, _ = run_cli("history", "-m", model_file, "--json")
    assert [r["version"] for r in json.loads(out)] == [1, 2]
    code, _, err = run_cli("rollback", "-m", model_file, "--remove", "1")
    assert code == 0, err and "update 1 removed" in err
    code, _, err = run_cli("rollback", "-m", model_file, "--to", "0")
    assert code == 0, err
    model = PatchCore.load(model_file, device="cpu")
    assert model.version_ == 0 and len(model.memory_bank_) == model.stats_.memory_size


@pytest.mark.parametrize(
    "args, message",
    [
        (["update", "{model}", "{missing}"], "does not exist"),
        (["update", "{model}", "{good}", "--until", "1.5"], "--until"),
        (["update", "{model}", "{good}", "--guard", "0"], "--guard"),
        (["update", "{model}", "{bad}"], "guard's limit"),
        (["rollback", "{model}", "--to", "3"], "no version 3"),
        (["rollback", "{model}", "--remove", "0"], "no version 0"),
        (["rollback", "{model}"], "one of the arguments --to --remove is required"),
        (["history", "{missing}"], "does not exist"),
    ],
)
def test_bad_input_is_refused_in_one_line_and_nothing_is_written(model_file, images, tmp_path, args, message):
    before = model_file.read_bytes()
    values = {"model": str(model_file), "missing": str(tmp_path / "nowhere.png"), "good": str(images["new"][0]),
              "bad": str(images["bad"][0])}  # fmt: skip
    argv = [a.format(**values) for a in args]
    argv.insert(1, "-m")
    code, out, err = _cli(*argv)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert model_file.read_bytes() == before and out == ""
