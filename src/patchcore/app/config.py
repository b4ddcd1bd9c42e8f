"""Run configuration: YAML in, validated dataclasses out.

Every key is declared in a dataclass below, with its type and default; an unknown key or a value of the
wrong type is an error that names the key and the file. ``KEY=VALUE`` overrides (dotted keys, YAML
values) apply on top of the file, with the same checks.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

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


@dataclass
class DataConfig:
    kind: str = "elpv"  # mvtec | autovi | folder | elpv
    root: str | None = None  # data set folder (elpv: the pip package's data when null)
    objects: list[str] | None = None  # null = every object found
    num_workers: int = 2  # DataLoader worker processes for image decoding
    # ELPV only: fraction of good cells used for training; include the uncertain (p=1/3, 2/3) cells.
    train_fraction: float = 2 / 3
    include_uncertain: bool = False


@dataclass
class ModelConfig:
    backbone: str = "wideresnet50"
    layers: list[str] | None = None
    weights: str | None = None
    resize: int | list[int] | None = 256
    imagesize: int | list[int] | None = 224
    patchsize: int = 3
    patchstride: int = 1
    pretrain_embed_dimension: int | None = 1024
    target_embed_dimension: int | None = 1024
    sampler: str = "approx_greedy_coreset"
    percentage: float = 0.1
    projection_dim: int | None = 128
    num_starting_points: int = 10
    num_neighbors: int = 1
    distance: str = "euclidean"
    reweight: bool = False
    reweight_neighbors: int = 3
    smoothing_sigma: float = 4.0
    device: str = "auto"
    precision: str = "fp32"
    batch_size: int = 32
    feature_cache: str | None = None  # folder: reuse training features when data and feature settings match
    index_kind: str = "flat"  # flat | pruned (both exact) | ivf | hnsw (approximate)
    nprobe: int = 8
    ef_search: int = 64
    search_threads: int | None = None


@dataclass
class EvaluationConfig:
    enabled: bool = True
    pro_fpr_limit: float = 0.3
    spro_fpr_limits: list[float] = field(default_factory=lambda: [0.01, 0.05, 0.1, 0.3, 1.0])
    save_autovi_maps: bool = False  # anomaly maps in the official AutoVI evaluation format
    heatmaps: int = 8  # PNG heatmap overlays written per object (most anomalous first); 0 = none


@dataclass
class LoggingConfig:
    level: str = "INFO"
    online: str | None = None  # wandb | mlflow
    progress: bool = True


@dataclass
class ExecutionConfig:
    engine: str = "local"  # local | ray (objects as Ray tasks; extra patchcore[ray])
    address: str | None = None  # ray: null = a local cluster, auto = the running one, host:port
    cpus_per_object: float = 1.0
    gpus_per_object: float = 0.0
    retries: int = 1  # more tries for a failed object (or shard)
    shards: int = 1  # > 1: each object's images in N shards, local coresets merged by one greedy pass
    shard_oversampling: float = 2.0  # local coreset = percentage x this, per shard


@dataclass
class FederatedConfig:
    partition: str = "iid"  # iid (over `clients`) | by_category (one client per object) | folders
    clients: int = 3
    sites: list[str] = field(default_factory=list)  # folders: one folder of good images per site
    local_percentage: float | None = None  # client coreset fraction; null = model.percentage x 2
    bank_size: int | None = None  # global bank; null = model.percentage of all clients' patches
    weighted: bool = False  # weight each vector by its client's share of the patches
    compare_centralised: bool = True  # also fit the central model on the same images and report both
    noise_epsilon: float | None = None  # Gaussian noise on shared vectors: (epsilon, delta), clip norm
    noise_delta: float = 1e-5
    noise_clip: float = 50.0


@dataclass
class Config:
    project: str = "patchcore"
    group: str = "default"
    seed: int = 0
    output_dir: str = "results"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    execution: ExecutionConfig = field(default_factory=ExecutionConfig)
    federated: FederatedConfig = field(default_factory=FederatedConfig)
    source: str = field(default="<defaults>", metadata={"internal": True})


def _check_type(value: Any, annotation: Any, key: str, source: str) -> Any:
    """Return ``value`` converted to ``annotation`` where that is lossless, else raise ConfigError."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_type(value, option, key, source)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{source}: key '{key}' must be {_describe(annotation)}, got {value!r}")
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        if not isinstance(value, list):
            raise ConfigError(f"{source}: key '{key}' must be a list, got {value!r}")
        return [_check_type(v, item_type, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: key '{key}' must be true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: key '{key}' must be an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: key '{key}' must be a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: key '{key}' must be a string, got {value!r}")
        return value
    raise ConfigError(f"{source}: key '{key}' has an unsupported type {annotation}")  # pragma: no cover


def _describe(annotation: Any) -> str:
    names = []
    for option in typing.get_args(annotation) or (annotation,):
        if option is type(None):
            names.append("null")
        elif typing.get_origin(option) is list:
            names.append("a list")
        else:
            names.append(getattr(option, "__name__", str(option)))
    return " or ".join(names)


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
        key = f"{prefix}.{name}" if prefix else name
        annotation = hints[name]
        if dataclasses.is_dataclass(annotation):
            values[name] = _build(annotation, value, key, source)
        else:
            values[name] = _check_type(value, annotation, key, source)
    return cls(**values)


def _validate_values(config: Config) -> None:
    choices = {
        "data.kind": (config.data.kind, ("mvtec", "autovi", "folder", "elpv")),
        "model.sampler": (
            config.model.sampler,
            ("approx_greedy_coreset", "greedy_coreset", "random", "identity"),
        ),
        "model.distance": (config.model.distance, ("euclidean", "squared_l2")),
        "model.precision": (config.model.precision, ("fp32", "fp16", "bf16")),
        "model.index_kind": (config.model.index_kind, ("flat", "pruned", "ivf", "hnsw")),
        "logging.online": (config.logging.online, (None, "wandb", "mlflow")),
        "logging.level": (config.logging.level.upper(), ("DEBUG", "INFO", "WARNING", "ERROR")),
        "execution.engine": (config.execution.engine, ("local", "ray")),
        "federated.partition": (config.federated.partition, ("iid", "by_category", "folders")),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            shown = ", ".join("null" if a is None else str(a) for a in allowed)
            raise ConfigError(f"{config.source}: key '{key}' must be one of {shown}, got {value!r}")
    if not 0.0 < config.model.percentage <= 1.0:
        raise ConfigError(
            f"{config.source}: key 'model.percentage' must be in (0, 1], got {config.model.percentage}"
        )
    if config.model.batch_size < 1:
        raise ConfigError(f"{config.source}: key 'model.batch_size' must be >= 1")
    if config.model.num_neighbors < 1:
        raise ConfigError(f"{config.source}: key 'model.num_neighbors' must be >= 1")
    _validate_scale_out(config)
    if config.data.kind in ("mvtec", "autovi", "folder") and not config.data.root:
        raise ConfigError(
            f"{config.source}: data.kind {config.data.kind!r} needs 'data.root' (the data set folder)"
        )


def _validate_scale_out(config: Config) -> None:
    ex, fed, src = config.execution, config.federated, config.source
    checks = [
        (ex.cpus_per_object >= 0, "execution.cpus_per_object", ">= 0"),
        (ex.gpus_per_object >= 0, "execution.gpus_per_object", ">= 0"),
        (ex.retries >= 0, "execution.retries", ">= 0"),
        (ex.shards >= 1, "execution.shards", ">= 1"),
        (ex.shard_oversampling >= 1, "execution.shard_oversampling", ">= 1"),
        (fed.clients >= 1, "federated.clients", ">= 1"),
        (fed.local_percentage is None or 0 < fed.local_percentage <= 1, "federated.local_percentage", "in (0, 1]"),
        (fed.bank_size is None or fed.bank_size >= 1, "federated.bank_size", ">= 1"),
        (fed.noise_epsilon is None or 0 < fed.noise_epsilon < 1, "federated.noise_epsilon", "in (0, 1)"),
        (0 < fed.noise_delta < 1, "federated.noise_delta", "in (0, 1)"),
        (fed.noise_clip > 0, "federated.noise_clip", "> 0"),
    ]
    for ok, key, rule in checks:
        if not ok:
            raise ConfigError(f"{src}: key '{key}' must be {rule}")


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
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys")
        data = loaded or {}
    data = apply_overrides(data, overrides)
    label = source if not overrides else f"{source} (with overrides {' '.join(overrides)})"
    return config_from_dict(data, label)


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
