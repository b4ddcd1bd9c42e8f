"""The one declaration of every PatchCore parameter: name, type, default, constraint, help.

``PatchCore.__init__`` / ``get_params`` / ``set_params`` and its validation, the configuration's ``model``
section (``patchcore.app.config``), the CLI's ``patchcore params`` listing and the model file's ``params``
all read :data:`PARAMS`. Adding a parameter is one :class:`Param` line here, its use in the code, and its
name, type and default written where the type checker reads them: ``PatchCore.__init__``'s keyword-only
signature and the class's attribute annotations, and (``in_config``) ``ModelConfig``'s fields;
tests/test_engine.py and tests/test_config.py fail until all agree with this declaration.

The type checker and the constraints are also what the configuration uses for its other sections.
"""

from __future__ import annotations

import numbers
import os
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .search import SEARCH_KINDS

__all__ = [
    "PARAMS",
    "Constraint",
    "Param",
    "ParamError",
    "at_least",
    "check_param",
    "check_type",
    "check_value",
    "choice",
    "describe_type",
    "in_range",
    "length",
    "param",
    "params_table",
]


class ParamError(ValueError):
    """A value that does not fit its declaration; ``key`` names the parameter (or config key)."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


@dataclass(frozen=True)
class Constraint:
    """A predicate on a (type-checked, non-null) value, with the words that describe it."""

    text: str
    test: Callable[[Any], bool]

    def __call__(self, value: Any) -> bool:
        return bool(self.test(value))

    def __str__(self) -> str:
        return self.text


def choice(*options: Any) -> Constraint:
    return Constraint("one of " + ", ".join(str(o) for o in options), lambda v: v in options)


def at_least(low: float) -> Constraint:
    return Constraint(f">= {low:g}", lambda v: v >= low)


def in_range(low: float, high: float, low_open: bool = False, high_open: bool = False) -> Constraint:
    text = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def test(v: float) -> bool:
        return (v > low if low_open else v >= low) and (v < high if high_open else v <= high)

    return Constraint(text, test)


def length(n: int, item: Constraint | None = None) -> Constraint:
    text = f"{n} values" + (f", each {item}" if item else "")
    return Constraint(text, lambda v: len(v) == n and (item is None or all(item(x) for x in v)))


def _positive_size(v: Any) -> bool:
    if isinstance(v, (list, tuple)):
        return len(v) == 2 and all(x >= 1 for x in v)
    return v >= 1


POSITIVE_SIZE = Constraint("an integer >= 1 or a [height, width] pair of them", _positive_size)
ODD_POSITIVE = Constraint("an odd integer >= 1", lambda v: v >= 1 and v % 2 == 1)
NON_EMPTY = Constraint("a non-empty list", lambda v: len(v) >= 1)
_DEVICE = re.compile(r"^(auto|cpu|cuda|cuda:\d+|mps)$")
DEVICE = Constraint("auto, cpu, cuda, cuda:N or mps", lambda v: bool(_DEVICE.match(v)))


def _backbone_name(v: str) -> bool:
    from .backbones import available_backbones

    return v in available_backbones() or (v.startswith("timm:") and len(v) > len("timm:"))


BACKBONE = Constraint("a registered backbone (patchcore backbones) or timm:<model>", _backbone_name)


@dataclass(frozen=True)
class Param:
    """One estimator parameter.

    ``frozen_after_fit``: the parameter shaped the memory bank (its features or its selection); changing
    it on a fitted model is an error. ``in_config``: it is a key of the configuration's ``model`` section
    (``seed`` is the top-level key, ``work_dir`` is chosen by the application).
    """

    name: str
    type: Any
    default: Any
    help: str
    constraint: Constraint | None = None
    frozen_after_fit: bool = False
    in_config: bool = True


_SIZE = int | list[int] | None

PARAMS: tuple[Param, ...] = (
    Param("backbone", str, "wideresnet50", "feature network: registry name or timm:<model>", BACKBONE, True),
    Param("layers", list[str] | None, None, "layers to hook; null = the backbone's defaults", NON_EMPTY, True),
    Param("weights", str | None, None, "null = pretrained ImageNet, a state-dict path, or 'random' (seeded)",
          None, True),
    Param("resize", _SIZE, 256, "shorter side (or [h, w]) before the crop", POSITIVE_SIZE, True),
    Param("imagesize", _SIZE, 224, "centre crop size (or [h, w]); null = no crop", POSITIVE_SIZE, True),
    Param("mean", list[float], [0.485, 0.456, 0.406], "per-channel normalisation mean (RGB)", length(3), True),
    Param("std", list[float], [0.229, 0.224, 0.225], "per-channel normalisation std (RGB)",
          length(3, Constraint("> 0", lambda x: x > 0)), True),
    Param("patchsize", int, 3, "neighbourhood aggregated into each patch feature", ODD_POSITIVE, True),
    Param("patchstride", int, 1, "stride of the patch neighbourhoods", at_least(1), True),
    Param("pretrain_embed_dimension", int | None, 1024, "per-layer adaptive pooling size", at_least(1), True),
    Param("target_embed_dimension", int | None, 1024, "patch feature size; null = plain concatenation",
          at_least(1), True),
    Param("sampler", str, "approx_greedy_coreset", "memory bank subsampling",
          choice("approx_greedy_coreset", "greedy_coreset", "random", "identity"), True),
    Param("percentage", float, 0.1, "memory bank size as a fraction of all training patches",
          in_range(0, 1, low_open=True), True),
    Param("projection_dim", int | None, 128, "coreset random projection size; null = none", at_least(1), True),
    Param("num_starting_points", int, 10, "approximate coreset start points", at_least(1), True),
    Param("audit", bool, False, "rank the training images by a leave-one-image-out score during fit and warn "
          "about outliers (engine/audit.py); reads only: the bank is the same with it off. Opt-in: on ELPV mono "
          "at 224 px it took 62.6 s beside a 47.6 s fit (NOTES.md issue 21)", None),
    Param("audit_method", str, "coreset", "coreset: distances to the coreset rows of the other images "
          "(within a measured bound of the exact score, no exact search); exact: the exact leave-one-image-out "
          "score, pruned by those distances (engine/audit.py)", choice("coreset", "exact")),
    Param("denoise", bool, False, "robust fit: leave outlier training patches (and images that are mostly "
          "outliers) out of the coreset (engine/audit.py)", None, True),
    Param("num_neighbors", int, 1, "k: a patch score is the mean distance to its k nearest bank vectors",
          at_least(1)),
    Param("distance", str, "euclidean", "euclidean (the paper) or squared_l2 (the reference code's report)",
          choice("euclidean", "squared_l2")),
    Param("reweight", bool, False, "the paper's image-score re-weighting (Eq. 7)"),
    Param("reweight_neighbors", int, 3, "b, the neighbours of the re-weighting", at_least(1)),
    Param("smoothing_sigma", float, 4.0, "gaussian sigma of the anomaly maps; 0 = none", at_least(0)),
    Param("device", str, "auto", "where the backbone runs", DEVICE),
    Param("precision", str, "fp32", "backbone autocast (patch features and the bank stay float32)",
          choice("fp32", "fp16", "bf16")),
    Param("batch_size", int, 32, "images per backbone pass", at_least(1)),
    Param("extract_chunk", int | None, None, "on the CPU, images per backbone call within a batch (small "
          "chunks keep activations in the caches: 2x on ELPV here); null = the whole batch", at_least(1)),
    Param("seed", int, 0, "every random choice of a fit (and random weights)", at_least(0), True, False),
    Param("work_dir", str | None, None, "folder for the streamed training features; null = system temp",
          None, False, False),
    Param("index_kind", str, "flat", "nearest-neighbour search: " + ", ".join(
          f"{name} ({'exact' if kind.exact else 'approximate'})" for name, kind in SEARCH_KINDS.items()),
          choice(*SEARCH_KINDS)),
    Param("nprobe", int, 8, "IVF lists searched", at_least(1)),
    Param("ef_search", int, 64, "HNSW search breadth", at_least(1)),
    Param("search_threads", int | None, None, "FAISS threads; null = its default", at_least(1)),
)  # fmt: skip

_BY_NAME = {p.name: p for p in PARAMS}


def param(name: str) -> Param:
    return _BY_NAME[name]


def check_type(value: Any, annotation: Any, key: str) -> Any:
    """``value`` converted to ``annotation`` where that is lossless (int -> float, tuple -> list, path ->
    str, numpy scalars), else ParamError naming ``key``."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return check_type(value, option, key)
            except ParamError:
                continue
        raise ParamError(key, f"'{key}' must be {describe_type(annotation)}, got {value!r}")
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ParamError(key, f"'{key}' must be a list, got {value!r}")
        return [check_type(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
    if annotation is bool:
        if not isinstance(value, bool) and type(value).__name__ != "bool_":
            raise ParamError(key, f"'{key}' must be true or false, got {value!r}")
        return bool(value)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ParamError(key, f"'{key}' must be an integer, got {value!r}")
        return int(value)
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ParamError(key, f"'{key}' must be a number, got {value!r}")
        return float(value)
    if annotation is str:
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        if not isinstance(value, str):
            raise ParamError(key, f"'{key}' must be a string, got {value!r}")
        return value
    raise ParamError(key, f"'{key}' has an unsupported type {annotation}")  # pragma: no cover


def describe_type(annotation: Any) -> str:
    names = []
    for option in typing.get_args(annotation) if typing.get_origin(annotation) in (
        typing.Union, types.UnionType
    ) else (annotation,):  # fmt: skip
        if option is type(None):
            names.append("null")
        elif typing.get_origin(option) is list:
            names.append(f"a list of {describe_type(typing.get_args(option)[0])}")
        else:
            names.append({"int": "an integer", "float": "a number", "str": "a string", "bool": "true/false"}.get(
                getattr(option, "__name__", ""), str(option)
            ))
    return " or ".join(names)


def check_value(value: Any, annotation: Any, constraint: Constraint | None, key: str) -> Any:
    """Type-check and constrain one value (null skips the constraint); returns the converted value."""
    converted = check_type(value, annotation, key)
    if converted is not None and constraint is not None and not constraint(converted):
        raise ParamError(key, f"'{key}' must be {constraint}, got {value!r}")
    return converted


def check_param(name: str, value: Any) -> Any:
    """Check one PatchCore parameter against its declaration; returns the converted value."""
    if name not in _BY_NAME:
        raise ParamError(name, f"unknown PatchCore parameter {name!r}; known: {', '.join(_BY_NAME)}")
    p = _BY_NAME[name]
    try:
        return check_value(value, p.type, p.constraint, name)
    except ParamError as exc:
        raise ParamError(name, f"PatchCore parameter {exc}") from None


def params_table() -> str:
    """Every parameter with its type, default, constraint and help (``patchcore params``)."""
    lines = []
    for p in PARAMS:
        where = "model." + p.name if p.in_config else f"{p.name} (API only)" if p.name != "seed" else "seed"
        rule = f"; {p.constraint}" if p.constraint else ""
        frozen = "; fixed once fitted" if p.frozen_after_fit else ""
        lines.append(f"{where:<32} {describe_type(p.type)}{rule}; default {p.default!r}{frozen}\n    {p.help}")
    return "\n".join(lines)
