"""Run configuration: YAML in, validated dataclasses out.

Every key is declared once, in a dataclass below, with its type, default, constraint and help (the
``model`` section comes from the estimator's declarations, engine/params.py); an unknown key, a key written
twice, or a value of the wrong type or out of range is an error that names the key and the file.
``KEY=VALUE`` overrides (dotted keys, YAML values) apply on top of the file, with the same checks.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..data import DATASETS, dataset_kind
from ..engine.params import (
    Constraint,
    ParamError,
    at_least,
    check_value,
    choice,
    describe_type,
    in_range,
    param,
)

__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "EvaluationConfig",
    "ExecutionConfig",
    "FederatedConfig",
    "LoggingConfig",
    "ModelConfig",
    "apply_overrides",
    "config_to_dict",
    "load_config",
]


class ConfigError(ValueError):
    """A configuration file or override that cannot be used; the message names the key and the source."""


def key(default: Any, help: str, constraint: Constraint | None = None) -> Any:
    """One configuration key: default, help text and constraint, declared together (type: the annotation).

    Adding a key to a section is one line with this; loading, checking, ``patchcore params`` and the
    saved config.yaml follow from it.
    """
    metadata = {"help": help, "constraint": constraint}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def _kinds_taking(option: str) -> str:
    """Which data-set kinds' loaders take ``option`` (their declaration, data/__init__.py)."""
    kinds = [name for name in DATASETS if option in dataset_kind(name).options]
    return f"(data kinds that take it: {', '.join(kinds) or 'none'})"


@dataclass
class DataConfig:
    kind: str = key("elpv", "data set format", choice(*DATASETS))
    root: str | None = key(
        None,
        "data set folder (null: the kind's bundled data, for kinds that have one: "
        + ", ".join(k for k in DATASETS if not dataset_kind(k).needs_root)
        + ")",
    )
    objects: list[str] | None = key(None, "objects to run; null = every object found")
    num_workers: int = key(2, "DataLoader worker processes for image decoding", at_least(0))
    train_fraction: float = key(
        2 / 3, f"fraction of good images used for training {_kinds_taking('train_fraction')}", in_range(0, 1, low_open=True, high_open=True)
    )
    include_uncertain: bool = key(
        False, f"include the uncertain (p=1/3, 2/3) cells {_kinds_taking('include_uncertain')}"
    )


def _model_key(name: str) -> Any:
    """A ``model`` section key declared by the estimator parameter ``name`` (engine/params.py): its
    default (a fresh copy for each configuration), help and constraint."""
    p = param(name)
    if not p.in_config:
        raise ValueError(f"PatchCore parameter {name!r} is not a configuration key")
    return field(
        default_factory=functools.partial(copy.deepcopy, p.default),
        metadata={"help": p.help, "constraint": p.constraint},
    )


@dataclass
class ModelConfig:
    """The ``model`` section: every estimator parameter declared with ``in_config`` (engine/params.py,
    which gives each its default, help and constraint; names and types are written here for the type
    checker, and tests/test_config.py keeps them equal), plus the application's feature cache folder."""

    backbone: str = _model_key("backbone")
    layers: list[str] | None = _model_key("layers")
    weights: str | None = _model_key("weights")
    resize: int | list[int] | None = _model_key("resize")
    imagesize: int | list[int] | None = _model_key("imagesize")
    mean: list[float] = _model_key("mean")
    std: list[float] = _model_key("std")
    patchsize: int = _model_key("patchsize")
    patchstride: int = _model_key("patchstride")
    pretrain_embed_dimension: int | None = _model_key("pretrain_embed_dimension")
    target_embed_dimension: int | None = _model_key("target_embed_dimension")
    sampler: str = _model_key("sampler")
    percentage: float = _model_key("percentage")
    projection_dim: int | None = _model_key("projection_dim")
    num_starting_points: int = _model_key("num_starting_points")
    audit: bool = _model_key("audit")
    audit_method: str = _model_key("audit_method")
    denoise: bool = _model_key("denoise")
    num_neighbors: int = _model_key("num_neighbors")
    distance: str = _model_key("distance")
    reweight: bool = _model_key("reweight")
    reweight_neighbors: int = _model_key("reweight_neighbors")
    smoothing_sigma: float = _model_key("smoothing_sigma")
    device: str = _model_key("device")
    precision: str = _model_key("precision")
    batch_size: int = _model_key("batch_size")
    extract_chunk: int | None = _model_key("extract_chunk")
    index_kind: str = _model_key("index_kind")
    nprobe: int = _model_key("nprobe")
    ef_search: int = _model_key("ef_search")
    search_threads: int | None = _model_key("search_threads")
    feature_cache: str | None = key(None, "folder: reuse training features when data and feature settings match")


