"""A served model that learns on the line: operator feedback updates it while it keeps serving.

:class:`LearningPredictor` is a :class:`~patchcore.deploy.inference.Predictor` whose scoring calls take a
read lock and whose updates (``PatchCore.partial_fit``, ``rollback``, ``remove_update``) take the write
lock. So a request is scored wholly before or wholly after an update, never against a half-grown bank,
and every prediction carries the version of the model that made it (``model_version``). Updates of one
model run one at a time; each is written back to the model file (atomically, with the model's history)
before it is answered, so a restart serves the newest version.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import PIL.Image

from .inference import ImagePrediction, Predictor, TorchBackend

__all__ = ["LearningPredictor", "ModelChange", "NotLearnable", "ReadWriteLock", "VersionedPrediction"]

log = logging.getLogger("patchcore")


class NotLearnable(ValueError):
    """The served model cannot take updates (an exported graph, or no model file to write back)."""


class ReadWriteLock:
    """Many readers or one writer; a waiting writer goes before readers that arrive after it."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextlib.contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if self._readers == 0:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writer or self._readers:
                    self._cond.wait()
            finally:
                self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


@dataclass
class VersionedPrediction(ImagePrediction):
    """A prediction and the version of the model that made it."""

    model_version: int = 0


@dataclass(frozen=True)
class ModelChange:
    """What one update, undo or rollback did."""

    action: str  # "update" | "rollback" | "remove" (remove_update of an older update)
    version_before: int
    version_after: int
    record: Any = None  # the UpdateRecord of an update (None otherwise)

    def to_dict(self) -> dict[str, Any]:
        record = self.record
        if hasattr(record, "to_dict"):
            record = record.to_dict()
        elif dataclasses.is_dataclass(record) and not isinstance(record, type):
            record = dataclasses.asdict(record)
        elif record is not None and not isinstance(record, dict):
            record = str(record)
        return {
            "action": self.action,
            "version_before": self.version_before,
            "version_after": self.version_after,
            "update": record,
        }


class LearningPredictor(Predictor):
    """A predictor over a PyTorch model that can be updated while it serves (see the module docstring)."""

    def __init__(self, model: Any, per_call_range: bool = True, path: str | os.PathLike | None = None):
        super().__init__(model, per_call_range)
        self.path = Path(path) if path is not None else None
        self._rw = ReadWriteLock()
        self._updating = threading.Lock()

    @classmethod
    def load(  # type: ignore[override]
        cls,
        path: str | os.PathLike,
        device: str = "auto",
        weights: str | os.PathLike | None = None,
        runtime: str = "torch",
        per_call_range: bool = True,
        threads: int | None = None,
    ) -> LearningPredictor:
        predictor = super().load(path, device, weights, runtime, per_call_range, threads)
        assert isinstance(predictor, LearningPredictor)
        if Path(path).is_file():
            predictor.path = Path(path)
        return predictor

    # ------------------------------------------------------------------ state

    @property
    def learnable(self) -> bool:
        return isinstance(self.backend, TorchBackend) and self.path is not None

    def why_not_learnable(self) -> str | None:
        if not isinstance(self.backend, TorchBackend):
            runtime = getattr(self.backend, "runtime", "exported")
            return f"the model is served by runtime {runtime}: feedback updates need the .pt model (--runtime torch)"
        if self.path is None:
            return "the model was not loaded from a file: an update could not be saved"
        if not hasattr(self.backend.model, "partial_fit"):
            return "this patchcore has no PatchCore.partial_fit (line learning) yet"
        return None

    @property
    def version(self) -> int:
        return int(getattr(self.model, "version_", 0) or 0)

    def history(self) -> list[Any]:
        with self._rw.read():
            return list(getattr(self.model, "history_", []) or [])

    # ------------------------------------------------------------------ scoring

    def predict(
        self,
        images: Sequence[str | os.PathLike | PIL.Image.Image],
        names: Sequence[str] | None = None,
        batch_size: int | None = None,
    ) -> list[VersionedPrediction]:  # type: ignore[override]
        with self._rw.read():
            version = self.version
            records = super().predict(images, names, batch_size)
        names_ = [f.name for f in dataclasses.fields(ImagePrediction)]
        return [
            VersionedPrediction(**{n: getattr(r, n) for n in names_}, model_version=version) for r in records
        ]

    def result_fields(self, prediction: ImagePrediction) -> dict[str, Any]:
        fields = super().result_fields(prediction)
        if isinstance(prediction, VersionedPrediction):
            fields["model_version"] = prediction.model_version
        return fields

    # ------------------------------------------------------------------ updates

    def _change(self, call: Any) -> ModelChange:
        """``call(model)`` -> (action, record), with nothing scored meanwhile; then the file is rewritten."""
        reason = self.why_not_learnable()
        if reason:
            raise NotLearnable(reason)
        with self._updating:
            before = self.version
            with self._rw.write():
                # Nothing is scored while the bank changes; the backend is renewed so its copy of the
                # calibration (an update or a removal may change it) is the model's.
                try:
                    action, record = call(self.model)
                finally:
                    self.backend = TorchBackend(self.model)
                    self.transform = self.backend.transform
                after = self.version
            assert self.path is not None
            self.model.save(self.path)  # atomic; the file now holds version `after` and its history
            log.info("model %s: %s, version %d -> %d (saved)", self.path.name, action, before, after)
            return ModelChange(action, before, after, record)

    def learn(self, images: Sequence[Any], note: str = "", force: bool = False) -> ModelChange:
        """Add good images to the bank (``partial_fit``); ``UpdateRefused`` from its guard passes through."""
        return self._change(lambda m: ("update", m.partial_fit(list(images), note=note, force=force)))

    def rollback(self, version: int) -> ModelChange:
        """Back to ``version``: the rows added after it are removed (and their updates from the history)."""

        def call(model: Any) -> tuple[str, Any]:
            model.rollback(version)
            return "rollback", None

        return self._change(call)

    def take_out(self, version: int) -> ModelChange:
        """Remove one update. The newest is rolled back (the model returns to the version before it, its
        scores bit for bit); an older one is removed with ``remove_update`` (the later ones stay; the
        model's version number does not change, the history marks the update removed)."""

        def call(model: Any) -> tuple[str, Any]:
            history = list(model.history_)
            if history and history[-1].version == version:
                earlier = [r.version for r in history[:-1]]
                model.rollback(earlier[-1] if earlier else 0)
                return "rollback", None
            model.remove_update(version)
            return "remove", None

        return self._change(call)

    def active_updates(self) -> list[int]:
        """The versions of the updates whose rows are in the bank, oldest first."""
        return [int(r.version) for r in self.history() if not getattr(r, "removed", "")]
