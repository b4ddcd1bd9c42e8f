"""Training-set audit and robust fit (issue 21): engine/audit.py, the estimator's ``denoise``, the run's
reports and ``patchcore audit``."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from test_workflow import FAST_MODEL, run_cli, save, texture, with_square, write_config

from patchcore.engine.audit import (
    LeaveOneImageOut,
    RowSubset,
    audit_features,
    audit_training_set,
    coreset_audit,
    coreset_bounds,
    denoise_rows,
    image_ids_for,
    outlier_threshold,
)
from patchcore.engine.coreset import make_sampler
from patchcore.engine.model import PatchCore

pytestmark = pytest.mark.usefixtures("single_torch_thread")
FAST_MODEL = {**FAST_MODEL, "audit": True}  # the audit is opt-in (its cost: NOTES.md issue 21)


def brute_force_loo(features: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Per row: Euclidean distance to the nearest row of another image (float64, all pairs)."""
    x = features.astype(np.float64)
    d = (x * x).sum(1)[:, None] + (x * x).sum(1)[None, :] - 2 * x @ x.T
    d[ids[:, None] == ids[None, :]] = np.inf
    return np.sqrt(np.maximum(d.min(1), 0))


def gaussian_patches(n_images: int = 24, per_image: int = 16, dim: int = 12, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n_images * per_image, dim)).astype(np.float32)


# ----------------------------------------------------------------------------- the search


@pytest.mark.parametrize("projection_dim", [None, 6])
def test_pruned_image_scores_equal_the_brute_force_leave_one_image_out_maximum(projection_dim):
    features = gaussian_patches()
    features[5 * 16 + 3] += 4.0
    ids = image_ids_for(24, len(features))
    search = LeaveOneImageOut(features, ids, projection_dim=projection_dim, min_reference=40)
    scores, top = search.image_maxima()
    space = search.z.numpy()  # the features themselves, or their projection
    nearest = brute_force_loo(space, ids)
    expected = nearest.reshape(24, 16).max(1)
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(nearest[top], expected, rtol=1e-4, atol=1e-4)
    # The bounds did prune: not every patch needed an exact search.
    assert search.exact_searches < len(features)


def test_upper_bounds_never_fall_below_the_exact_distance():
    features = gaussian_patches(seed=3)
    ids = image_ids_for(24, len(features))
    search = LeaveOneImageOut(features, ids, projection_dim=None, min_reference=30)
    exact = brute_force_loo(features, ids)
    assert (np.sqrt(search.upper_bounds()) >= exact - 1e-4).all()


def test_outlier_rows_match_the_brute_force_decision_against_the_threshold():
    features = gaussian_patches(seed=4)
    features[40:44] += 3.0
    ids = image_ids_for(24, len(features))
    search = LeaveOneImageOut(features, ids, projection_dim=None, min_reference=30)
    exact = brute_force_loo(features, ids)
    threshold = float(np.quantile(exact, 0.9))
    np.testing.assert_array_equal(search.outliers(threshold), exact > threshold)


def test_rows_of_the_same_image_never_count_as_neighbours():
    # Two copies of a patch inside one image: without the exclusion its score would be 0.
    features = gaussian_patches(n_images=6, per_image=4, dim=5)
    features[9] = features[8] = features[8] + 50.0
    ids = image_ids_for(6, len(features))
    scores, _ = LeaveOneImageOut(features, ids, projection_dim=None).image_maxima()
    assert int(np.argmax(scores)) == 2 and scores[2] > 40


def test_outlier_threshold_is_median_plus_k_mad():
    scores = np.array([1.0, 2.0, 3.0, 4.0, 100.0])
    assert outlier_threshold(scores, 3.5) == pytest.approx(3.0 + 3.5 * 1.4826 * 1.0)