@dataclass
class EvaluationConfig:
    enabled: bool = key(True, "evaluate each object on its test split after fitting")
    pro_fpr_limit: float = key(0.3, "FPR integration limit of AU-PRO", in_range(0, 1, low_open=True))
    spro_fpr_limits: list[float] = key(
        [0.01, 0.05, 0.1, 0.3, 1.0], "FPR limits of AU-sPRO (AutoVI, MVTec LOCO)",
        Constraint("a non-empty list of numbers in (0, 1]", lambda v: bool(v) and all(0 < x <= 1 for x in v)),
    )  # fmt: skip
    save_autovi_maps: bool = key(
        False, "native-size anomaly maps for the official AutoVI (PNG) / LOCO (TIFF) evaluation scripts"
    )
    heatmaps: int = key(8, "PNG heatmap overlays written per object (most anomalous first); 0 = none", at_least(0))
    # Decision threshold from good images: hold out this share of train/good (a data set's validation good
    # images instead, when it has them) and set the threshold at this false-alarm rate. 0 = no calibration.
    calibration_fraction: float = key(
        0.0, "share of train/good held out to calibrate the decision threshold (0 = none)", in_range(0, 1, high_open=True)
    )
    false_alarm_rate: float = key(
        0.01, "false-alarm rate on good parts at the calibrated threshold", in_range(0, 1, low_open=True, high_open=True)
    )


@dataclass
class LoggingConfig:
    level: str = key("INFO", "console and run.log level", choice("DEBUG", "INFO", "WARNING", "ERROR"))
    online: str | None = key(None, "send metrics online", choice("wandb", "mlflow"))
    progress: bool = key(True, "progress bars")


_NAME = Constraint("a non-empty name", lambda v: bool(v.strip()))


@dataclass
class ExecutionConfig:
    engine: str = key("local", "local: objects in turn here; ray: objects as Ray tasks (extra patchcore[ray])",
                      choice("local", "ray"))  # fmt: skip
    address: str | None = key(None, "ray: null = a local cluster, auto = the running one, or host:port")
    cpus_per_object: float = key(1.0, "CPUs of one object's (or shard's) Ray task", at_least(0))
    gpus_per_object: float = key(0.0, "GPUs of one object's (or shard's) Ray task", at_least(0))
    retries: int = key(1, "more tries for an object (or shard) whose task failed", at_least(0))
    shards: int = key(1, "> 1: each object's images in N shards, local coresets merged by one greedy pass",
                      at_least(1))  # fmt: skip
    shard_oversampling: float = key(2.0, "a shard's local coreset: percentage x this of its patches", at_least(1))


@dataclass
class FederatedConfig:
    partition: str = key("iid", "iid (over `clients`), by_category (one client per object) or folders (`sites`)",
                         choice("iid", "by_category", "folders"))  # fmt: skip
    clients: int = key(3, "iid: clients per object", at_least(1))
    sites: list[str] = key([], "folders: one folder of good images per site")
    local_percentage: float | None = key(None, "a client's coreset, fraction of its patches; null = 2 x percentage",
                                         in_range(0, 1, low_open=True))  # fmt: skip
    bank_size: int | None = key(None, "global bank size; null = model.percentage of all clients' patches", at_least(1))
    weighted: bool = key(False, "weight each shared vector by its client's share of the patches")
    compare_centralised: bool = key(True, "also fit the same images centrally and report both")
    noise_epsilon: float | None = key(None, "Gaussian noise on shared vectors: epsilon (< 1); null = none",
                                      in_range(0, 1, low_open=True, high_open=True))  # fmt: skip
    noise_delta: float = key(1e-5, "Gaussian noise: delta", in_range(0, 1, low_open=True, high_open=True))
    noise_clip: float = key(50.0, "Gaussian noise: L2 norm shared vectors are clipped to",
                            Constraint("> 0", lambda v: v > 0))  # fmt: skip


