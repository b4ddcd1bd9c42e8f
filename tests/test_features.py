"""The linear-operator patch aggregation (convolutions) equals the reference's unfold-and-pool arithmetic."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from patchcore.engine.backbones import FeatureExtractor, load_backbone
from patchcore.engine.features import LinearPatchAggregator, PatchFeatures, patch_features

pytestmark = pytest.mark.usefixtures("single_torch_thread")

GOLDEN = Path(__file__).resolve().parents[2] / "shared" / "golden" / "elpv_effnetlite0_112.npz"
EPS32 = float(np.finfo(np.float32).eps)


def tolerance(aggregator: LinearPatchAggregator, layer_maps: list[torch.Tensor]) -> torch.Tensor:
    """Per-entry bound on |conv - reference| from the arithmetic.

    All weights (pooling means, bilinear coefficients) are >= 0, so the same aggregation applied to |x| is
    the sum of the magnitudes of the terms, S. Each path rounds every entry at most n times (n: the most
    nonzero terms of one output row plus the bilinear taps and the divisions), so each differs from the
    exact value by at most n * eps * S (to first order) and the two from each other by twice that.
    """
    magnitude, _ = aggregator([m.abs() for m in layer_maps])
    nonzeros = max(
        int((weight != 0).reshape(len(weight), -1).sum(1).max()) for _, _, weight in aggregator.parts
    )
    steps = nonzeros + 4 + 4  # + bilinear taps + pooling divisions and the final pair mean
    return 2 * steps * EPS32 * magnitude + 1e-30


@pytest.mark.parametrize(
    "channels, sizes, patchsize, stride, pretrain, target",
    [
        ((40, 112), (28, 14), 3, 1, 1024, 1024),  # EfficientNet-Lite0 _blocks.4 + _blocks.10
        ((16, 24), (12, 6), 3, 1, 64, 64),
        ((16, 24), (12, 6), 3, 1, None, None),  # plain concatenation of the local means
        ((16, 24, 8), (12, 6, 3), 3, 1, 50, 37),  # target bins straddle two layers
        ((16, 24), (12, 7), 5, 1, 96, 80),  # odd grids: bilinear with non-integer scale
        ((10, 12), (11, 6), 3, 2, 40, 40),  # strided patches
        ((6,), (9,), 1, 1, 20, 10),
    ],
)
def test_conv_aggregation_equals_reference_patch_features(
    channels, sizes, patchsize, stride, pretrain, target
):
    generator = torch.Generator().manual_seed(sum(channels) + patchsize)
    maps = [
        torch.randn(2, c, s, s + 1, generator=generator) * (1 + i)
        for i, (c, s) in enumerate(zip(channels, sizes, strict=True))
    ]
    expected, grid = patch_features(maps, patchsize, stride, pretrain, target)
    aggregator = LinearPatchAggregator(channels, patchsize, stride, pretrain, target)
    actual, actual_grid = aggregator(maps)
    assert actual_grid == grid
    assert actual.shape == expected.shape
    assert torch.all((actual - expected).abs() <= tolerance(aggregator, maps))


def test_conv_aggregation_of_channels_last_maps_is_the_same():
    generator = torch.Generator().manual_seed(3)
    maps = [torch.randn(2, 16, 12, 12, generator=generator), torch.randn(2, 24, 6, 6, generator=generator)]
    aggregator = LinearPatchAggregator((16, 24), 3, 1, 64, 64)
    plain, _ = aggregator(maps)
    nhwc, _ = aggregator([m.contiguous(memory_format=torch.channels_last) for m in maps])
    assert torch.all((plain - nhwc).abs() <= tolerance(aggregator, maps))


def test_aggregator_rejects_maps_of_other_channel_counts():
    aggregator = LinearPatchAggregator((16, 24), 3, 1, 64, 64)
    with pytest.raises(ValueError, match="channels"):
        aggregator([torch.zeros(1, 16, 8, 8), torch.zeros(1, 20, 4, 4)])


def test_patch_features_rejects_unknown_aggregation():
    network, _, layers = load_backbone("resnet18", "random")
    with pytest.raises(ValueError, match="aggregation"):
        PatchFeatures(FeatureExtractor(network, layers), aggregation="fast")


def test_reference_and_conv_feature_paths_agree_on_a_backbone():
    network, _, layers = load_backbone("resnet18", "random")
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    reference = PatchFeatures(
        FeatureExtractor(network, layers), 3, 1, 256, 256, aggregation="reference", channels_last=False
    )
    maps = list(reference.extractor(images).values())
    expected, grid = reference(images)
    assert torch.equal(expected, patch_features(maps, 3, 1, 256, 256)[0])
    conv = PatchFeatures(FeatureExtractor(network, layers), 3, 1, 256, 256, channels_last=False)
    actual, actual_grid = conv(images)
    assert actual_grid == grid
    assert torch.all(
        (actual - expected).abs() <= tolerance(conv.aggregator([m.shape[1] for m in maps]), maps)
    )


@pytest.mark.skipif(not GOLDEN.is_file(), reason="golden fixtures not found")
def test_conv_aggregation_reproduces_the_golden_features_from_the_reference_layer_maps():
    with np.load(GOLDEN) as data:
        maps = [torch.from_numpy(data["test0_layer_blocks4"]), torch.from_numpy(data["test0_layer_blocks10"])]
        golden = data["test0_features"]
    aggregator = LinearPatchAggregator((40, 112), 3, 1, 1024, 1024)
    actual, grid = aggregator(maps)
    assert grid == (14, 14)
    expected, _ = patch_features(maps, 3, 1, 1024, 1024)
    assert torch.all((actual - expected).abs() <= tolerance(aggregator, maps))
    # And to the reference code's own output, at the golden suite's tolerance.
    assert np.abs(actual.numpy() - golden).max() <= 1e-4 * np.abs(golden).max()


def test_a_cpu_batch_in_chunks_gives_each_image_its_own_rows_in_order():
    # cpu_chunk runs a CPU batch through the backbone a few images at a time: the rows must be those of
    # each image computed alone, in order (equal up to the float rounding of the convolution algorithm
    # oneDNN picks per batch size; the chunked calls are the same calls, so bit for bit among themselves).
    network, _, layers = load_backbone("resnet18", "random")
    images = torch.randn(7, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    whole, grid = PatchFeatures(FeatureExtractor(network, layers), 3, 1, 256, 256)(images)
    for chunk in (1, 2, 3, 4):
        extract = PatchFeatures(FeatureExtractor(network, layers), 3, 1, 256, 256, cpu_chunk=chunk)
        rows, chunk_grid = extract(images)
        assert chunk_grid == grid
        by_hand = torch.cat([extract(images[s : s + chunk])[0] for s in range(0, len(images), chunk)])
        assert torch.equal(rows, by_hand), chunk
        torch.testing.assert_close(rows, whole, rtol=1e-5, atol=1e-5)
    per_image = torch.cat([extract(images[i : i + 1])[0] for i in range(len(images))])
    assert not torch.equal(per_image[:grid[0] * grid[1]], per_image[grid[0] * grid[1] : 2 * grid[0] * grid[1]])


def test_the_shipped_elpv_backbone_gives_the_same_rows_bit_for_bit_in_chunks_of_four():
    # configs/elpv.yaml sets extract_chunk: 4; its features (EfficientNet-Lite0, 224 px) must be those of
    # whole batches exactly, so the shipped speed-up changes no number.
    pytest.importorskip("efficientnet_lite_pytorch")
    from patchcore import PatchCore

    model = PatchCore(backbone="efficientnet-lite0", layers=["_blocks.4", "_blocks.10"], imagesize=224, resize=256,
                      device="cpu")  # fmt: skip
    images = torch.randn(6, 3, 224, 224, generator=torch.Generator().manual_seed(4))
    whole = model._patch_features(refitting=True)(images)[0]
    model.set_params(extract_chunk=4)
    assert torch.equal(model._patch_features(refitting=True)(images)[0], whole)
