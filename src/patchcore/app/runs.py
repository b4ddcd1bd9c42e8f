"""Run folders, console logging and progress bars: what a run of the application looks like on disk and
on the terminal."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..fileio import atomic_write_json, atomic_write_text, safe_name

if TYPE_CHECKING:
    from rich.progress import Progress as RichProgress

__all__ = [
    "INCOMPLETE_MARKER",
    "OutputError",
    "Progress",
    "RunState",
    "begin_run",
    "check_run_folder",
    "clean_stale_temp",
    "finish_run",
    "lock_run",
    "make_run_dir",
    "mark_object",
    "prepare_output_dir",
    "process_alive",
    "check_writable",
    "run_state",
    "run_temp_dir",
    "metrics_line",
    "seed_everything",
    "setup_logging",
    "start_run",
    "unlock_run",
]

log = logging.getLogger("patchcore")


class OutputError(ValueError):
    """An output folder that cannot be used (a file, not writable, or holding earlier results)."""


def _mkdir(path: Path, what: str) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise OutputError(f"{what} {path} is an existing file, not a folder") from None
    except NotADirectoryError:
        raise OutputError(f"{what} {path} is inside a file, not a folder") from None
    except OSError as exc:
        raise OutputError(f"cannot create {what} {path}: {exc.strerror or exc}") from None


def check_writable(path: Path, what: str) -> Path:
    """``path`` as an existing folder we can create files in (a probe file, not os.access: that is
    wrong for root and for read-only mounts), else OutputError naming it."""
    _mkdir(path, what)
    try:
        with tempfile.TemporaryFile(dir=path, prefix=".patchcore-probe-"):
            pass
    except OSError as exc:
        raise OutputError(f"{what} {path} is not writable: {exc.strerror or exc}") from None
    return path


def prepare_output_dir(path: str | os.PathLike, overwrite: bool = False, what: str = "output folder") -> Path:
    """A writable folder for results; a non-empty one is refused unless ``overwrite`` (earlier results would
    be replaced silently)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{what} {path} is an existing file, not a folder")
    if path.is_dir() and not overwrite:
        entries = sorted(p.name for p in path.iterdir())
        if entries:
            shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
            raise OutputError(
                f"{what} {path} is not empty ({len(entries)} entries: {shown}); pass --overwrite to replace "
                "earlier results, or choose another folder"
            )
    return check_writable(path, what)


def make_run_dir(output_dir: str | os.PathLike, project: str, group: str) -> Path:
    """``<output_dir>/<project>/<group>/``, or ``<group>_1``, ``<group>_2``... if taken: never overwrites."""
    parent = check_writable(Path(output_dir) / safe_name(project), "output folder")
    base = safe_name(group)
    for attempt in range(10000):
        candidate = parent / (base if attempt == 0 else f"{base}_{attempt}")
        try:
            candidate.mkdir()  # atomic: two runs started together cannot get the same folder
            return candidate
        except FileExistsError:
            continue
    raise OutputError(f"no free run folder under {parent}")


# ------------------------------------------------------------------ run completion
#
# A run folder holds the file ``incomplete`` from its creation until the run finishes. The file is JSON:
# {"pid": ..., "host": ..., "started": ..., "objects": {"<name>": "pending" | "fitted" | "done"}}
# ("fitted": the model file is saved, its evaluation has not finished). A run killed at any point keeps the
# marker, so a reader can tell a finished run (or object) from an interrupted one: ``patchcore evaluate``
# refuses a model whose object is still "pending", and ``train --resume`` can redo what is not "done".

INCOMPLETE_MARKER = "incomplete"
_TEMP = "tmp"  # <run>/tmp: the run's temporary files (streamed features), removed when it ends


@dataclass
class RunState:
    """What a run folder's marker says. ``complete``: no marker (the run finished)."""

    complete: bool
    objects: dict[str, str] = field(default_factory=dict)
    pid: int | None = None
    host: str | None = None

    def object_done(self, name: str) -> bool:
        return self.complete or self.objects.get(name) == "done"

    def model_usable(self, name: str) -> bool:
        """Whether the model file of ``name`` was completely written by this run."""
        return self.complete or self.objects.get(name) in ("fitted", "done")


def _write_marker(run_dir: Path, state: RunState) -> None:
    atomic_write_json(
        Path(run_dir) / INCOMPLETE_MARKER,
        {"pid": state.pid, "host": state.host, "started": time.time(), "objects": state.objects},
    )


def begin_run(run_dir: Path, objects: list[str]) -> None:
    """Mark ``run_dir`` incomplete, every object pending (call right after creating the folder)."""
    _write_marker(run_dir, RunState(False, dict.fromkeys(objects, "pending"), os.getpid(), socket.gethostname()))


