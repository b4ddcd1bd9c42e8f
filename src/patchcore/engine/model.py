"""The PatchCore estimator: ``fit`` on defect-free images, ``predict`` scores and anomaly maps, and
``partial_fit`` to teach a fitted model more good images (with a history, ``rollback`` and ``remove_update``).

Constructor arguments are the whole configuration (as in scikit-learn); fitted state lives in attributes
ending in an underscore. A model file holds the memory bank and every setting needed to rebuild the
feature extractor, and loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.transforms import ImageTransform, load_image
from ..fileio import atomic_write
from .audit import RowSubset, audit_fit, audit_stats, coreset_audit, coreset_denoise
from .backbones import BackboneError, FeatureExtractor, load_backbone
from .coreset import bank_distances, continue_coreset, make_sampler, project
from .features import PatchFeatures
from .index import MemoryBankIndex
from .params import PARAMS, check_param, params_table
from .persistence import (
    MODEL_FORMAT,
    MODEL_FORMAT_VERSION,
    ModelFileError,
    check_state,
    model_state,
    plain,
    read_state,
    restore_fitted,
)
from .records import Calibration, CoresetSpace, FitStats, ImageRef, TestRanges, UpdateRecord
from .scoring import anomaly_maps, image_scores, patch_scores, reweighted_image_scores
from .store import FeatureStore
from .updates import (
    DEFAULT_GUARD_FACTOR,
    UpdateError,
    UpdateRefused,
    UpdateRule,
    image_refs,
    tensor_ref,
    utc_now,
)

__all__ = [
    "MODEL_FORMAT",
    "MODEL_FORMAT_VERSION",
    "ModelFileError",
    "NonFiniteError",
    "PatchCore",
    "Prediction",
    "UpdateError",
    "UpdateRecord",
    "UpdateRefused",
]

# (phase, items done so far, total items or None)
ProgressCallback = Callable[[str, int, int | None], None]

_PRECISIONS = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
_PARAM_NAMES = tuple(p.name for p in PARAMS)
_FROZEN = frozenset(p.name for p in PARAMS if p.frozen_after_fit)


class NonFiniteError(ValueError):
    """NaN or inf in patch features or scores (bad backbone weights, a broken image): never scored.

    ``positions``: the images' 0-based positions in the input of the fit / predict call, so a caller that
    knows the file names can name the files.
    """

    def __init__(self, what: str, positions: list[int], names: list[str] | None = None):
        shown = [str(n) for n in names] if names else [f"position {p} of the input" for p in positions]
        text = ", ".join(shown[:5]) + (f" and {len(shown) - 5} more" if len(shown) > 5 else "")
        super().__init__(
            f"non-finite (NaN or inf) {what} for image {text}: bad backbone weights or a broken image?"
        )
        self.what = what
        self.positions = positions
        self.names = names


def _check_finite(values: np.ndarray, n_images: int, offset: int, what: str) -> None:
    """Raise NonFiniteError naming the images (by position) whose rows hold NaN or inf."""
    finite = np.isfinite(values.reshape(n_images, -1)).all(axis=1)
    if not finite.all():
        raise NonFiniteError(what, [offset + int(i) for i in np.flatnonzero(~finite)])


@dataclass
class Prediction:
    """What ``predict`` returns for N images."""

    image_scores: np.ndarray  # (N,)
    anomaly_maps: np.ndarray | None  # (N, H, W), same size as the input tensors
    patch_scores: np.ndarray  # (N, gh, gw)
    timings: dict[str, float] = field(default_factory=dict)


class PatchCore:
    """PatchCore anomaly detector (Roth et al., CVPR 2022).

    Keyword parameters, their types, defaults, constraints and meaning are declared once, in
    :data:`patchcore.engine.params.PARAMS` (listed below, and by ``patchcore params``). A value is checked
    when it is set; the parameters that shaped the memory bank cannot change once the model is fitted.
    """

    # The parameters as typed attributes. Each is declared once, with its constraint and help, in
    # engine/params.py; the signature below repeats the names and defaults (scikit-learn style, visible to
    # the type checker and to help()), and tests/test_engine.py checks that the three agree.
    backbone: str
    layers: list[str] | None
    weights: str | None
    resize: int | list[int] | None
    imagesize: int | list[int] | None
    mean: list[float]
    std: list[float]
    patchsize: int
    patchstride: int
    pretrain_embed_dimension: int | None
    target_embed_dimension: int | None
    sampler: str
    percentage: float
    projection_dim: int | None
    num_starting_points: int
    audit: bool
    audit_method: str
    denoise: bool
    num_neighbors: int
    distance: str
    reweight: bool
    reweight_neighbors: int
    smoothing_sigma: float
    device: str
    precision: str
    batch_size: int
    extract_chunk: int | None
    seed: int
    work_dir: str | None
    index_kind: str
    nprobe: int
    ef_search: int
    search_threads: int | None

    def __init__(
        self,
        *,
        backbone: str = "wideresnet50",
        layers: list[str] | None = None,
        weights: str | None = None,
        resize: int | list[int] | None = 256,
        imagesize: int | list[int] | None = 224,
        mean: list[float] = [0.485, 0.456, 0.406],  # noqa: B006 (copied for each estimator below)
        std: list[float] = [0.229, 0.224, 0.225],  # noqa: B006 (copied for each estimator below)
        patchsize: int = 3,
        patchstride: int = 1,
        pretrain_embed_dimension: int | None = 1024,
        target_embed_dimension: int | None = 1024,
        sampler: str = "approx_greedy_coreset",
        percentage: float = 0.1,
        projection_dim: int | None = 128,
        num_starting_points: int = 10,
        audit: bool = False,
        audit_method: str = "coreset",
        denoise: bool = False,
        num_neighbors: int = 1,
        distance: str = "euclidean",
        reweight: bool = False,
        reweight_neighbors: int = 3,
        smoothing_sigma: float = 4.0,
        device: str = "auto",
        precision: str = "fp32",
        batch_size: int = 32,
        extract_chunk: int | None = None,
        seed: int = 0,
        work_dir: str | None = None,
        index_kind: str = "flat",
        nprobe: int = 8,
        ef_search: int = 64,
        search_threads: int | None = None,
    ) -> None:
        arguments = locals()  # first statement: exactly the parameters (and self)
        defaults = PatchCore.__init__.__kwdefaults__ or {}
        for p in PARAMS:  # in declaration order; __setattr__ checks each value against its declaration
            value = arguments[p.name]
            # A value is kept as given; a default list is the signature's one object, so each estimator
            # gets its own copy.
            setattr(self, p.name, copy.deepcopy(value) if value is defaults.get(p.name) else value)
        self._features: PatchFeatures | None = None
        self._index: MemoryBankIndex | None = None
        self._space_bank: torch.Tensor | None = None  # the bank in the coreset's space (partial_fit)
        # Guards the lazy construction of the extractor and the index: predict() may be called from many
        # threads at once and must build each only once.
        self._build_lock = threading.RLock()
        # Searches read the bank together; a change of it (partial_fit, rollback, remove_update) waits for
        # them and holds them off while it runs; updates run one at a time.
        self._bank_lock = _ReadWriteLock()
        self._update_lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        # Pickled (copied, or sent to another process): the extractor, the index and the lock are rebuilt
        # on first use there.
        state = dict(self.__dict__)
        state.update(
            _features=None, _index=None, _build_lock=None, _space_bank=None, _bank_lock=None, _update_lock=None
        )
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.__dict__.setdefault("_space_bank", None)
        self._build_lock = threading.RLock()
        self._bank_lock = _ReadWriteLock()
        self._update_lock = threading.Lock()

    # ----------------------------------------------------------------- configuration

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _PARAM_NAMES:
            check_param(name, value)  # a bad value is refused when it is set, not in the middle of a fit
            if (
                name in _FROZEN
                and "memory_bank_" in self.__dict__
                and plain(value) != plain(self.__dict__.get(name))
            ):
                # The bank was built with the old value: scoring against it, or saving it under the new
                # value, would be silently wrong. The model becomes unfitted and says why.
                for attr in [a for a in self.__dict__ if a.endswith("_") and not a.startswith("_")]:
                    del self.__dict__[attr]
                self.__dict__["_unfitted_because"] = (
                    f"{name} was changed from {plain(self.__dict__.get(name))!r} to {plain(value)!r} after "
                    "fit, which dropped the memory bank built with the old value; call fit() again"
                )
            if "_build_lock" in self.__dict__:
                # Settings such as device or index_kind take effect on the next use.
                self.__dict__["_features"] = None
                self.__dict__["_index"] = None
                self.__dict__["_space_bank"] = None
        object.__setattr__(self, name, value)

    def get_params(self) -> dict[str, Any]:
        """The constructor arguments, as plain JSON-able values."""
        return {name: plain(getattr(self, name)) for name in _PARAM_NAMES}

    def set_params(self, **params: Any) -> PatchCore:
        """Change parameters (each checked against its declaration before any is set). On a fitted model,
        changing a parameter that shaped the memory bank (``frozen_after_fit``: features, selection, seed)
        drops the fitted state, so predict/save refuse until the next fit; the others take effect at once."""
        unknown = sorted(set(params) - set(_PARAM_NAMES))
        if unknown:
            raise ValueError(f"unknown PatchCore parameter(s): {', '.join(unknown)}")
        for name, value in params.items():  # all checked before any is set
            check_param(name, value)
        for name, value in params.items():
            setattr(self, name, value)
        return self

    def __repr__(self) -> str:
        changed = [
            f"{p.name}={getattr(self, p.name)!r}" for p in PARAMS if plain(getattr(self, p.name)) != plain(p.default)
        ]
        return f"PatchCore({', '.join(changed)})"

    def _validate(self) -> None:
        for name in _PARAM_NAMES:
            check_param(name, getattr(self, name))

    @property
    def transform(self) -> ImageTransform:
        """The image transform for paths / PIL images (and for ``patchcore predict``)."""
        return ImageTransform(
            resize=_tuple_or_scalar(self.resize),
            imagesize=_tuple_or_scalar(self.imagesize),
            mean=_rgb(self.mean),
            std=_rgb(self.std),
        )

    @property
    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def _patch_features(self, refitting: bool = False) -> PatchFeatures:
        """The feature extractor, built on first use. Unless ``refitting``, a fitted model checks that the
        backbone weights found now are those its memory bank was built with."""
        with self._build_lock:
            if self._features is None:
                self._build_features(refitting)
            assert self._features is not None  # built just now
            return self._features

    def _build_features(self, refitting: bool) -> None:
        self._validate()
        network, wid, default_layers = load_backbone(self.backbone, self.weights, seed=self.seed)
        expected = getattr(self, "weights_id_", None)
        if not refitting and hasattr(self, "memory_bank_") and expected is not None and wid != expected:
            # A bank is only meaningful with the features it was built from.
            raise BackboneError(
                f"this model was fitted with backbone weights {expected}, but the weights found now are "
                f"{wid}; pass weights=PATH (patchcore predict/evaluate --weights PATH) to the file it was "
                "fitted with"
            )
        layers = tuple(self.layers) if self.layers else default_layers
        if not layers:
            raise ValueError(f"backbone {self.backbone!r} has no default layers: pass layers=[...]")
        extractor = FeatureExtractor(network, layers).to(self.torch_device)
        self._features = PatchFeatures(
            extractor,
            self.patchsize,
            self.patchstride,
            self.pretrain_embed_dimension,
            self.target_embed_dimension,
            _PRECISIONS[self.precision],
            cpu_chunk=self.extract_chunk,
        )
        self.weights_id_ = wid
        self.layers_ = layers

    # ----------------------------------------------------------------- input handling

    def _batches(self, images: Any) -> Iterator[torch.Tensor]:
        """Yield (B, 3, H, W) float tensors from tensors, arrays, DataLoaders, iterables of batches or
        of single images, dicts with an ``image`` key, or paths / PIL images (transformed here)."""
        if isinstance(images, np.ndarray):
            images = torch.from_numpy(images)
        if isinstance(images, torch.Tensor):
            if images.ndim == 3:
                images = images.unsqueeze(0)
            if images.ndim != 4:
                raise ValueError(f"image tensors must be (N, C, H, W), got shape {tuple(images.shape)}")
            for start in range(0, len(images), self.batch_size):
                yield images[start : start + self.batch_size].float()
            return
        pending: list[torch.Tensor] = []
        for item in images:
            if isinstance(item, dict):
                if "image" not in item:
                    raise ValueError("a batch dict must have an 'image' key")
                item = item["image"]
            elif isinstance(item, (tuple, list)) and item and isinstance(item[0], torch.Tensor):
                item = item[0]
            if isinstance(item, (str, os.PathLike)):
                item = self.transform(load_image(Path(item)))
            elif _is_pil(item):
                item = self.transform(item.convert("RGB"))
            elif isinstance(item, np.ndarray):
                item = torch.from_numpy(item)
            if not isinstance(item, torch.Tensor):
                raise TypeError(f"cannot use {type(item).__name__} as an image or a batch of images")
            if item.ndim == 4:
                yield from _flush(pending)
                yield item.float()
            elif item.ndim == 3:
                pending.append(item.float())
                if len(pending) == self.batch_size:
                    yield from _flush(pending)
            else:
                raise ValueError(
                    f"an image must be (C, H, W) and a batch (B, C, H, W), got {tuple(item.shape)}"
                )
        yield from _flush(pending)

    # ----------------------------------------------------------------- fit

    def fit(self, images: Any, *, progress: ProgressCallback | None = None) -> PatchCore:
        """Build the memory bank from defect-free images. Returns self.

        Patch features stream to a file in a temporary folder (under ``work_dir``) and are read back in
        chunks, so peak memory does not grow with the number of images. To reuse features across fits,
        call :meth:`extract_features` into a store you keep and :meth:`fit_features` on it (the
        application's feature cache does this).
        """
        features = self._patch_features(refitting=True)
        t0 = time.perf_counter()
        work_dir = Path(tempfile.mkdtemp(prefix="patchcore-", dir=self.work_dir))
        try:
            store = FeatureStore(work_dir / "train_features.f32", durable=False)
            meta = self._extract(features, images, store, progress)
            meta.update(n_rows=store.n_rows, dim=store.dim)
            self.fit_features(
                store.array(), meta, progress=progress, extract_seconds=time.perf_counter() - t0
            )
        finally:
            shutil.rmtree(work_dir, ignore_errors=True)
        return self

    def extract_features(
        self, images: Any, store: FeatureStore, *, progress: ProgressCallback | None = None
    ) -> dict[str, Any]:
        """Run the backbone over ``images``, appending their patch features to ``store``.

        Returns the metadata :meth:`fit_features` needs (``n_images``, ``patch_grid``, ``input_size``).
        """
        return self._extract(self._patch_features(refitting=True), images, store, progress)

    def fit_features(
        self,
        train_features: Any,
        meta: dict[str, Any],
        *,
        progress: ProgressCallback | None = None,
        extract_seconds: float = 0.0,
        indices: np.ndarray | None = None,
    ) -> PatchCore:
        """Build the memory bank from precomputed patch features (an (N, D) array or a feature store's
        array, read in chunks) and the metadata :meth:`extract_features` returned. Returns self.

        ``indices``: the rows to keep, selected elsewhere (a sharded or federated merge), instead of the
        sampler's selection."""
        self._patch_features(refitting=True)
        device = self.torch_device
        audit, plan = None, None
        selected_here = indices is None
        if selected_here and self.denoise and self.audit_method == "exact":
            # The robust fit's selection (``denoise``) from the exact audit, before the coreset:
            # engine/audit.py. Its random stream is its own.
            audit, plan = audit_fit(train_features, meta, self.seed, self.denoise)
        elif selected_here and self.denoise:
            # The robust fit's selection from a first coreset of all rows (engine/audit.py, coreset_denoise);
            # the bank is the coreset of the rows it keeps.
            first_sampler = make_sampler(self.sampler, self.percentage, self.projection_dim, self.num_starting_points)
            first, first_space = first_sampler.select_with_space(train_features, np.random.default_rng(self.seed))
            audit, plan = coreset_denoise(
                train_features, meta, first, "own" if first_space is None else first_space.projection, seed=self.seed
            )  # fmt: skip
        t1 = time.perf_counter()
        space: CoresetSpace | None = None  # where partial_fit continues the coreset (None: it cannot)
        if indices is None:
            rng = np.random.default_rng(self.seed)
            sampler = make_sampler(self.sampler, self.percentage, self.projection_dim, self.num_starting_points)
            candidates = train_features if plan is None else RowSubset(train_features, plan.keep)
            indices, space = sampler.select_with_space(
                candidates, rng, None if progress is None else lambda d, t: progress("coreset", d, t)
            )
            if plan is not None:
                indices = plan.keep[indices]
        if selected_here and self.audit and audit is None and plan is None:
            # The training-set audit from the coreset just chosen (engine/audit.py, coreset_audit): it only
            # reads the features and the chosen rows, so the bank is the same with it on or off.
            t_audit = time.perf_counter()
            audit = coreset_audit(
                train_features, meta, indices, "own" if space is None else space.projection,
                seed=self.seed, method=self.audit_method,
            )  # fmt: skip
            t1 += time.perf_counter() - t_audit  # coreset_seconds stays the coreset's
        bank = np.array(train_features[indices], dtype=np.float32)  # a copy: the feature file may go
        bad = ~np.isfinite(bank).all(axis=1)
        if bad.any():  # features given directly (extract_features checks its own)
            per_image = max(1, int(meta["n_rows"]) // max(1, int(meta["n_images"])))
            rows = np.asarray(indices)[bad]
            raise NonFiniteError("training patch features", sorted({int(r) // per_image for r in rows}))
        t2 = time.perf_counter()

        self.__dict__.pop("_unfitted_because", None)
        self.memory_bank_ = bank
        # Decision threshold and normalisation from good images (patchcore.deploy.calibration); None =
        # no decisions. The test-set ranges and F1 threshold of an evaluation are only figures.
        self.calibration_: Calibration | None = None
        self.evaluation_: TestRanges | None = None
        self.coreset_indices_ = np.asarray(indices, dtype=np.int64)
        # Updates (partial_fit): the version that added each bank row (0: this fit), the model's version
        # and the history of its updates.
        self.coreset_space_ = space
        self.row_versions_ = np.zeros(len(bank), dtype=np.int64)
        self.version_ = 0
        self.history_: tuple[UpdateRecord, ...] = ()
        self._space_bank = None
        self._index = None
        self._search_index()
        t3 = time.perf_counter()
        self.patch_grid_ = tuple(int(g) for g in meta["patch_grid"])
        self.input_size_ = tuple(int(s) for s in meta["input_size"])
        self.stats_ = FitStats(
            n_train_images=int(meta["n_images"]),
            n_patches=int(meta["n_rows"]),
            memory_size=int(len(bank)),
            feature_dim=int(bank.shape[1]),
            patch_grid=self.patch_grid_,
            input_size=self.input_size_,
            extract_seconds=round(extract_seconds, 4),
            coreset_seconds=round(t2 - t1, 4),
            index_seconds=round(t3 - t2, 4),
            feature_cache="off",
            device=str(device),
            **audit_stats(audit, plan),
        )
        self.audit_ = audit  # engine/audit.py: TrainingAudit, None for a merged (sharded) fit
        self.denoise_plan_ = plan  # None unless denoise
        return self

    def _extract(
        self, features: PatchFeatures, images: Any, store: FeatureStore, progress: ProgressCallback | None
    ) -> dict[str, Any]:
        """Run the backbone over all images, appending patch features to ``store``."""
        device = self.torch_device
        n_images = 0
        grid: tuple[int, ...] | None = None
        input_size: tuple[int, ...] | None = None
        for batch in self._batches(images):
            batch_rows, batch_grid = features(batch.to(device, non_blocking=True))
            if grid is not None and (tuple(batch_grid) != grid or tuple(batch.shape[-2:]) != input_size):
                raise ValueError(
                    f"training images must all have one size: got {tuple(batch.shape[-2:])} after {input_size}"
                )
            grid, input_size = tuple(batch_grid), tuple(batch.shape[-2:])
            rows = batch_rows.cpu().numpy()
            _check_finite(rows, len(batch), n_images, "patch features")
            store.append(rows)
            n_images += len(batch)
            if progress is not None:
                progress("extract", n_images, None)
        if n_images == 0 or grid is None or input_size is None:
            raise ValueError("fit() got no images")
        return {"n_images": n_images, "patch_grid": list(grid), "input_size": list(input_size)}

    def feature_settings(self) -> dict[str, Any]:
        """Everything that changes the training patch features (what a feature cache must key on)."""
        self._patch_features(refitting=True)  # resolves the weights id and the layers
        return {
            "backbone": self.backbone,
            "weights_id": self.weights_id_,
            "layers": list(self.layers_),
            "transform": self.transform.to_dict(),
            "patchsize": self.patchsize,
            "patchstride": self.patchstride,
            "pretrain_embed_dimension": self.pretrain_embed_dimension,
            "target_embed_dimension": self.target_embed_dimension,
            "precision": self.precision,
            "device_type": self.torch_device.type,
        }

    def _search_index(self) -> MemoryBankIndex:
        with self._build_lock:
            if self._index is None:
                self._build_index()
            assert self._index is not None  # built just now
            return self._index

    def _build_index(self) -> None:
        self._check_fitted()
        self._index = MemoryBankIndex(
            self.memory_bank_,
            use_gpu=self.torch_device.type == "cuda",
            kind=self.index_kind,
            nprobe=self.nprobe,
            ef_search=self.ef_search,
            threads=self.search_threads,
        )

    def _check_fitted(self) -> None:
        if not hasattr(self, "memory_bank_"):
            why = self.__dict__.get("_unfitted_because")
            raise RuntimeError(
                f"this PatchCore is not fitted: {why}" if why
                else "this PatchCore is not fitted yet: call fit() or PatchCore.load() first"
            )

    # ----------------------------------------------------------------- predict

    def predict(
        self, images: Any, *, return_maps: bool = True, progress: ProgressCallback | None = None
    ) -> Prediction:
        """Image scores, anomaly maps (input tensor size) and patch-score grids for every image."""
        self._check_fitted()
        features = self._patch_features()
        index = self._search_index()
        device = self.torch_device
        all_image_scores, all_maps, all_patch_scores = [], [], []
        timings = {"extract_seconds": 0.0, "search_seconds": 0.0, "maps_seconds": 0.0}
        done = 0
        for batch in self._batches(images):
            t0 = time.perf_counter()
            batch_rows, grid = features(batch.to(device, non_blocking=True))
            rows = batch_rows.cpu().numpy()
            _check_finite(rows, len(batch), done, "patch features")
            t1 = time.perf_counter()
            with self._bank_lock.read():
                scores, image = self._score_rows(index, rows, len(batch))
            _check_finite(scores, len(batch), done, "patch scores")
            _check_finite(image, len(batch), done, "image scores")
            t2 = time.perf_counter()
            grids = scores.reshape(len(batch), *grid)
            all_image_scores.append(image)
            all_patch_scores.append(grids)
            if return_maps:
                size = (int(batch.shape[-2]), int(batch.shape[-1]))
                all_maps.append(anomaly_maps(grids, size, self.smoothing_sigma))
            t3 = time.perf_counter()
            timings["extract_seconds"] += t1 - t0
            timings["search_seconds"] += t2 - t1
            timings["maps_seconds"] += t3 - t2
            done += len(batch)
            if progress is not None:
                progress("predict", done, None)
        if not all_image_scores:
            raise ValueError("predict() got no images")
        return Prediction(
            image_scores=np.concatenate(all_image_scores),
            anomaly_maps=_concat_maps(all_maps) if return_maps else None,
            patch_scores=_concat_maps(all_patch_scores),
            timings={k: round(v, 4) for k, v in timings.items()},
        )

    def _score_rows(self, index: MemoryBankIndex, rows: np.ndarray, n_images: int) -> tuple[np.ndarray, np.ndarray]:
        """Patch scores (n_images, patches) and image scores (n_images,) of ``n_images`` images' patch rows."""
        squared, nearest = index.search(rows, max(self.num_neighbors, 1))
        scores = patch_scores(squared, self.distance).reshape(n_images, -1)
        if self.reweight:
            image = reweighted_image_scores(scores, rows, nearest[:, 0], index, self.reweight_neighbors)
        else:
            image = image_scores(scores)
        return scores, image

    def score(self, images: Any) -> np.ndarray:
        """Image scores only (no anomaly maps)."""
        return self.predict(images, return_maps=False).image_scores

    # ----------------------------------------------------------------- updates

    def partial_fit(
        self,
        images: Any,
        *,
        note: str | None = None,
        force: bool = False,
        progress: ProgressCallback | None = None,
        until: str | float | int = "radius",
        guard: float | None = DEFAULT_GUARD_FACTOR,
    ) -> UpdateRecord:
        """Teach the fitted model more defect-free images (paths, PIL images, tensors, a DataLoader, as
        ``fit``) without refitting; returns the update's record (also appended to ``history_``).

        The images' patches are extracted and scored against the bank; the bank then grows by continuing
        the fit's greedy coreset over them, in the space the fit's coreset measured in (its projection):
        each new patch starts at its distance to the bank, and the farthest is added until (``until``):

        - ``"radius"`` (default): every new patch lies within the covering radius recorded at fit;
        - a float in (0, 1]: that fraction of the new patches is added (farthest first);
        - an int >= 1: that many rows.

        Old images are never re-extracted; the search index grows in place. Every added row records the new
        version (``row_versions_``); ``version_`` becomes it. ``rollback`` and ``remove_update`` undo.

        The guard: an image scoring above ``guard`` x the highest good score of the calibration is likely
        a defect, and the update is refused (:class:`UpdateRefused`, nothing changed), as it is when the
        model has no calibration to judge by, unless ``force`` (the record then says forced). ``guard``
        None: no guard. The calibration is not changed here (see ``patchcore.deploy.calibration``: a bank
        that only grew can only lower the scores of good images).
        """
        with self._update_lock:
            return self._partial_fit(images, note, force, progress, until, guard)

    def _partial_fit(
        self,
        images: Any,
        note: str | None,
        force: bool,
        progress: ProgressCallback | None,
        until: str | float | int,
        guard: float | None,
    ) -> UpdateRecord:
        self._check_fitted()
        rule = UpdateRule.parse(until)
        if guard is not None and (isinstance(guard, bool) or not float(guard) > 0 or not np.isfinite(guard)):
            raise ValueError(f"guard must be a positive factor or None, got {guard!r}")
        if note is not None and not isinstance(note, str):
            raise TypeError(f"note must be a string, got {type(note).__name__}")
        space = self.coreset_space_
        if rule.kind == "radius" and space is None:
            raise UpdateError(
                "this model recorded no covering radius at fit (an older model file, a sharded or federated "
                f"fit, or sampler {self.sampler!r}): pass until=FRACTION or until=COUNT"
            )
        t0 = time.perf_counter()
        refs = image_refs(images)  # paths / PIL images: hashed before anything runs (a missing file fails here)
        features = self._patch_features()
        index = self._search_index()
        device = self.torch_device
        parts: list[np.ndarray] = []
        scores: list[np.ndarray] = []
        tensor_refs: list[ImageRef] = []
        n_images = 0
        for batch in self._batches(images):
            if tuple(batch.shape[-2:]) != tuple(self.input_size_):
                raise ValueError(
                    f"update images must have the model's input size {tuple(self.input_size_)}, "
                    f"got {tuple(batch.shape[-2:])}"
                )
            batch_rows, _ = features(batch.to(device, non_blocking=True))
            rows = batch_rows.cpu().numpy()
            _check_finite(rows, len(batch), n_images, "patch features")
            with self._bank_lock.read():
                _, image = self._score_rows(index, rows, len(batch))
            parts.append(rows)
            scores.append(image)
            if refs is None:
                tensor_refs.extend(tensor_ref(item.numpy()) for item in batch)
            n_images += len(batch)
            if progress is not None:
                progress("extract", n_images, None)
        if n_images == 0:
            raise ValueError("partial_fit() got no images")
        image_score = np.concatenate(scores)
        limit = self._guard(image_score, refs, guard, force)
        new = np.concatenate(parts)

        # The coreset's continuation, in the fit's space.
        weight = None if space is None else space.projection
        z = project(new, weight)
        min_distances = bank_distances(z, self._space_rows())
        before = float(min_distances.max())
        target = space.radius if rule.kind == "radius" and space is not None else None
        picks = continue_coreset(z, min_distances, target, rule.limit(len(new)))
        after = float(min_distances.max())
        version = (self.history_[-1].version if self.history_ else 0) + 1
        with self._bank_lock.write():
            self._append_rows(new[picks], z[torch.as_tensor(picks, dtype=torch.long)], version)
        record = UpdateRecord(
            version=version,
            time=utc_now(),
            n_images=n_images,
            images=tuple(refs if refs is not None else tensor_refs),
            rows_added=len(picks),
            radius_before=before,
            radius_after=after,
            target_radius=target,
            rule=str(rule),
            max_score=float(image_score.max()),
            guard_limit=limit,
            forced=bool(force),
            note=note or "",
            seconds=round(time.perf_counter() - t0, 4),
        )
        self.history_ = (*self.history_, record)
        self.version_ = version
        return record

    def _guard(
        self, scores: np.ndarray, refs: list[ImageRef] | None, guard: float | None, force: bool
    ) -> float | None:
        """The guard's limit (None: no guard); raises UpdateRefused unless forced."""
        if guard is None:
            return None
        calibration = self.calibration_
        top = int(np.argmax(scores))
        if calibration is None:
            if force:
                return None
            raise UpdateRefused(
                "the model has no calibration, so nothing says whether these images are good: calibrate it "
                "first (the guard compares update images with the highest good score), or force the update",
                float(scores[top]), None,
            )  # fmt: skip
        limit = float(guard) * calibration.good_score_max
        over = np.flatnonzero(scores > limit)
        if over.size and not force:
            names = [refs[i].path or f"#{i}" for i in over] if refs is not None else [f"#{i}" for i in over]
            shown = ", ".join(f"{n} ({scores[i]:.4g})" for n, i in zip(names[:5], over[:5], strict=False))
            more = f" and {over.size - 5} more" if over.size > 5 else ""
            raise UpdateRefused(
                f"update refused: {over.size} image(s) score above the guard's limit {limit:.4g} ({guard:g} x "
                f"the highest calibration score {calibration.good_score_max:.4g}), so they may be defects: "
                f"{shown}{more}. Force the update if they are good.",
                float(scores[over].max()), limit, over.tolist(), names,
            )  # fmt: skip
        return limit

    def rollback(self, version: int) -> PatchCore:
        """Back to ``version`` (0: as fitted): the rows added after it leave the bank and their updates the
        history; scores are then those of that version, bit for bit (an update removed before is not
        restored). Returns self."""
        self._check_fitted()
        with self._update_lock, self._bank_lock.write():
            version = self._known_version(version, allow_fit=True)
            keep = int(np.searchsorted(self.row_versions_, version, side="right"))
            dropped = self.row_versions_[keep:]
            self._invalidate_calibration(dropped, f"the model was rolled back to version {version}")
            self._truncate_rows(keep)
            self.history_ = tuple(r for r in self.history_ if r.version <= version)
            self.version_ = version
        return self

    def remove_update(self, version: int) -> PatchCore:
        """Take one update's rows out of the bank (a defect taught as good, say), keeping the later
        updates; its record stays in the history, marked removed. Returns self."""
        self._check_fitted()
        with self._update_lock, self._bank_lock.write():
            version = self._known_version(version, allow_fit=False)
            position = next(i for i, r in enumerate(self.history_) if r.version == version)
            record = self.history_[position]
            if record.removed:
                raise UpdateError(f"update {version} was already removed ({record.removed})")
            start = int(np.searchsorted(self.row_versions_, version, side="left"))
            stop = int(np.searchsorted(self.row_versions_, version, side="right"))
            self._invalidate_calibration(self.row_versions_[start:stop], f"update {version} was removed")
            tail = self.memory_bank_[stop:].copy()
            tail_versions = self.row_versions_[stop:].copy()
            tail_projected = None if self._space_bank is None else self._space_bank[stop:].clone()
            self._truncate_rows(start)
            if len(tail):
                self._append_rows(tail, tail_projected, tail_versions)
            history = list(self.history_)
            history[position] = replace(record, removed=utc_now())
            self.history_ = tuple(history)
        return self

    def _known_version(self, version: int, allow_fit: bool) -> int:
        if isinstance(version, bool) or not isinstance(version, (int, np.integer)):
            raise TypeError(f"a version is an integer, got {version!r}")
        known = [r.version for r in self.history_]
        if int(version) in known or (allow_fit and version == 0):
            return int(version)
        listed = ", ".join(str(v) for v in ([0] if allow_fit else []) + known) or "none"
        raise UpdateError(f"this model has no version {version} (its versions: {listed})")

    def _invalidate_calibration(self, dropped_versions: np.ndarray, why: str) -> None:
        """Rows the calibration was computed with are leaving the bank: good images may now score higher
        than it measured, so its false-alarm bound no longer holds. Say so in the record."""
        calibration = self.calibration_
        if calibration is None or not len(dropped_versions):
            return
        if int(np.min(dropped_versions)) <= calibration.model_version:
            self.calibration_ = replace(
                calibration,
                invalidated=f"{why} after this calibration (version {calibration.model_version}), taking out "
                "bank rows it was computed with: good images may now score above the threshold more often "
                "than it says; calibrate again",
            )

    def _space_rows(self) -> torch.Tensor:
        """The bank in the coreset's space (projected once, then kept in step with the bank)."""
        with self._build_lock:
            if self._space_bank is None or len(self._space_bank) != len(self.memory_bank_):
                space = self.coreset_space_
                self._space_bank = project(self.memory_bank_, None if space is None else space.projection)
            return self._space_bank

    def _append_rows(self, rows: np.ndarray, projected: torch.Tensor | None, versions: int | np.ndarray) -> None:
        """Add rows at the end of the bank (their versions: one for all, or one each), the index and the
        projected bank in place."""
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        if not len(rows):
            return
        with self._build_lock:
            row_versions = np.broadcast_to(np.asarray(versions, dtype=np.int64), (len(rows),))
            self.row_versions_ = np.concatenate([self.row_versions_, row_versions])
            index = self._index
            if index is not None:
                index.add(rows)  # in place: no kind rebuilds the rows it holds
                # The index's rows are the bank, in order (one copy, grown in amortised O(rows added)).
                self.memory_bank_ = _bank_of(index, len(self.row_versions_))
            else:
                self.memory_bank_ = np.concatenate([self.memory_bank_, rows])
            if self._space_bank is not None:
                if projected is None:
                    self._space_bank = None  # projected again on next use
                else:
                    self._space_bank = torch.cat([self._space_bank, projected])

    def _truncate_rows(self, n_rows: int) -> None:
        """Keep the first ``n_rows`` bank rows (in the bank, the index and the projected bank)."""
        if n_rows == len(self.memory_bank_):
            return
        with self._build_lock:
            self.row_versions_ = self.row_versions_[:n_rows].copy()
            index = self._index
            if index is not None:
                index.truncate(n_rows)  # searches then answer as they did with those rows
                self.memory_bank_ = _bank_of(index, n_rows)
            else:
                self.memory_bank_ = self.memory_bank_[:n_rows].copy()
            if self._space_bank is not None:
                self._space_bank = self._space_bank[:n_rows].clone()

    # ----------------------------------------------------------------- persistence

    def state_dict(self) -> dict[str, Any]:
        """Everything a model file holds: plain types and one float32 tensor (weights_only-loadable)."""
        self._check_fitted()
        return model_state(self)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the model file atomically (a reader never sees half a file)."""
        path = Path(path)
        buffer = io.BytesIO()
        torch.save(self.state_dict(), buffer)
        atomic_write(path, lambda handle: handle.write(buffer.getbuffer()))
        return path

    @classmethod
    def load(
        cls, path: str | os.PathLike, device: str = "auto", weights: str | os.PathLike | None = None
    ) -> PatchCore:
        """Rebuild a fitted model from a file written by ``save`` (backbone weights resolved again:
        ``weights`` overrides where they come from)."""
        return cls.from_state_dict(read_state(path), device=device, weights=weights, source=str(path))

    @classmethod
    def from_state_dict(
        cls,
        state: dict[str, Any],
        device: str = "auto",
        weights: str | os.PathLike | None = None,
        source: str = "<state>",
    ) -> PatchCore:
        """A fitted model from a model file's dict, after the checks of ``persistence.check_state``."""
        check_state(state, source)
        try:
            params = dict(state["params"])
            params["device"] = device
            if weights is not None:
                params["weights"] = str(weights)
            model = cls(**params)
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise ModelFileError(f"{source} is missing or has malformed model fields: {exc}") from exc
        restore_fitted(model, state, source)
        return model


PatchCore.__doc__ = (PatchCore.__doc__ or "") + "\n    Parameters\n    ----------\n" + "\n".join(
    "    " + line for line in params_table().splitlines()
)


# --------------------------------------------------------------------- helpers


class _ReadWriteLock:
    """Many readers (searches of the bank) at once, or one writer (a change of the bank); a waiting writer
    holds off new readers, so an update is not starved by a steady stream of predictions."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._readers = 0
        self._writing = False
        self._writers_waiting = 0

    @contextlib.contextmanager
    def read(self) -> Iterator[None]:
        with self._condition:
            while self._writing or self._writers_waiting:
                self._condition.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._condition:
                self._readers -= 1
                if not self._readers:
                    self._condition.notify_all()

    @contextlib.contextmanager
    def write(self) -> Iterator[None]:
        with self._condition:
            self._writers_waiting += 1
            while self._writing or self._readers:
                self._condition.wait()
            self._writers_waiting -= 1
            self._writing = True
        try:
            yield
        finally:
            with self._condition:
                self._writing = False
                self._condition.notify_all()


def _bank_of(index: MemoryBankIndex, n_rows: int) -> np.ndarray:
    """The index's rows as the model's bank (a view: the index owns them and grows them in place)."""
    bank = index.bank
    if not isinstance(bank, np.ndarray) or bank.shape[0] != n_rows:  # pragma: no cover - a kind's contract
        raise RuntimeError(f"the search index holds {getattr(bank, 'shape', None)} rows, expected {n_rows}")
    return bank


def _flush(pending: list[torch.Tensor]) -> Iterator[torch.Tensor]:
    if pending:
        shapes = {tuple(t.shape) for t in pending}
        if len(shapes) > 1:
            raise ValueError(f"images of different sizes in one batch: {sorted(shapes)}; resize them first")
        batch = torch.stack(pending)
        pending.clear()
        yield batch


def _concat_maps(parts: list[np.ndarray]) -> np.ndarray:
    shapes = {p.shape[1:] for p in parts}
    if len(shapes) == 1:
        return np.concatenate(parts)
    # Images of different sizes: keep a list-like object array rather than failing.
    out = np.empty(sum(len(p) for p in parts), dtype=object)
    i = 0
    for part in parts:
        for item in part:
            out[i] = item
            i += 1
    return out


def _is_pil(item: Any) -> bool:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover
        return False
    return isinstance(item, Image.Image)


def _rgb(values: list[float]) -> tuple[float, float, float]:
    red, green, blue = values  # three values: the parameters' declarations check it
    return red, green, blue


def _tuple_or_scalar(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value)
    return value