def test_row_subset_reads_the_chosen_rows_like_an_array():
    features = gaussian_patches(n_images=4, per_image=5, dim=3)
    rows = np.array([1, 2, 7, 11, 19])
    subset = RowSubset(features, rows)
    assert len(subset) == 5 and subset.shape == (5, 3)
    np.testing.assert_array_equal(subset[1:4], features[[2, 7, 11]])
    np.testing.assert_array_equal(subset[np.array([4, 0])], features[[19, 1]])


# ----------------------------------------------------------------------------- audit rule


def test_an_injected_outlier_image_ranks_first_and_is_the_only_suspect():
    features = gaussian_patches(n_images=40, per_image=16, dim=16, seed=1)
    features[17 * 16 + 6 : 17 * 16 + 9] += 6.0  # three patches of image 17
    audit = audit_features(features, image_ids_for(40, len(features)), (4, 4))
    assert int(audit.ranking[0]) == 17
    assert audit.suspects == (17,)
    assert audit.maps[17].shape == (4, 4) and int(np.argmax(audit.maps[17])) in (6, 7, 8)


def test_a_set_of_similar_images_raises_no_warning():
    features = gaussian_patches(n_images=40, per_image=16, dim=16, seed=2)
    audit = audit_features(features, image_ids_for(40, len(features)))
    assert audit.suspects == ()


def tiny_images(n: int = 12, size: int = 48, defect: int | None = None) -> torch.Tensor:
    """Normalised tensors of textures; image ``defect`` gets a bright square."""
    images = []
    for i in range(n):
        array = texture(size, size, i)
        if i == defect:
            array = with_square(array, (14, 14, 28, 28))
        images.append(torch.from_numpy(array).permute(2, 0, 1).float() / 255.0)
    return torch.stack(images)


def test_fit_audits_the_training_images_and_the_defective_one_ranks_first():
    model = PatchCore(**{**FAST_MODEL, "audit_method": "exact"}).fit(tiny_images(12, defect=7))
    assert int(model.audit_.ranking[0]) == 7
    assert 7 in model.audit_.suspects
    assert model.stats_.audit_suspects == len(model.audit_.suspects)


@pytest.mark.parametrize("method", ["coreset", "exact"])
def test_fit_of_clean_images_flags_none(method):
    model = PatchCore(**{**FAST_MODEL, "audit_method": method}).fit(tiny_images(12))
    assert model.audit_.suspects == ()


# ----------------------------------------------------------------------------- audit from the coreset


