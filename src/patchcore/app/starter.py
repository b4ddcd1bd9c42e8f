"""The first hour: ``patchcore train parts/`` (a folder instead of a configuration) and ``patchcore init
[KIND]`` (a commented YAML configuration to start from), both built from the one declaration of every key
(app/config.py, engine/params.py), so they never drift from what ``load_config`` accepts.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..data import DATASETS
from ..fileio import atomic_write_text
from .config import Config, ConfigError

__all__ = [
    "FOLDER_CALIBRATION_FRACTION",
    "data_kinds_help",
    "folder_overrides",
    "starter_yaml",
    "write_starter",
]

# `patchcore train FOLDER` holds out this share of train/good to calibrate the decision threshold, so the
# model it saves can decide good / defective (a folder often has no test split to learn anything else from).
FOLDER_CALIBRATION_FRACTION = 0.2

# Sections a starter file leaves out (they belong to other commands); `patchcore params` lists them.
_LEFT_OUT = ("federated",)


def data_kinds_help() -> str:
    """Every data kind with the first line of its loader's description (the train / init --help epilog)."""
    lines = ["data kinds (data.kind; `patchcore init KIND` writes a starter configuration):"]
    for kind, loader in DATASETS.items():
        doc = (loader.__doc__ or "").strip().splitlines()
        lines.append(f"  {kind:<11} {doc[0] if doc else ''}")
    return "\n".join(lines)


def folder_overrides(positionals: Sequence[str], config_path: str | None) -> list[str]:
    """The overrides of ``patchcore train [FOLDER] [KEY=VALUE ...]``.

    A positional without ``=`` is a folder of the user's images: ``kind: folder`` on it, the project named
    after it, the paper's settings (the defaults), ``FOLDER_CALIBRATION_FRACTION`` of train/good held out
    for the decision threshold. The user's own overrides come after and win.
    """
    folders = [p for p in positionals if "=" not in p]
    overrides = [p for p in positionals if "=" in p]
    if not folders:
        return list(positionals)
    if len(folders) > 1:
        raise ConfigError(f"one data folder at a time, got {', '.join(folders)}")
    if config_path is not None:
        raise ConfigError(
            f"give either a configuration file or a folder, not both ({folders[0]} with --config {config_path}); "
            f"with a configuration set data.root={folders[0]}"
        )
    folder = Path(folders[0]).expanduser()
    if not folder.is_dir():
        raise ConfigError(
            f"{folders[0]} is neither a KEY=VALUE override nor a folder (a data folder holds train/good/)"
        )
    name = folder.resolve().name or "patchcore"
    # JSON strings are YAML scalars: a path with ':' or '#' or one that looks like a number stays a string.
    return [
        "data.kind=folder",
        f"data.root={json.dumps(str(folder))}",
        f"project={json.dumps(name)}",
        f"evaluation.calibration_fraction={FOLDER_CALIBRATION_FRACTION}",
        *overrides,
    ]


def _value(value: Any) -> str:
    return json.dumps(value)  # JSON is YAML (null, true, numbers, quoted strings, [lists])


def _section_lines(cls: type, instance: Any, indent: str) -> list[str]:
    lines: list[str] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal") or f.name in _LEFT_OUT:
            continue
        value = getattr(instance, f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            lines.append("")
            lines.append(f"{indent}{f.name}:")
            lines.extend(_section_lines(hints[f.name], value, indent + "  "))
            continue
        constraint = f.metadata.get("constraint")
        comment = f.metadata.get("help", "")
        if constraint:
            comment = f"{comment} ({constraint})"
        lines.append(f"{indent}{f.name}: {_value(value)}  # {comment}")
    return lines


def starter_yaml(kind: str) -> str:
    """A YAML configuration for data kind ``kind``: every key at its default (the paper's settings), each with
    its help as a comment; ``data.root`` a placeholder to edit (ELPV: null, the bundled data)."""
    if kind not in DATASETS:
        raise ConfigError(f"unknown data kind {kind!r}; known: {', '.join(DATASETS)}")
    config = Config()
    config.project = kind
    config.data.kind = kind
    config.data.root = None if kind == "elpv" else f"/path/to/{kind}"
    head = [
        f"# patchcore configuration for data kind '{kind}' (written by `patchcore init {kind}`).",
        "# Every key is at its default: the paper's settings (WRN50 layer2+layer3, 1024/1024, patch 3,",
        "# approximate greedy coreset 10%, k=1, resize 256 / crop 224). The backbone's ImageNet weights are",
        "# downloaded into the torch hub cache on first use (PATCHCORE_OFFLINE=1 forbids it;",
        "# PATCHCORE_WEIGHTS_MIRROR=URL fetches them from an internal server). Delete the keys you keep at",
        "# their defaults if you like; `patchcore params` lists every key. Run: patchcore train -c THIS_FILE",
        "# (the federated section of `patchcore federated` is left out).",
    ]
    return "\n".join([*head, *_section_lines(Config, config, "")]) + "\n"


def write_starter(kind: str, out: str, force: bool = False) -> Path | None:
    """Write :func:`starter_yaml` to ``out`` (``-``: stdout, returns None); an existing file needs ``force``."""
    text = starter_yaml(kind)
    if out == "-":
        print(text, end="")
        return None
    target = Path(out)
    if target.exists() and not force:
        raise ConfigError(f"{target} exists; use --force to replace it or --out to write elsewhere")
    if target.is_dir():
        raise ConfigError(f"{target} is a folder; --out names the file to write")
    atomic_write_text(target, text)
    return target
