"""Backbone registry: timm models by name, listing, weights ids."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from patchcore import PatchCore
from patchcore.engine.backbones import BackboneError, FeatureExtractor, available_backbones, load_backbone


def test_registry_lists_the_builtin_backbones():
    assert {"wideresnet50", "wideresnet101", "resnet18", "resnet50", "efficientnet-lite0"} <= set(
        available_backbones()
    )


@pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="timm is not installed (extra 'timm')")
def test_any_timm_model_works_by_name_with_explicit_layers():
    network, weights_id, default_layers = load_backbone("timm:resnet18", "random", seed=0)
    assert weights_id == "random" and default_layers == ()
    assert not network.training
    maps = FeatureExtractor(network, ["layer2", "layer3"])(torch.zeros(1, 3, 64, 64))
    assert maps["layer2"].shape == (1, 128, 8, 8) and maps["layer3"].shape == (1, 256, 4, 4)
    images = torch.from_numpy(np.random.default_rng(0).normal(size=(2, 3, 64, 64)).astype(np.float32))
    model = PatchCore(
        backbone="timm:resnet18", weights="random", layers=["layer2", "layer3"], device="cpu",
        target_embed_dimension=128, pretrain_embed_dimension=128,
    ).fit(images)  # fmt: skip
    assert model.memory_bank_.shape[1] == 128


@pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="timm is not installed (extra 'timm')")
def test_timm_model_needs_layers_and_gives_a_clear_error_without_them():
    with pytest.raises(ValueError, match="no default layers"):
        PatchCore(backbone="timm:resnet18", weights="random", device="cpu").fit(torch.zeros(1, 3, 32, 32))


def test_unknown_timm_model_or_missing_timm_gives_a_backbone_error():
    with pytest.raises(BackboneError):
        load_backbone("timm:no_such_model_xyz", "random")
