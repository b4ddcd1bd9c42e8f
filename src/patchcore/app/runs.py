"""Run folders, console logging and progress bars: what a run of the application looks like on disk and
on the terminal."""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..fileio import safe_name

__all__ = [
    "Progress",
    "make_run_dir",
    "metrics_line",
    "seed_everything",
    "setup_logging",
]

log = logging.getLogger("patchcore")


def make_run_dir(output_dir: str | os.PathLike, project: str, group: str) -> Path:
    """``<output_dir>/<project>/<group>/``, or ``<group>_1``, ``<group>_2``... if taken: never overwrites."""
    parent = Path(output_dir) / safe_name(project)
    parent.mkdir(parents=True, exist_ok=True)
    base = safe_name(group)
    for attempt in range(10000):
        candidate = parent / (base if attempt == 0 else f"{base}_{attempt}")
        try:
            candidate.mkdir()  # atomic: two runs started together cannot get the same folder
            return candidate
        except FileExistsError:
            continue
    raise RuntimeError(f"no free run folder under {parent}")


_CONSOLE = None


def _console():
    """The rich console of logs and progress bars, shared so log lines print above live bars; on stderr,
    because stdout carries the results (the summary table, predict's JSON lines)."""
    global _CONSOLE
    if _CONSOLE is None:
        from rich.console import Console

        _CONSOLE = Console(stderr=True)
    return _CONSOLE


def setup_logging(run_dir: Path | None, level: str = "INFO") -> None:
    """Console logging through rich (on stderr: stdout carries results), plus ``run.log`` in the run folder."""
    from rich.logging import RichHandler

    log.setLevel(level.upper())
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()
    console = RichHandler(console=_console(), show_path=False, rich_tracebacks=False, markup=False)
    console.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(console)
    if run_dir is not None:
        file_handler = logging.FileHandler(run_dir / "run.log", encoding="utf-8")
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(file_handler)
    log.propagate = False


class Progress:
    """Rich progress bars per phase (extract, coreset, predict); a no-op when disabled.

    Called as ``progress(phase, done, total)``: the engine's and the evaluation's progress callback.
    """

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self._progress = None
        self._tasks: dict[str, Any] = {}
        self._totals: dict[str, int | None] = {}
        self._prefix = ""

    def __enter__(self) -> Progress:
        if self.enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.progress import Progress as RichProgress

            self._progress = RichProgress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=_console(),
                transient=False,
            )
            self._progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)
            self._progress = None

    def start(self, prefix: str, totals: dict[str, int | None]) -> None:
        self._prefix = prefix
        self._tasks = {}
        self._totals = dict(totals)

    def __call__(self, phase: str, done: int, total: int | None) -> None:
        if self._progress is None:
            return
        total = total if total is not None else self._totals.get(phase)
        if phase not in self._tasks:
            self._tasks[phase] = self._progress.add_task(f"{self._prefix} {phase}", total=total)
        self._progress.update(self._tasks[phase], completed=done, total=total)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def metrics_line(metrics: dict[str, float | None], stats: dict[str, Any]) -> str:
    """One log line: metrics in percent (n/a where absent) and the bank size."""
    parts = [f"{k}={'n/a' if v is None else f'{100 * v:.2f}'}" for k, v in metrics.items()]
    if "memory_size" in stats:
        parts.append(f"bank={stats['memory_size']}/{stats['n_patches']}x{stats['feature_dim']}")
    return ", ".join(parts)