def mark_object(run_dir: Path, name: str, status: str) -> None:
    """Record ``name`` as ``pending``, ``fitted`` (model file saved) or ``done`` (evaluated, reported)."""
    if status not in ("pending", "fitted", "done"):
        raise ValueError(f"unknown object status {status!r}")
    state = run_state(run_dir)
    if state.complete:
        return
    state.objects[name] = status
    _write_marker(run_dir, state)


def finish_run(run_dir: Path) -> None:
    """The run finished: remove its temporary folder and its marker (last, so the marker outlives both)."""
    shutil.rmtree(Path(run_dir) / _TEMP, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        (Path(run_dir) / INCOMPLETE_MARKER).unlink()


def run_state(run_dir: Path) -> RunState:
    """The marker of ``run_dir`` (a folder without one is complete). An unreadable marker counts as
    incomplete with nothing done."""
    marker = Path(run_dir) / INCOMPLETE_MARKER
    if not marker.exists():
        return RunState(True)
    try:
        data = json.loads(marker.read_text())
        return RunState(False, dict(data.get("objects", {})), data.get("pid"), data.get("host"))
    except (OSError, ValueError, AttributeError):
        return RunState(False)


def check_run_folder(path: str | os.PathLike, what: str = "--resume") -> Path:
    """``path`` if it is a run folder (its config.yaml, and the run.log or ``incomplete`` marker every run
    writes), else OutputError: a folder that merely holds a config.yaml is not taken for a run."""
    run_dir = Path(path)
    if not (run_dir / "config.yaml").is_file():
        raise OutputError(f"{what} {run_dir}: not a run folder (no config.yaml in it)")
    if not ((run_dir / INCOMPLETE_MARKER).is_file() or (run_dir / "run.log").is_file()):
        raise OutputError(
            f"{what} {run_dir}: not a run folder (a config.yaml but neither the run.log nor the "
            f"{INCOMPLETE_MARKER!r} marker that every run writes)"
        )
    return run_dir


def lock_run(run_dir: Path) -> int | None:
    """Take the run folder's writer lock (an exclusive ``flock`` on the folder itself: no extra file, and the
    kernel drops it when the process ends, however it ends). Returns the descriptor to pass to
    :func:`unlock_run`; OutputError when another live process writes the run."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no lock
        return None
    fd = os.open(run_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        state = run_state(run_dir)
        who = f" (process {state.pid} on {state.host})" if state.pid is not None else ""
        raise OutputError(
            f"run {run_dir} is being written by another process{who}; wait for it to end or stop it first"
        ) from None
    return fd


def unlock_run(fd: int | None) -> None:
    """Release a lock taken by :func:`lock_run` (None: nothing to release)."""
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)


def start_run(run_dir: Path, objects: list[str], level: str, config_text: str | None = None) -> None:
    """The start every command's run shares: logging to ``run.log``, stale temporary files of killed runs of
    the project removed, the configuration saved (``config.yaml``, when given) and the ``incomplete`` marker
    with every object pending. The caller holds the folder's lock (:func:`lock_run`)."""
    setup_logging(run_dir, level)
    clean_stale_temp(run_dir.parent)  # temporary files of runs of this project killed before
    if config_text is not None:
        atomic_write_text(run_dir / "config.yaml", config_text)
    begin_run(run_dir, objects)


def run_temp_dir(run_dir: Path) -> Path:
    """``<run>/tmp``: where a run's temporary files go (removed by :func:`finish_run`, or by
    :func:`clean_stale_temp` after a crash)."""
    path = Path(run_dir) / _TEMP
    path.mkdir(parents=True, exist_ok=True)
    return path


def process_alive(pid: int | None, host: str | None) -> bool:
    """Whether ``pid`` on ``host`` may still run (another host's processes count as alive: unknowable)."""
    if host != socket.gethostname():
        return True
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temp(project_dir: Path) -> list[Path]:
    """Remove the temporary files of runs under ``project_dir`` whose process is gone (killed): their
    ``tmp`` folders and half-written ``.*.tmp`` files. The ``incomplete`` markers stay. Returns what went."""
    removed: list[Path] = []
    if not Path(project_dir).is_dir():
        return removed
    for run_dir in Path(project_dir).iterdir():
        if not (run_dir / INCOMPLETE_MARKER).is_file():
            continue
        state = run_state(run_dir)
        if process_alive(state.pid, state.host):
            continue
        if (run_dir / _TEMP).exists():
            shutil.rmtree(run_dir / _TEMP, ignore_errors=True)
            removed.append(run_dir / _TEMP)
        for tmp in run_dir.rglob(".*.tmp"):
            with contextlib.suppress(OSError):
                tmp.unlink()
                removed.append(tmp)
    for path in removed:
        log.info("removed the temporary files of an interrupted run: %s", path)
    return removed


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
        self._progress: RichProgress | None = None
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
                # Results printed on stdout (predict's JSON lines) must reach a pipe or a file as they are:
                # rich would otherwise capture them into the bars' console on stderr. Only a terminal shares
                # the screen with the bars, and there rich keeps the two apart.
                redirect_stdout=sys.stdout.isatty(),
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
