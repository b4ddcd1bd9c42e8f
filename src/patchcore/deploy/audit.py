"""The station's memory of its decisions: typed decision records, a bounded in-memory store of the most
recent ones (with their thumbnails, heatmaps and, within a byte budget, the image itself for feedback),
and an append-only JSONL audit log on disk, rotated by size.

The audit log is the station's durable record: every decision, every piece of operator feedback, every
update, undo and rollback is one JSON line, written with a single ``write`` on a file opened
``O_APPEND`` (a line is never interleaved with another; a line torn by a crash is skipped when read and
the next one starts on a fresh line). At start-up the store is refilled from the log, so the recent list
and the drift figures survive a restart (without images: those live only in memory).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import PIL.Image

__all__ = ["AuditLog", "Decision", "DecisionStore", "StoredDecision", "replay"]

log = logging.getLogger("patchcore")


@dataclass(frozen=True)
class Decision:
    """One scored image as the station decided it (and what the operator said about it)."""

    id: str
    time: float  # Unix time of the decision
    model: str
    model_version: int  # the model version that scored it
    image: str  # the upload's file name or the watched file's name
    source: str  # "upload" | "watch"
    sha256: str | None  # of the image file's bytes (None: scored by /predict, only pixels were kept)
    score: float
    normalized_score: float | None
    anomalous: bool | None  # None: the model is not calibrated
    threshold: float | None
    width: int
    height: int
    path: str | None = None  # the watched file (feedback can read it again after a restart)
    feedback: str | None = None  # "good" (a false alarm or a good part) | "defect" (confirmed)
    feedback_time: float | None = None
    feedback_version: int | None = None  # the model version the "good" feedback created
    forced: bool = False  # the "good" update was forced past the guard
    rescored_score: float | None = None  # the image scored again by feedback_version (or after undo)
    rescored_anomalous: bool | None = None
    rescored_version: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Decision:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass(frozen=True)
class StoredDecision:
    """A decision with what the store keeps beside it in memory (never written to the audit log)."""

    decision: Decision
    thumbnail_png: bytes | None  # a small PNG of the image (None after a restart)
    heatmap_png: bytes | None  # the heatmap overlay, a few hundred pixels a side
    image: PIL.Image.Image | None  # the decoded image, for "good part" feedback (None once over the budget)

    @property
    def image_bytes(self) -> int:
        """What the held image costs in memory."""
        if self.image is None:
            return 0
        return self.image.width * self.image.height * len(self.image.getbands())


class DecisionStore:
    """The last ``capacity`` decisions, newest last, thread-safe. Decoded images are kept for feedback
    within ``image_budget`` bytes in all: beyond it the oldest images are dropped first (their decisions
    stay listed; a watched file is read again from disk instead)."""

    def __init__(self, capacity: int = 500, image_budget: int = 256 * 1024 * 1024):
        if capacity < 1:
            raise ValueError(f"the decision store needs a capacity >= 1, got {capacity}")
        if image_budget < 0:
            raise ValueError(f"the image budget must be >= 0, got {image_budget}")
        self.capacity = capacity
        self.image_budget = image_budget
        self._items: OrderedDict[str, StoredDecision] = OrderedDict()
        self._image_bytes = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    @property
    def image_bytes_held(self) -> int:
        with self._lock:
            return self._image_bytes

    def add(self, item: StoredDecision) -> None:
        with self._lock:
            if item.decision.id in self._items:
                raise KeyError(f"decision {item.decision.id} is already stored")
            self._items[item.decision.id] = item
            self._image_bytes += item.image_bytes
            while len(self._items) > self.capacity:
                _, dropped = self._items.popitem(last=False)
                self._image_bytes -= dropped.image_bytes
            if self._image_bytes > self.image_budget:
                for key, old in self._items.items():
                    if self._image_bytes <= self.image_budget:
                        break
                    if old.image is not None:
                        self._image_bytes -= old.image_bytes
                        self._items[key] = dataclasses.replace(old, image=None)

    def get(self, decision_id: str) -> StoredDecision | None:
        with self._lock:
            return self._items.get(decision_id)

    def update(self, decision: Decision) -> None:
        """Replace the record of a stored decision (feedback), keeping its images."""
        with self._lock:
            item = self._items.get(decision.id)
            if item is None:
                raise KeyError(f"decision {decision.id} is no longer held")
            self._items[decision.id] = dataclasses.replace(item, decision=decision)

    def set_pictures(self, decision_id: str, thumbnail_png: bytes | None, heatmap_png: bytes | None) -> None:
        """Attach the thumbnail and heatmap rendered after the decision was stored (if still held)."""
        with self._lock:
            item = self._items.get(decision_id)
            if item is not None:
                self._items[decision_id] = dataclasses.replace(
                    item, thumbnail_png=thumbnail_png, heatmap_png=heatmap_png
                )

    def decisions(self, model: str | None = None) -> list[Decision]:
        """Oldest first."""
        with self._lock:
            return [i.decision for i in self._items.values() if model is None or i.decision.model == model]

    def recent(self, limit: int, anomalous_only: bool = False) -> list[StoredDecision]:
        """Newest first."""
        with self._lock:
            out = []
            for item in reversed(self._items.values()):
                if anomalous_only and item.decision.anomalous is not True:
                    continue
                out.append(item)
                if len(out) >= limit:
                    break
            return out

    def find_by_feedback_version(self, model: str, version: int) -> Decision | None:
        with self._lock:
            for item in reversed(self._items.values()):
                d = item.decision
                if d.model == model and d.feedback == "good" and d.feedback_version == version:
                    return d
            return None


class AuditLog:
    """Append-only JSONL, rotated when a line would take the file past ``max_bytes``: ``audit.jsonl``
    becomes ``audit.jsonl.1`` (the older ones shift to ``.2`` ... ``.keep``; the oldest is deleted)."""

    def __init__(self, path: str | os.PathLike, max_bytes: int = 10 * 1024 * 1024, keep: int = 5):
        if max_bytes < 1024:
            raise ValueError(f"the audit log's rotation size must be at least 1024 bytes, got {max_bytes}")
        if keep < 1:
            raise ValueError(f"the audit log must keep at least 1 rotated file, got {keep}")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.keep = keep
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = self._open()

    def _open(self) -> int:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        size = os.fstat(fd).st_size
        if size:
            # A crash may have torn the last line: the next record starts on a line of its own.
            with open(self.path, "rb") as handle:
                handle.seek(size - 1)
                if handle.read(1) != b"\n":
                    os.write(fd, b"\n")
        return fd

    def rotated(self, number: int) -> Path:
        return self.path.with_name(f"{self.path.name}.{number}")

    def append(self, event: str, **fields: Any) -> dict[str, Any]:
        """Write one event (``{"event": ..., "time": ..., **fields}``) as one line; returns it."""
        record = {"event": event, "time": round(time.time(), 3), **fields}
        line = (json.dumps(record, default=str, allow_nan=False) + "\n").encode()
        with self._lock:
            size = os.fstat(self._fd).st_size
            if size and size + len(line) > self.max_bytes:
                self._rotate()
            view = memoryview(line)
            while view:  # one write for a line of ordinary size; the loop only guards short writes
                view = view[os.write(self._fd, view) :]
        return record

    def _rotate(self) -> None:
        os.close(self._fd)
        self.rotated(self.keep).unlink(missing_ok=True)
        for number in range(self.keep - 1, 0, -1):
            if self.rotated(number).exists():
                os.replace(self.rotated(number), self.rotated(number + 1))
        os.replace(self.path, self.rotated(1))
        self._fd = self._open()

    def files(self) -> list[Path]:
        """The log's files, oldest first."""
        older = [self.rotated(n) for n in range(self.keep, 0, -1) if self.rotated(n).exists()]
        return [*older, self.path]

    def read(self) -> Iterator[dict[str, Any]]:
        """Every readable event, oldest first (torn or foreign lines are skipped)."""
        for path in self.files():
            try:
                with open(path, "rb") as handle:
                    for raw in handle:
                        try:
                            record = json.loads(raw)
                        except ValueError:
                            continue
                        if isinstance(record, dict) and "event" in record:
                            yield record
            except FileNotFoundError:  # rotated away while reading
                continue

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


def replay(events: Iterator[dict[str, Any]], capacity: int) -> list[Decision]:
    """The last ``capacity`` decisions (with their feedback) from audit events, oldest first."""
    decisions: OrderedDict[str, Decision] = OrderedDict()
    for event in events:
        kind = event.get("event")
        try:
            if kind == "decision":
                decision = Decision.from_dict(event["decision"])
                decisions[decision.id] = decision
                while len(decisions) > capacity:
                    decisions.popitem(last=False)
            elif kind in ("feedback", "undo", "rollback-feedback") and event.get("decision"):
                decision = Decision.from_dict(event["decision"])
                if decision.id in decisions:
                    decisions[decision.id] = decision
        except (KeyError, TypeError) as exc:
            log.warning("audit log: skipping an unreadable %s event (%s)", kind, exc)
    return list(decisions.values())
