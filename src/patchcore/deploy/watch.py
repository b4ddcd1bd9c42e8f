"""``patchcore serve --watch DIR``: score every new image file that appears in a folder (a camera's output).

A scanner thread lists the folder every ``poll`` seconds. A file is taken only once it is complete: its
size and modification time have not changed for ``settle`` seconds and, where ``/proc`` shows it, no
process holds it open for writing. Complete files go to a bounded queue (when it is full they simply wait
in the folder for the next scan); a worker thread reads each one, checks again that it did not change
while being read, and hands its bytes to ``handle`` (decode, score, record). Every file gives one line in
the results file (JSONL): its result, or why it was skipped (not an image, empty, ...). That file is also
the record of what is done: a file is known by (name, size, mtime), so a restart scores neither a file
twice nor misses one that arrived while the server was down, and a file rewritten under the same name is
scored again.

Names starting with ``.`` and the usual in-progress suffixes (``.tmp``, ``.part``, ``.partial``,
``.crdownload``, ``~``) are ignored, as are sub-folders.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .audit import AuditLog

__all__ = ["FolderWatcher", "SkipFile", "WatchedFile", "open_for_writing"]

log = logging.getLogger("patchcore")

_IN_PROGRESS = (".tmp", ".part", ".partial", ".crdownload", "~")


class SkipFile(ValueError):
    """A watched file that is reported and skipped (the message says why)."""


@dataclass(frozen=True)
class WatchedFile:
    path: Path
    size: int
    mtime_ns: int

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.path.name, self.size, self.mtime_ns)


def open_for_writing(paths: set[Path]) -> set[Path]:
    """Those of ``paths`` that a process visible in ``/proc`` holds open for writing (empty where there is
    no ``/proc``). Processes of other users, and writers on other machines, are not visible: the
    size-stable check covers them."""
    proc = Path("/proc")
    if not paths or not (proc / "self" / "fd").is_dir():
        return set()
    wanted = {str(p.resolve()): p for p in paths}
    busy: set[Path] = set()
    for pid in os.listdir(proc):
        if not pid.isdigit():
            continue
        fd_dir = proc / pid / "fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(fd_dir / fd)
            except OSError:
                continue
            if target not in wanted:
                continue
            try:
                flags = next(
                    int(line.split()[1], 8)
                    for line in (proc / pid / "fdinfo" / fd).read_text().splitlines()
                    if line.startswith("flags:")
                )
            except (OSError, StopIteration, ValueError, IndexError):
                continue
            if flags & (os.O_WRONLY | os.O_RDWR):
                busy.add(wanted[target])
    return busy


class FolderWatcher:
    """Watches ``folder``; ``handle(file, data)`` scores one complete file and returns the fields of its
    result line (raise :class:`SkipFile` to report and skip it)."""

    def __init__(
        self,
        folder: str | os.PathLike,
        results: str | os.PathLike,
        handle: Callable[[WatchedFile, bytes], dict[str, Any]],
        poll: float = 0.5,
        settle: float = 1.0,
        queue_size: int = 64,
        max_bytes: int = 20 * 1024 * 1024,
    ):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise SkipFile(f"watched folder {self.folder} does not exist or is not a folder")
        if not (poll > 0 and settle >= 0 and queue_size >= 1 and max_bytes >= 1):
            raise ValueError("watch settings must be positive (poll > 0, settle >= 0, queue >= 1)")
        self.results = Path(results)
        self.handle = handle
        self.poll = poll
        self.settle = settle
        self.max_bytes = max_bytes
        self.queue: queue.Queue[WatchedFile] = queue.Queue(maxsize=queue_size)
        self._done: set[tuple[str, int, int]] = self._read_done()
        self._queued: set[tuple[str, int, int]] = set()
        self._seen: dict[str, tuple[int, int, float]] = {}  # name -> (size, mtime_ns, unchanged since)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        # Lines in the results file: one writer, atomic appends, never rotated (it is the done record).
        self._log = AuditLog(self.results, max_bytes=2**62, keep=1)
        self.scored = 0
        self.skipped = 0

    def _read_done(self) -> set[tuple[str, int, int]]:
        done: set[tuple[str, int, int]] = set()
        if not self.results.is_file():
            return done
        present = set(os.listdir(self.folder))
        with open(self.results, "rb") as handle:
            for raw in handle:
                try:
                    line = json.loads(raw)
                    key = (str(line["file"]), int(line["size"]), int(line["mtime_ns"]))
                except (ValueError, KeyError, TypeError):
                    continue  # a torn last line: that file is simply taken again
                if key[0] in present:  # files gone from the folder need no memory
                    done.add(key)
        return done

    @property
    def pending(self) -> int:
        return self.queue.qsize()

    def start(self) -> None:
        for target, name in ((self._scan_loop, "watch-scan"), (self._work_loop, "watch-score")):
            thread = threading.Thread(target=target, name=f"{name}-{self.folder.name}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout)
        self._log.close()

    # ------------------------------------------------------------------ scanning

    def _scan_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.scan()
            except Exception:  # noqa: BLE001 - a folder that vanished for a moment must not end the watch
                log.exception("watching %s", self.folder)
            self._stop.wait(self.poll)

    def scan(self) -> list[WatchedFile]:
        """One pass: queue the files that are complete and new; returns those queued."""
        now = time.monotonic()
        candidates: list[WatchedFile] = []
        names = set()
        with os.scandir(self.folder) as entries:
            for entry in entries:
                name = entry.name
                if name.startswith(".") or name.endswith(_IN_PROGRESS):
                    continue
                try:
                    if not entry.is_file(follow_symlinks=False):
                        continue
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                names.add(name)
                key = (name, st.st_size, st.st_mtime_ns)
                with self._lock:
                    if key in self._done or key in self._queued:
                        continue
                previous = self._seen.get(name)
                if previous is None or previous[:2] != (st.st_size, st.st_mtime_ns):
                    self._seen[name] = (st.st_size, st.st_mtime_ns, now)
                    if self.settle > 0:
                        continue
                elif now - previous[2] < self.settle:
                    continue
                candidates.append(WatchedFile(Path(entry.path), st.st_size, st.st_mtime_ns))
        for name in set(self._seen) - names:
            del self._seen[name]
        busy = open_for_writing({c.path for c in candidates})
        queued = []
        for file in sorted(candidates, key=lambda f: (f.mtime_ns, f.path.name)):
            if file.path in busy:
                continue
            try:
                self.queue.put_nowait(file)
            except queue.Full:
                break  # bounded: the rest wait in the folder for a later scan
            with self._lock:
                self._queued.add(file.key)
            queued.append(file)
        return queued

    # ------------------------------------------------------------------ scoring

    def _work_loop(self) -> None:
        while not self._stop.is_set():
            try:
                file = self.queue.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                self.process(file)
            except Exception:  # noqa: BLE001 - logged; the file is retried on a later scan
                log.exception("watch: %s", file.path)
            finally:
                with self._lock:
                    self._queued.discard(file.key)

    def process(self, file: WatchedFile) -> dict[str, Any] | None:
        """Score (or skip) one queued file and write its line; None if it changed (taken again later)."""
        try:
            if file.size > self.max_bytes:
                raise SkipFile(f"{file.size} bytes exceed the limit of {self.max_bytes}")
            if file.size == 0:
                raise SkipFile("empty file")
            with open(file.path, "rb") as handle:
                data = handle.read(self.max_bytes + 1)
            st = file.path.stat()
            if (len(data), st.st_size, st.st_mtime_ns) != (file.size, file.size, file.mtime_ns):
                return None  # still being written after all: the next scans see it again
            fields = self.handle(file, data)
            outcome = "scored"
        except FileNotFoundError:
            return None  # removed before it was read: nothing to report
        except SkipFile as exc:
            fields = {"skipped": str(exc)}
            outcome = "skipped"
            log.warning("watch: skipped %s: %s", file.path.name, exc)
        line = self._log.append(
            outcome, file=file.path.name, size=file.size, mtime_ns=file.mtime_ns, **fields
        )
        with self._lock:
            self._done.add(file.key)
            if outcome == "scored":
                self.scored += 1
            else:
                self.skipped += 1
        return line

    def wait_idle(self, timeout: float) -> bool:
        """True once nothing is queued or in progress (for tests and orderly shutdown)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if not self._queued:
                    return True
            time.sleep(0.02)
        return False