@dataclass
class Config:
    project: str = key("patchcore", "run folders go to <output_dir>/<project>/<group>", _NAME)
    group: str = key("default", "run folder name (a free <group>_N when taken)", _NAME)
    seed: int = key(0, "every random choice of a fit", at_least(0))
    output_dir: str = key("results", "where run folders are created", _NAME)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    execution: ExecutionConfig = field(default_factory=ExecutionConfig)
    federated: FederatedConfig = field(default_factory=FederatedConfig)
    source: str = field(default="<defaults>", metadata={"internal": True})


def _sections(cls: type = Config, prefix: str = "") -> Iterator[tuple[str, dataclasses.Field, Any]]:
    """(dotted key, field, type) of every declared key, depth first."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal"):
            continue
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _sections(hints[f.name], name + ".")
        else:
            yield name, f, hints[f.name]


def keys_table() -> str:
    """Every configuration key with its type, default, constraint and help (``patchcore params``)."""
    lines = []
    for name, f, annotation in _sections():
        # Every key has a default or a default factory (key() and _model_key() give one or the other).
        default = f.default_factory() if callable(f.default_factory) else f.default
        rule = f"; {f.metadata['constraint']}" if f.metadata.get("constraint") else ""
        lines.append(f"{name:<36} {describe_type(annotation)}{rule}; default {default!r}\n    {f.metadata.get('help', '')}")
    return "\n".join(lines)


def _build(cls: type, data: Any, prefix: str, source: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: '{prefix or 'the top level'}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"{source}: unknown key(s) {', '.join(where + str(k) for k in unknown)}; "
            f"known keys{' under ' + prefix if prefix else ''}: {', '.join(fields)}"
        )
    values = {}
    for name, value in data.items():
        key_name = f"{prefix}.{name}" if prefix else name
        annotation = hints[name]
        if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
            values[name] = _build(annotation, value, key_name, source)
        else:
            try:
                values[name] = check_value(value, annotation, fields[name].metadata.get("constraint"), key_name)
            except ParamError as exc:
                raise ConfigError(f"{source}: key {exc}") from None
    return cls(**values)


def _validate_values(config: Config) -> None:
    """What involves more than one key (each key's own type and range are checked as it is read)."""
    if dataset_kind(config.data.kind).needs_root and not config.data.root:
        raise ConfigError(
            f"{config.source}: data.kind {config.data.kind!r} needs 'data.root' (the data set folder)"
        )


def config_from_dict(data: dict[str, Any], source: str = "<dict>") -> Config:
    config = _build(Config, data, "", source)
    config.source = source
    _validate_values(config)
    return config


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read, override and validate a YAML configuration (None: the defaults)."""
    data: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"configuration file {path} does not exist")
        try:
            loaded = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
        except _DuplicateKey as exc:
            raise ConfigError(f"{path}: {exc}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys")
        data = loaded or {}
    data = apply_overrides(data, overrides)
    label = source if not overrides else f"{source} (with overrides {' '.join(overrides)})"
    return config_from_dict(data, label)


class _DuplicateKey(Exception):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key written twice in one mapping (YAML would keep only the last copy)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            name = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if name in seen:
                raise _DuplicateKey(
                    f"key '{name}' is written twice (lines {seen[name]} and {line}); "
                    "YAML would silently keep only the last one"
                )
            seen[name] = line
        return super().construct_mapping(node, deep=deep)


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Apply ``a.b=value`` overrides (value parsed as YAML) to a nested dict, returning a new dict."""
    import copy

    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. model.percentage=0.01)")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r} has an empty key part")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: cannot parse the value: {exc}") from exc
        if isinstance(value, (bool, int, float)) and _is_string_key(parts):
            # YAML reads group=2024 or project=1.10 as numbers; for a string key the text is what was meant.
            value = raw.strip()
        node = data
        for part in parts[:-1]:
            if node.get(part) is None:  # absent, or a section left empty in the file (`model:`)
                node[part] = {}
            child = node[part]
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: '{part}' is not a section")
            node = child
        node[parts[-1]] = value
    return data


def _is_string_key(parts: list[str]) -> bool:
    """Whether the dotted key names a field typed ``str`` or ``str | None``."""
    cls: Any = Config
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(cls):
            return False
        hints = typing.get_type_hints(cls)
        if part not in hints:
            return False
        annotation = hints[part]
        if i < len(parts) - 1:
            cls = annotation
            continue
        return annotation is str or set(typing.get_args(annotation)) == {str, type(None)}
    return False


def config_to_dict(config: Config) -> dict[str, Any]:
    data = dataclasses.asdict(config)
    data.pop("source", None)
    return data
