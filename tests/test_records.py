"""The typed records between the wings: fit statistics, calibration, test-set ranges (engine/records.py),
how a model file stores them, and that evaluation hands its ranges back instead of changing the model."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil

import pytest
import torch
from _deploy import make_images, tiny_model
from test_workflow import make_mvtec

from patchcore import PatchCore
from patchcore.data import load_mvtec
from patchcore.deploy.calibration import calibrate
from patchcore.deploy.inference import Predictor
from patchcore.engine.persistence import state_digest
from patchcore.engine.records import Calibration, FitStats, ImageRef, RecordError, TestRanges
from patchcore.evaluation.evaluate import EvaluationSettings, evaluate_object

pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def model(images):
    return tiny_model(images)


def test_fit_stats_keep_the_keys_and_order_model_files_have_always_had(model):
    stats = model.stats_
    assert isinstance(stats, FitStats)
    assert list(stats.to_dict()) == [
        "n_train_images", "n_patches", "memory_size", "feature_dim", "patch_grid", "input_size",
        "extract_seconds", "coreset_seconds", "index_seconds", "feature_cache", "device",
    ]  # fmt: skip
    assert stats.to_dict()["patch_grid"] == list(model.patch_grid_)
    assert FitStats.from_dict(stats.to_dict()) == stats
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.memory_size = 3  # type: ignore[misc]


def test_fit_stats_of_a_sharded_fit_and_an_object_round_trip_with_their_optional_fields(model):
    merged = dataclasses.replace(
        model.stats_, union_size=40, merge_seconds=0.5, clients=2, client_images=(3, 3), object="bottle"
    )
    values = merged.to_dict()
    assert values["client_images"] == [3, 3] and values["object"] == "bottle" and "shards" not in values
    assert list(values)[-1] == "object"
    assert FitStats.from_dict(json.loads(json.dumps(values))) == merged


def test_fit_stats_with_an_unknown_or_missing_field_are_refused():
    good = {"n_train_images": 2, "n_patches": 8, "memory_size": 4, "feature_dim": 3, "patch_grid": [2, 2],
            "input_size": [8, 8]}  # fmt: skip
    assert FitStats.from_dict(good).memory_size == 4
    with pytest.raises(RecordError, match="unknown"):
        FitStats.from_dict({**good, "surprise": 1})
    with pytest.raises(RecordError, match="n_patches"):
        FitStats.from_dict({k: v for k, v in good.items() if k != "n_patches"})


def test_calibration_names_its_good_images_by_path_and_sha256_and_the_model_version(model, images):
    record = calibrate(Predictor(model), images["calib"][:5], 0.2, source="calib")
    assert isinstance(record, Calibration)
    assert [ref.path for ref in record.images] == [str(p) for p in images["calib"][:5]]
    assert record.images[0].sha256 == hashlib.sha256(images["calib"][0].read_bytes()).hexdigest()
    assert record.model_version == 0
    assert all(ref.reachable() for ref in record.images)


def test_an_image_whose_file_changed_or_went_is_no_longer_reachable(tmp_path, images):
    copy = shutil.copy(images["calib"][0], tmp_path / "a.png")
    ref = ImageRef(str(copy), hashlib.sha256(images["calib"][0].read_bytes()).hexdigest())
    assert ref.reachable()
    shutil.copy(images["calib"][1], copy)  # other content under the same name
    assert not ref.reachable()
    copy.unlink()
    assert not ref.reachable()
    assert not ImageRef("", ref.sha256).reachable()


def test_a_saved_model_stores_the_records_as_plain_dicts_and_loads_them_back_equal(model, images, tmp_path):
    model.calibration_ = calibrate(Predictor(model), images["calib"][:5], 0.2, source="calib")
    model.evaluation_ = TestRanges(0.0, 2.0, 0.5, 3.0, f1_threshold=1.5)
    try:
        path = model.save(tmp_path / "m.pt")
    finally:
        calibration, model.calibration_, model.evaluation_ = model.calibration_, None, None
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert state["stats"] == model.stats_.to_dict()
    assert state["calibration"]["images"][0] == {"path": str(images["calib"][0]),
                                                  "sha256": calibration.images[0].sha256}  # fmt: skip
    assert state["evaluation"] == {"map_min": 0.0, "map_max": 2.0, "score_min": 0.5, "score_max": 3.0,
                                   "f1_threshold": 1.5}  # fmt: skip
    loaded = PatchCore.load(path, device="cpu")
    assert loaded.stats_ == model.stats_
    assert loaded.calibration_ == calibration
    assert loaded.evaluation_ == TestRanges(0.0, 2.0, 0.5, 3.0, 1.5)


def test_a_calibration_stored_before_images_and_versions_were_recorded_still_loads(model, images):
    record = calibrate(Predictor(model), images["calib"][:5], 0.2, source="calib")
    state = model.state_dict()
    old = record.to_dict()
    del old["images"], old["model_version"]
    state["calibration"] = old
    state["digest"] = state_digest(state)
    loaded = PatchCore.from_state_dict(state, device="cpu")
    assert loaded.calibration_ == dataclasses.replace(record, images=())
    assert Predictor(loaded).threshold == record.image_threshold


def test_evaluation_returns_its_test_ranges_and_leaves_the_model_unchanged(tmp_path):
    data = make_mvtec(tmp_path / "data", classes=("bottle",))
    (obj,) = load_mvtec(data, ["bottle"])
    model = PatchCore(backbone="resnet18", weights="random", resize=48, imagesize=48, device="cpu", batch_size=4)
    model.fit([str(s.image_path) for s in obj.train])
    before = model.state_dict()
    metrics, stats, ranges = evaluate_object(model, obj, tmp_path / "out", EvaluationSettings(heatmaps=0))
    assert model.evaluation_ is None and model.state_dict()["digest"] == before["digest"]
    assert isinstance(ranges, TestRanges)
    assert ranges.score_min <= ranges.score_max and ranges.map_min <= ranges.map_max
    assert ranges.f1_threshold is not None and ranges.score_min <= ranges.f1_threshold <= ranges.score_max
    assert stats["n_test_images"] == len(obj.test) and metrics["image_auroc"] is not None