def brute_force_bound(features: np.ndarray, ids: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """r_i by definition (float64): the largest distance of a row outside image i to its nearest centre
    outside image i."""
    x = features.astype(np.float64)
    d = np.sqrt(np.maximum(((x[:, None, :] - x[None, centres, :]) ** 2).sum(-1), 0))
    out = []
    for i in np.unique(ids):
        rows, cols = ids != i, ids[centres] != i
        out.append(d[np.ix_(rows, cols)].min(1).max())
    return np.asarray(out)


@pytest.mark.parametrize("trial", range(12))
def test_coreset_distances_are_within_the_per_image_bound_of_the_exact_leave_one_image_out(trial, monkeypatch):
    import patchcore.engine.audit as audit_module

    # Small blocks: the merge of the per-chunk nearest centres (and of their images) is exercised.
    monkeypatch.setattr(audit_module, "_CHUNK_ROWS", 5)
    monkeypatch.setattr(audit_module, "_QUERY_ROWS", 7)
    rng = np.random.default_rng(trial)
    n_images, per_image, dim = int(rng.integers(2, 12)), int(rng.integers(1, 12)), int(rng.integers(2, 9))
    features = rng.normal(size=(n_images * per_image, dim)).astype(np.float32)
    features[:per_image] += 3.0 * (trial % 2)  # half the trials: image 0 unlike the others
    ids = image_ids_for(n_images, len(features))
    centres = np.sort(rng.choice(len(features), int(rng.integers(2, len(features) + 1)), replace=False))
    bounds = coreset_bounds(torch.from_numpy(features), ids, centres)
    exact = brute_force_loo(features, ids)
    approx = np.sqrt(bounds.nearest_other)
    tol = 1e-3  # float32 distance formula near 0
    assert (approx >= exact - tol).all()  # centres are rows: never below the exact distance
    assert (approx - exact <= bounds.image_bound[ids] + tol).all()
    np.testing.assert_allclose(bounds.image_bound, brute_force_bound(features, ids, centres), atol=5e-3)
    # The image scores (maxima) inherit it: 0 <= A_i - S_i <= r_i.
    a_i, s_i = approx.reshape(n_images, -1).max(1), exact.reshape(n_images, -1).max(1)
    assert ((a_i - s_i >= -tol) & (a_i - s_i <= bounds.image_bound + tol)).all()


def coreset_of(
    features: np.ndarray, percentage: float = 0.2, projection_dim: int = 8
) -> tuple[np.ndarray, np.ndarray | None]:
    sampler = make_sampler("approx_greedy_coreset", percentage, projection_dim, 10)
    indices, space = sampler.select_with_space(features, np.random.default_rng(0))
    return indices, space.projection


def test_coreset_audit_scores_bound_the_exact_audit_in_the_same_space():
    features = gaussian_patches(n_images=30, per_image=16, dim=16, seed=7)
    features[3 * 16 + 5] += 5.0
    meta = {"n_images": 30, "n_rows": len(features), "patch_grid": [4, 4]}
    indices, projection = coreset_of(features)
    approx = coreset_audit(features, meta, indices, projection, method="coreset")
    exact = coreset_audit(features, meta, indices, projection, method="exact")
    z = features @ projection.T
    truth = brute_force_loo(z, image_ids_for(30, len(features))).reshape(30, 16).max(1)
    np.testing.assert_allclose(exact.image_scores, truth, rtol=1e-4, atol=1e-4)
    assert approx.kind == "coreset" and exact.kind == "exact" and exact.bounds is None
    gap = approx.image_scores - truth
    assert (gap >= -1e-4).all() and (gap <= approx.bounds + 1e-4).all()
    # The coreset distances prune the exact search: not every row is searched exactly.
    assert 0 < exact.exact_searches < len(features)


def test_coreset_audit_ranks_an_injected_defect_first_and_flags_only_it():
    features = gaussian_patches(n_images=40, per_image=16, dim=16, seed=1)
    features[17 * 16 + 6 : 17 * 16 + 9] += 6.0  # three patches of image 17
    meta = {"n_images": 40, "n_rows": len(features), "patch_grid": [4, 4]}
    indices, projection = coreset_of(features, 0.1)
    audit = coreset_audit(features, meta, indices, projection)
    assert int(audit.ranking[0]) == 17
    assert audit.suspects == (17,)
    assert audit.maps[17].shape == (4, 4) and int(np.argmax(audit.maps[17])) in (6, 7, 8)


def test_coreset_audit_of_a_clean_set_raises_no_warning():
    for seed in (2, 4, 5):
        features = gaussian_patches(n_images=40, per_image=16, dim=16, seed=seed)
        meta = {"n_images": 40, "n_rows": len(features), "patch_grid": [4, 4]}
        indices, projection = coreset_of(features, 0.1, projection_dim=16)  # 16: the features themselves
        assert coreset_audit(features, meta, indices, projection).suspects == ()


def test_the_audit_is_opt_in_and_leaves_bank_and_scores_as_without_it():
    images = tiny_images(12, defect=7)
    on = PatchCore(**FAST_MODEL).fit(images)
    off = PatchCore(**{**FAST_MODEL, "audit": False}).fit(images)
    assert PatchCore().audit is False and on.audit_method == "coreset"
    assert on.audit_ is not None and off.audit_ is None
    assert on.stats_.audit_method == "coreset" and on.stats_.audit_exact_fraction == 0
    np.testing.assert_array_equal(on.memory_bank_, off.memory_bank_)
    np.testing.assert_array_equal(on.coreset_indices_, off.coreset_indices_)
    np.testing.assert_array_equal(on.predict(images[:3]).image_scores, off.predict(images[:3]).image_scores)


def test_the_default_coreset_audit_ranks_the_defective_image_first_in_a_fit():
    # 12 images of 36 patches: a 43-row coreset, its bounds too wide for the warning rule here (the exact
    # method flags it, test above); the ranking holds.
    model = PatchCore(**FAST_MODEL).fit(tiny_images(12, defect=7))
    assert int(model.audit_.ranking[0]) == 7
    assert model.stats_.audit_method == "coreset" and model.stats_.audit_max_bound > 0


# ----------------------------------------------------------------------------- robust fit


def synthetic_fit(
    denoise: bool, sampler: str = "approx_greedy_coreset", audit_method: str = "coreset"
) -> tuple[PatchCore, np.ndarray, dict]:
    features = gaussian_patches(n_images=30, per_image=16, dim=16, seed=5)
    features[4 * 16 + 2] += 9.0  # one outlier patch in image 4
    features[9 * 16 : 10 * 16] += 7.0  # image 9: all of it unlike the others
    meta = {"n_images": 30, "n_rows": len(features), "patch_grid": [4, 4], "input_size": [48, 48]}
    model = PatchCore(
        **FAST_MODEL, sampler=sampler, percentage=0.25, denoise=denoise, target_embed_dimension=16,
        audit_method=audit_method,
    )  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit_features(features, meta)
    return model, features, {"warnings": [str(w.message) for w in caught]}


def test_without_denoise_the_greedy_coreset_takes_the_outlier_patches():
    model, _, _ = synthetic_fit(False)
    assert 4 * 16 + 2 in model.coreset_indices_
    assert np.isin(np.arange(9 * 16, 10 * 16), model.coreset_indices_).any()


@pytest.mark.parametrize("audit_method", ["coreset", "exact"])
def test_denoise_leaves_the_outlier_patch_and_the_outlier_image_out_of_the_bank(audit_method):
    model, features, info = synthetic_fit(True, audit_method=audit_method)
    assert model.audit_.kind == audit_method
    assert 4 * 16 + 2 not in model.coreset_indices_
    assert not np.isin(np.arange(9 * 16, 10 * 16), model.coreset_indices_).any()
    assert model.denoise_plan_.dropped_images == (9,)
    assert any("position(s) 9" in w for w in info["warnings"])
    np.testing.assert_array_equal(model.memory_bank_, features[model.coreset_indices_])
    plan = model.denoise_plan_
    assert model.stats_.denoise_kept_patches == len(plan.keep)
    # Besides image 9, only the few most unusual patches of the other images are left out.
    assert len(features) - 16 - len(plan.keep) <= 0.1 * len(features)


def test_denoise_off_selects_exactly_what_the_sampler_alone_selects():
    model, features, _ = synthetic_fit(False)
    sampler = make_sampler("approx_greedy_coreset", 0.25, 128, 10)
    expected = sampler.select(features, np.random.default_rng(0))
    np.testing.assert_array_equal(model.coreset_indices_, expected)
    assert model.denoise_plan_ is None


def test_a_denoised_model_saves_and_loads_with_its_setting(tmp_path):
    model, _, _ = synthetic_fit(True)
    path = model.save(tmp_path / "m.pt")
    loaded = PatchCore.load(path, device="cpu")
    assert loaded.denoise is True
    np.testing.assert_array_equal(loaded.memory_bank_, model.memory_bank_)


def test_denoise_is_a_declared_parameter_fixed_once_fitted():
    with pytest.raises(ValueError, match="denoise"):
        PatchCore(denoise="yes")
    model, _, _ = synthetic_fit(True)
    model.denoise = False
    assert not hasattr(model, "memory_bank_")


def test_denoise_rows_keep_everything_of_a_clean_set():
    features = gaussian_patches(n_images=30, per_image=16, dim=16, seed=6)
    search = LeaveOneImageOut(features, image_ids_for(30, len(features)))
    audit = audit_training_set(search)
    plan = denoise_rows(search, audit)
    assert plan.dropped_images == ()
    assert plan.threshold == pytest.approx(float(np.median(audit.image_scores)))
    # Above the median image's worst patch: at most a few patches of each of about half the images.
    lost = np.bincount(image_ids_for(30, len(features))[np.setdiff1d(np.arange(len(features)), plan.keep)],
                       minlength=30)  # fmt: skip
    assert 0 < (lost > 0).sum() <= 16 and lost.max() <= 4


# ----------------------------------------------------------------------------- application


def make_contaminated_folder(root: Path) -> Path:
    for i in range(10):
        array = texture(48, 48, i)
        if i == 6:
            array = with_square(array, (14, 14, 28, 28))
        save(root / "train" / "good" / f"{i:03d}.png", array)
    for i in range(2):
        save(root / "test" / "good" / f"{i:03d}.png", texture(48, 48, 30 + i))
        save(root / "test" / "scratch" / f"{i:03d}.png", with_square(texture(48, 48, 40 + i), (8, 8, 20, 20)))
    return root


def test_train_run_lists_the_suspect_in_its_reports_and_warns_in_the_log(tmp_path):
    data = make_contaminated_folder(tmp_path / "data")
    config = write_config(tmp_path / "c.yaml", "folder", data, tmp_path / "results")
    code, _, err = run_cli("train", "--config", config, "model.audit=true")
    assert code == 0, err
    run_dir = next((tmp_path / "results" / "tiny").iterdir())
    (name,) = json.loads((run_dir / "summary.json").read_text())["training_audit"]
    record = json.loads((run_dir / "audit" / f"{name}.json").read_text())
    assert record["ranking"][0]["image"].endswith("006.png") and record["ranking"][0]["suspect"]
    assert (run_dir / record["ranking"][0]["map"]).is_file()
    assert "Training-set audit" in (run_dir / "summary.md").read_text()
    html = (run_dir / "report.html").read_text()
    assert "Training-set audit" in html and "006.png" in html
    warned = [line for line in (run_dir / "run.log").read_text().splitlines() if "training-set audit" in line]
    assert len(warned) == 1 and "WARNING" in warned[0] and "006.png" in warned[0]


def test_audit_command_ranks_a_folder_without_training(tmp_path):
    data = make_contaminated_folder(tmp_path / "data")
    config = write_config(tmp_path / "c.yaml", "folder", data, tmp_path / "results")
    code, out, err = run_cli(
        "audit", "--config", config, data / "train" / "good", "--json", "--out", tmp_path / "a"
    )
    assert code == 0, err
    record = json.loads(out)
    assert record["ranking"][0]["image"].endswith("006.png")
    assert (tmp_path / "a" / "audit" / "audit.csv").is_file()
    code, out, _ = run_cli("audit", "--config", config, data / "train" / "good", "model.seed=1", "--top", "3")
    assert code == 2  # seed is not a model key: a one-line error, no work done
    code, out, _ = run_cli("audit", "--config", config, data / "train" / "good", "--top", "3")
    assert code == 0 and out.splitlines()[1].rstrip().endswith("006.png") and len(out.splitlines()) == 5


def test_audit_command_refuses_a_single_image(tmp_path):
    data = make_contaminated_folder(tmp_path / "data")
    config = write_config(tmp_path / "c.yaml", "folder", data, tmp_path / "results")
    code, _, err = run_cli("audit", "--config", config, data / "train" / "good" / "000.png")
    assert code == 2 and "at least 2 images" in err
