"""The inspection station: what an operator runs a shift on, behind the service's key.

Plugged into ``patchcore serve`` as a :class:`~patchcore.deploy.service.ServiceExtension`
(:func:`station_extension`): its routes sit behind the service's guard like every route.

- ``POST /inspect?model=``: score an uploaded image as the station (the page's drop zone); the decision is
  kept in the recent list (thumbnail, heatmap) and appended to the audit log. Images scored through
  ``/predict`` and ``/predict/batch`` are recorded the same way (their thumbnails rendered in the
  background), and so are the watched folders' files (:mod:`patchcore.deploy.watch`);
- ``GET /decisions`` (newest first; ``?anomalous=true`` filters), ``GET /decisions/{id}`` (with heatmap);
- ``POST /feedback`` (operator) ``{"decision": ID, "label": "good" | "defect", "force": false}``: "good"
  adds the image to the model (``partial_fit``; the served model changes under a write lock, so no request
  is scored against a half-updated bank and every answer names the version it used), saves the model
  file and answers the image scored again by the new version. The guard against teaching a defect answers
  409 with ``"refused": true`` (the page asks the operator to confirm, then sends ``force``). "defect" is
  recorded (drift figures, audit log); on a decision that had been taught as good it removes that update;
- ``POST /undo?model=`` (operator): removes the newest update; ``GET /history?model=``;
  ``POST /rollback`` (operator) ``{"model": NAME, "version": V}``;
- ``GET /drift?model=``: the drift figures (:mod:`patchcore.deploy.drift`), also gauges on ``/metrics``;
- ``GET /station``: the models with their versions, the caller's role, the watched folders.

The station keeps its files in its folder (``--station-dir``; default: ``station/`` beside the first
model): ``audit.jsonl`` (rotated by size) and ``watch-<model>.jsonl``. At start-up the recent list is
refilled from the audit log, and the model files (rewritten by every update) hold the newest version.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import io
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import PIL.Image

from .errors import DeployError

try:
    from fastapi import APIRouter, Body, Depends, File, HTTPException, Query, UploadFile
    from fastapi.responses import JSONResponse
    from prometheus_client.core import GaugeMetricFamily
except ImportError as exc:  # pragma: no cover - the extra is installed in CI
    raise DeployError("patchcore serve needs the 'serve' extra: pip install 'patchcore[serve]'") from exc

from ..engine.model import UpdateRefused
from ..heatmaps import overlay
from .audit import AuditLog, Decision, DecisionStore, StoredDecision, replay
from .drift import drift_figures
from .inference import ImagePrediction, Predictor, TorchBackend
from .learning import LearningPredictor, ModelChange, NotLearnable
from .service import Principal, ScoreEvent, ServiceExtension, authenticate, require_operator
from .uploads import UploadError, decode_upload
from .watch import FolderWatcher, SkipFile, WatchedFile

__all__ = ["Station", "StationError", "StationSettings", "parse_watch_specs", "station_extension"]

log = logging.getLogger("patchcore")

THUMBNAIL_SIDE = 96
HEATMAP_SIDE = 384
RENDER_QUEUE = 64  # /predict images waiting for their thumbnail; beyond it they are listed without one


class StationError(Exception):
    """A station request that is refused: ``status`` is the HTTP status, ``extra`` goes into the answer."""

    def __init__(self, status: int, message: str, **extra: Any):
        super().__init__(message)
        self.status = status
        self.extra = extra


MIB = 1024 * 1024


@dataclass(frozen=True)
class StationSettings:
    """How the station keeps its records and watches folders (``patchcore serve`` flags)."""

    folder: str | None = None  # --station-dir; None: a "station" folder beside the first model
    recent: int = 500  # --station-recent: decisions kept in memory (the page's list)
    image_budget_mb: float = 256.0  # decoded images kept in memory for feedback, all together
    audit_max_mb: float = 10.0  # --audit-max-mb: the audit log is rotated past this size
    audit_keep: int = 5  # rotated audit files kept
    drift_window: int = 200  # --drift-window: decisions the drift figures look at
    watch: tuple[str, ...] = ()  # --watch [MODEL=]DIR
    watch_poll_s: float = 0.5
    watch_settle_s: float = 1.0  # --watch-settle-s: a file's size and mtime must stay unchanged this long
    watch_queue: int = 64  # --watch-queue

    def __post_init__(self) -> None:
        object.__setattr__(self, "watch", tuple(self.watch))
        checks = [
            ("--station-recent", self.recent, 1, 1_000_000),
            ("the station's image budget (MB)", self.image_budget_mb, 0, 1_000_000),
            ("--audit-max-mb", self.audit_max_mb, 0.01, 100_000),
            ("the rotated audit files kept", self.audit_keep, 1, 1000),
            ("--drift-window", self.drift_window, 1, 1_000_000),
            ("--watch-poll-s", self.watch_poll_s, 0.01, 60),
            ("--watch-settle-s", self.watch_settle_s, 0, 3600),
            ("--watch-queue", self.watch_queue, 1, 100_000),
        ]
        for what, value, low, high in checks:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
                raise DeployError(f"{what} must be a number in {low}..{high}, got {value!r}")

    @classmethod
    def from_service(cls, settings: Any) -> StationSettings:
        """The station's part of the ``patchcore serve`` settings (:class:`~patchcore.deploy.settings.ServiceSettings`)."""
        return cls(
            folder=settings.station_dir,
            recent=settings.station_recent,
            audit_max_mb=settings.audit_max_bytes / MIB,
            drift_window=settings.drift_window,
            watch=tuple(settings.watch),
            watch_settle_s=settings.watch_settle_s,
        )

    @property
    def image_budget_bytes(self) -> int:
        return int(self.image_budget_mb * MIB)

    @property
    def audit_max_bytes(self) -> int:
        return max(1024, int(self.audit_max_mb * MIB))


def parse_watch_specs(specs: tuple[str, ...] | list[str], models: list[str]) -> dict[str, Path]:
    """``[MODEL=]DIR`` -> {model: folder}; checked up front (one line per problem)."""
    out: dict[str, Path] = {}
    for spec in specs:
        name, sep, folder = spec.partition("=")
        if not sep or name not in models:
            if sep and name and not Path(spec).is_dir():
                raise DeployError(f"--watch {spec}: no served model is named {name!r} ({', '.join(models)})")
            if len(models) != 1:
                raise DeployError(f"--watch {spec}: several models are served, say which: --watch MODEL=DIR")
            name, folder = models[0], spec
        path = Path(folder)
        if not path.is_dir():
            raise DeployError(f"--watch {spec}: {path} is not a folder")
        if name in out:
            raise DeployError(f"--watch: model {name!r} is given two folders; one folder per model")
        out[name] = path
    return out


def _png(image: PIL.Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def render_pictures(image: PIL.Image.Image, unit_map: np.ndarray) -> tuple[bytes, bytes]:
    """(thumbnail PNG, heatmap overlay PNG), both small: the image is shrunk before the map is drawn."""
    small = image.convert("RGB")
    small.thumbnail((HEATMAP_SIDE, HEATMAP_SIDE))
    heat = np.asarray(
        PIL.Image.fromarray(np.asarray(unit_map, dtype=np.float32), mode="F").resize(
            small.size, PIL.Image.Resampling.BILINEAR
        )
    )
    heatmap = _png(overlay(small, heat))
    small.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
    return _png(small), heatmap


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode("ascii")


def decision_json(item: StoredDecision, heatmap: bool = False) -> dict[str, Any]:
    out = item.decision.to_dict()
    out["image_held"] = item.image is not None or item.decision.path is not None
    out["thumbnail_png_base64"] = _b64(item.thumbnail_png)
    if heatmap:
        out["heatmap_png_base64"] = _b64(item.heatmap_png)
    return out


def _field(record: Any, name: str) -> Any:
    return record[name] if isinstance(record, dict) else getattr(record, name)


def _plain(record: Any) -> Any:
    if hasattr(record, "to_dict"):
        return record.to_dict()
    if dataclasses.is_dataclass(record) and not isinstance(record, type):
        return dataclasses.asdict(record)
    return record


class Station:
    """The station's state. Built before the app; :meth:`attach` binds it to the service's state (its
    live name -> predictor mapping, limits, model paths) at start-up."""

    def __init__(self, settings: StationSettings):
        self.settings = settings
        self.state: Any = None
        self.predictors: Mapping[str, Predictor] = {}
        self.paths: dict[str, Path] = {}
        self.max_upload_bytes = 20 * 1024 * 1024
        self.max_pixels = 40_000_000
        self.watch_folders: dict[str, Path] = {}
        self.watchers: dict[str, FolderWatcher] = {}
        self.folder: Path | None = None
        self.audit: AuditLog | None = None
        self.store = DecisionStore(settings.recent, settings.image_budget_bytes)
        self.adopted = threading.Event()
        self._stop = threading.Event()
        self._starter: threading.Thread | None = None
        self._renderer = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="station-render"
        )
        self._rendering = 0
        self._render_lock = threading.Lock()

    # ------------------------------------------------------------------ lifecycle

    def open(self, folder: Path, model_names: list[str]) -> None:
        """Open the station's folder and audit log; refill the recent list from the log."""
        self.watch_folders = parse_watch_specs(self.settings.watch, model_names)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            self.audit = AuditLog(
                folder / "audit.jsonl", self.settings.audit_max_bytes, self.settings.audit_keep
            )
        except OSError as exc:
            raise DeployError(
                f"station folder {folder}: {exc.strerror or exc} (choose another with --station-dir)"
            ) from None
        self.folder = folder
        for decision in replay(self.audit.read(), self.settings.recent):
            self.store.add(StoredDecision(decision, None, None, None))

    def attach(self, state: Any) -> None:
        """Bind to the service's :class:`~patchcore.deploy.service.ServiceState` (at start-up)."""
        self.state = state
        self.predictors = state.predictors
        self.max_upload_bytes = state.settings.max_upload_bytes
        self.max_pixels = state.settings.max_pixels
        self.paths = {n: Path(p) for n, p in state.model_paths.items()}
        names = list(state.names) or list(state.predictors)
        if self.audit is None:
            folder = Path(self.settings.folder) if self.settings.folder else default_folder(self.paths)
            self.open(folder, names)

    def adopt_models(self) -> None:
        """Serve every PyTorch model as a :class:`LearningPredictor` (versioned, updatable): the service
        loads model files as such already; a predictor handed to ``create_app`` is wrapped here."""
        for name, predictor in list(self.predictors.items()):
            if isinstance(predictor, LearningPredictor) or not isinstance(predictor.backend, TorchBackend):
                continue
            path = self.paths.get(name)
            learner = LearningPredictor(
                predictor.backend.model, per_call_range=predictor.per_call_range,
                path=path if path is not None and path.is_file() else None,
            )  # fmt: skip
            if self.state is not None:
                self.state.swap_predictor(name, learner)
            else:
                self.predictors[name] = learner  # type: ignore[index]
        self.adopted.set()

    def start(self, ready: Callable[[], bool] = lambda: True) -> None:
        """Adopt the models and start the watchers once ``ready()`` (the models are loaded)."""

        def run() -> None:
            while not ready():
                if self._stop.wait(0.05):
                    return
            self.adopt_models()
            assert self.folder is not None
            for model, folder in self.watch_folders.items():
                watcher = FolderWatcher(
                    folder, self.folder / f"watch-{model}.jsonl", self._watch_handler(model),
                    poll=self.settings.watch_poll_s, settle=self.settings.watch_settle_s,
                    queue_size=self.settings.watch_queue, max_bytes=self.max_upload_bytes,
                )  # fmt: skip
                watcher.start()
                self.watchers[model] = watcher
                log.info("watching %s for model %s (results: %s)", folder, model, watcher.results)

        if ready():
            run()  # models already loaded: adopted before the first request
        else:
            self._starter = threading.Thread(target=run, name="station-start", daemon=True)
            self._starter.start()

    def stop(self) -> None:
        self._stop.set()
        if self._starter is not None:
            self._starter.join(30)
        for watcher in self.watchers.values():
            watcher.stop()
        self._renderer.shutdown(wait=True)
        if self.audit is not None:
            self.audit.close()

    # ------------------------------------------------------------------ recording decisions

    def predictor(self, model: str | None) -> Predictor:
        if self.state is not None and not self.adopted.is_set():
            raise StationError(503, "models are still loading; see /readyz")
        if model is None:
            if len(self.predictors) == 1:
                return next(iter(self.predictors.values()))
            raise StationError(
                400, f"several models are served: pass model=NAME ({', '.join(self.predictors)})"
            )
        predictor = self.predictors.get(model)
        if predictor is None:
            raise StationError(404, f"unknown model {model!r}; served: {', '.join(self.predictors)}")
        return predictor

    def model_name(self, model: str | None) -> str:
        self.predictor(model)
        return model if model is not None else next(iter(self.predictors))

    def decode(self, data: bytes, name: str) -> PIL.Image.Image:
        return decode_upload(data, self.max_upload_bytes, self.max_pixels, name)

    def _decision(
        self, model: str, prediction: ImagePrediction, image: PIL.Image.Image, name: str, source: str,
        sha256: str | None, path: str | None = None,
    ) -> Decision:  # fmt: skip
        return Decision(
            id=uuid.uuid4().hex[:12],
            time=round(time.time(), 3),
            model=model,
            model_version=int(getattr(prediction, "model_version", 0)),
            image=name,
            source=source,
            sha256=sha256,
            score=float(prediction.score),
            normalized_score=prediction.normalized_score,
            anomalous=prediction.anomalous,
            threshold=prediction.threshold,
            width=image.width,
            height=image.height,
            path=path,
        )

    def _keep(self, item: StoredDecision) -> None:
        assert self.audit is not None
        self.audit.append("decision", decision=item.decision.to_dict())
        self.store.add(item)

    def record(
        self, model: str, image: PIL.Image.Image, prediction: ImagePrediction, name: str, source: str,
        sha256: str | None, path: str | None = None,
    ) -> StoredDecision:  # fmt: skip
        """Keep and log one scored image with its pictures (blocking: call off the event loop)."""
        decision = self._decision(model, prediction, image, name, source, sha256, path)
        thumbnail, heatmap = render_pictures(image, prediction.unit_map)
        # A watched file is read again from disk for feedback; uploads keep their decoded image.
        item = StoredDecision(decision, thumbnail, heatmap, image if source != "watch" else None)
        self._keep(item)
        return item

    def on_scored(
        self, model: str, filename: str, image: PIL.Image.Image, prediction: ImagePrediction
    ) -> None:
        """An image scored through ``/predict``: kept and logged now, its pictures rendered in the background
        (on the event loop: quick; beyond ``RENDER_QUEUE`` waiting, listed without pictures)."""
        if self.audit is None:
            return
        item = StoredDecision(
            self._decision(model, prediction, image, filename, "predict", None), None, None, image
        )
        self._keep(item)
        with self._render_lock:
            if self._rendering >= RENDER_QUEUE:
                return
            self._rendering += 1

        def render() -> None:
            try:
                self.store.set_pictures(item.decision.id, *render_pictures(image, prediction.unit_map))
            finally:
                with self._render_lock:
                    self._rendering -= 1

        try:
            self._renderer.submit(render)
        except RuntimeError:  # shutting down
            with self._render_lock:
                self._rendering -= 1

    def _watch_handler(self, model: str) -> Callable[[WatchedFile, bytes], dict[str, Any]]:
        def handle(file: WatchedFile, data: bytes) -> dict[str, Any]:
            name = file.path.name
            try:
                image = self.decode(data, name)
                prediction = self.predictor(model).predict([image], names=[name])[0]
            except (UploadError, ValueError) as exc:  # not an image; or a score that cannot be computed
                raise SkipFile(str(exc)) from exc
            stored = self.record(model, image, prediction, name, "watch", hashlib.sha256(data).hexdigest(),
                                 str(file.path))  # fmt: skip
            d = stored.decision
            return {
                "id": d.id, "model": d.model, "model_version": d.model_version, "score": d.score,
                "normalized_score": d.normalized_score, "anomalous": d.anomalous, "threshold": d.threshold,
                "sha256": d.sha256,
            }  # fmt: skip

        return handle

    # ------------------------------------------------------------------ feedback

    def _learner(self, model: str) -> LearningPredictor:
        predictor = self.predictor(model)
        if not isinstance(predictor, LearningPredictor):
            runtime = getattr(predictor.backend, "runtime", "exported")
            raise StationError(409, f"model {model!r} cannot learn: it is served by runtime {runtime} "
                                    "(feedback updates need the .pt model, --runtime torch)")  # fmt: skip
        reason = predictor.why_not_learnable()
        if reason:
            raise StationError(409, f"model {model!r} cannot learn: {reason}")
        return predictor

    def _image_of(self, item: StoredDecision) -> PIL.Image.Image:
        d = item.decision
        if item.image is not None:
            return item.image
        data = None
        if d.path is not None:
            with contextlib.suppress(OSError):
                data = Path(d.path).read_bytes()
            if data is not None and hashlib.sha256(data).hexdigest() != d.sha256:
                data = None  # the file was replaced since: not the image that was decided on
        if data is None:
            raise StationError(
                409, f"{d.image}: the image is no longer held (add it with `patchcore update --model M FILE`)"
            )
        return self.decode(data, d.image)

    def _rescored(self, item: StoredDecision, **changes: Any) -> Decision:
        d = item.decision
        prediction = self.predictor(d.model).predict([self._image_of(item)], names=[d.image])[0]
        return dataclasses.replace(
            d,
            rescored_score=float(prediction.score),
            rescored_anomalous=prediction.anomalous,
            rescored_version=int(getattr(prediction, "model_version", 0)),
            **changes,
        )

    def _changed(self, model: str, learner: LearningPredictor) -> None:
        """The service's model list shows the new version's calibration."""
        if self.state is not None:
            self.state.swap_predictor(model, learner)

    def feedback(self, decision_id: str, label: str, force: bool = False, note: str = "") -> dict[str, Any]:
        """Blocking; see the module docstring."""
        if label not in ("good", "defect"):
            raise StationError(400, f"label must be 'good' or 'defect', got {label!r}")
        item = self.store.get(decision_id)
        if item is None:
            raise StationError(
                404, f"decision {decision_id!r} is not among the {self.store.capacity} recent ones"
            )
        d = item.decision
        now = round(time.time(), 3)
        change: ModelChange | None = None
        if label == "defect":
            if d.feedback == "good" and d.feedback_version is not None:
                # A defect had been taught as good: its update is taken out, later ones stay.
                learner = self._learner(d.model)
                change = learner.take_out(d.feedback_version)
                self._changed(d.model, learner)
                new = self._rescored(
                    item, feedback="defect", feedback_time=now, feedback_version=None, forced=False
                )
            else:
                new = dataclasses.replace(d, feedback="defect", feedback_time=now)
        else:
            if d.feedback == "good" and d.feedback_version is not None:
                raise StationError(
                    409, f"{d.image} was already added to the model as version {d.feedback_version}"
                )
            learner = self._learner(d.model)
            image = self._image_of(item)
            note = note or f"station: good part {d.image} (decision {d.id}, score {d.score:.6g})"
            try:
                change = learner.learn([image], note=note, force=force)
            except UpdateRefused as exc:
                assert self.audit is not None
                self.audit.append("feedback-refused", decision_id=d.id, label=label, reason=str(exc))
                raise StationError(409, str(exc), refused=True) from exc
            except NotLearnable as exc:
                raise StationError(409, str(exc)) from exc
            self._changed(d.model, learner)
            new = self._rescored(
                item, feedback="good", feedback_time=now, feedback_version=change.version_after, forced=force
            )
        self.store.update(new)
        assert self.audit is not None
        self.audit.append(
            "feedback", label=label, decision=new.to_dict(), change=change.to_dict() if change else None
        )
        return {"decision": new, "change": change}

    def undo(self, model: str | None) -> dict[str, Any]:
        """Remove the newest update of ``model`` (blocking)."""
        name = self.model_name(model)
        learner = self._learner(name)
        versions = learner.active_updates()
        if not versions:
            raise StationError(409, f"model {name!r} has no update to undo (version {learner.version})")
        newest = versions[-1]
        change = learner.take_out(newest)
        self._changed(name, learner)
        decision = self._clear_feedback(name, newest)
        assert self.audit is not None
        self.audit.append(
            "undo", model=name, decision=decision.to_dict() if decision else None, change=change.to_dict()
        )
        return {"decision": decision, "change": change}

    def _clear_feedback(self, model: str, version: int) -> Decision | None:
        found = self.store.find_by_feedback_version(model, version)
        if found is None:
            return None
        item = self.store.get(found.id)
        assert item is not None
        changes: dict[str, Any] = {
            "feedback": None,
            "feedback_time": None,
            "feedback_version": None,
            "forced": False,
        }
        try:
            new = self._rescored(item, **changes)
        except StationError:  # the image is no longer held: the record still loses its feedback
            new = dataclasses.replace(found, **changes)
        self.store.update(new)
        return new

    def rollback(self, model: str | None, version: int) -> dict[str, Any]:
        name = self.model_name(model)
        learner = self._learner(name)
        before = {int(_field(h, "version")) for h in learner.history()}
        try:
            change = learner.rollback(version)
        except (KeyError, ValueError) as exc:
            raise StationError(400, f"cannot roll {name!r} back to version {version}: {exc}") from exc
        self._changed(name, learner)
        after = {int(_field(h, "version")) for h in learner.history()}
        cleared = [d for v in sorted(before - after) if (d := self._clear_feedback(name, v)) is not None]
        assert self.audit is not None
        self.audit.append("rollback", model=name, change=change.to_dict(), cleared=[d.id for d in cleared])
        for decision in cleared:
            self.audit.append("rollback-feedback", model=name, decision=decision.to_dict())
        return {"change": change, "cleared": cleared}

    def history(self, model: str | None) -> dict[str, Any]:
        name = self.model_name(model)
        predictor = self.predictor(name)
        history = predictor.history() if isinstance(predictor, LearningPredictor) else []
        return {
            "model": name,
            "version": getattr(predictor, "version", 0),
            "history": [_plain(h) for h in history],
        }

    # ------------------------------------------------------------------ views

    def drift(self, model: str | None) -> dict[str, Any]:
        name = self.model_name(model)
        predictor = self.predictor(name)
        figures = drift_figures(
            name, self.store.decisions(name), predictor.calibration, self.settings.drift_window
        )
        return {**figures.to_dict(), "model_version": getattr(predictor, "version", 0)}

    def overview(self) -> dict[str, Any]:
        models = []
        for name, predictor in list(self.predictors.items()):
            updates = 0
            if isinstance(predictor, LearningPredictor):
                reason = predictor.why_not_learnable()
                updates = len(predictor.active_updates()) if reason is None else 0
            else:
                reason = f"served by runtime {getattr(predictor.backend, 'runtime', 'exported')}"
            models.append(
                {
                    "name": name,
                    "version": getattr(predictor, "version", 0),
                    "updates": updates,
                    "learns": reason is None,
                    "why_not": reason,
                    "calibrated": predictor.calibrated,
                    "threshold": predictor.threshold,
                }
            )
        return {
            "models": models,
            "folder": str(self.folder),
            "recent": self.store.capacity,
            "drift_window": self.settings.drift_window,
            "watch": [
                {
                    "model": m,
                    "folder": str(f),
                    "queued": self.watchers[m].pending if m in self.watchers else 0,
                    "scored": self.watchers[m].scored if m in self.watchers else 0,
                    "skipped": self.watchers[m].skipped if m in self.watchers else 0,
                }
                for m, f in self.watch_folders.items()
            ],  # fmt: skip
        }


def default_folder(paths: Mapping[str, Path]) -> Path:
    """``station/`` beside the first model (file or export folder)."""
    first = next(iter(paths.values()), None)
    if first is None:
        raise DeployError("the station needs a folder for its records: --station-dir DIR")
    return first.resolve().parent / "station"


# ---------------------------------------------------------------------- HTTP


def station_router(station: Station) -> Any:
    """The station's routes (FastAPI). The service puts them behind its key; operator-only routes add the
    service's ``require_operator``."""
    router = APIRouter()
    operator = [Depends(require_operator)]

    async def answer(call: Callable[..., Any], *args: Any, build: Callable[[Any], Any] = lambda r: r) -> Any:
        """``build(call(*args))`` run off the event loop; a refusal answers JSON with its status."""
        try:
            result = await asyncio.to_thread(call, *args)
        except StationError as exc:
            return JSONResponse({"detail": str(exc), **exc.extra}, status_code=exc.status)
        except UploadError as exc:
            return JSONResponse({"detail": str(exc)}, status_code=exc.status)
        return build(result)

    def item_of(decision: Decision | None) -> dict[str, Any] | None:
        if decision is None:
            return None
        item = station.store.get(decision.id)
        if item is None:  # dropped from the recent list meanwhile
            return decision.to_dict()
        return decision_json(dataclasses.replace(item, decision=decision), heatmap=True)

    def change_json(result: dict[str, Any]) -> dict[str, Any]:
        change = result.get("change")
        out: dict[str, Any] = {
            "decision": item_of(result.get("decision")),
            "change": change.to_dict() if change else None,
            "version": change.version_after if change else None,
        }
        if "cleared" in result:
            out["cleared"] = [d.id for d in result["cleared"]]
        return out

    @router.get("/station", response_model=None)
    async def overview(who: Annotated[Principal, Depends(authenticate)]) -> Any:
        if station.state is not None and not station.adopted.is_set():
            return JSONResponse({"detail": "models are still loading; see /readyz"}, status_code=503)
        return {**station.overview(), "role": who.role}

    @router.post("/inspect", response_model=None)
    async def inspect(
        file: Annotated[UploadFile, File()], model: Annotated[str | None, Query()] = None
    ) -> Any:
        t0 = time.perf_counter()
        name = (file.filename or "upload").replace("\\", "/").rsplit("/", 1)[-1] or "upload"
        data = await file.read(station.max_upload_bytes + 1)

        def build(stored: StoredDecision) -> dict[str, Any]:
            out = decision_json(stored, heatmap=True)
            out["latency_ms"] = round((time.perf_counter() - t0) * 1000.0, 3)
            return out

        try:
            model_name = station.model_name(model)
            image = await asyncio.to_thread(station.decode, data, name)
        except (StationError, UploadError) as exc:
            return JSONResponse({"detail": str(exc)}, status_code=exc.status)
        if station.state is not None:  # through the service's dynamic batching
            prediction = (await station.state.score(model_name, image)).prediction
        else:
            prediction = await asyncio.to_thread(
                lambda: station.predictor(model_name).predict([image], [name])[0]
            )
        sha = hashlib.sha256(data).hexdigest()
        return await answer(station.record, model_name, image, prediction, name, "upload", sha, build=build)

    @router.get("/decisions")
    async def decisions(
        limit: Annotated[int, Query(ge=1, le=10_000)] = 100, anomalous: Annotated[bool, Query()] = False
    ) -> dict[str, Any]:
        items = station.store.recent(limit, anomalous_only=anomalous)
        return {"decisions": [decision_json(i) for i in items], "held": len(station.store)}

    @router.get("/decisions/{decision_id}")
    async def decision(decision_id: str) -> dict[str, Any]:
        item = station.store.get(decision_id)
        if item is None:
            raise HTTPException(404, f"decision {decision_id!r} is not among the recent ones")
        return decision_json(item, heatmap=True)

    @router.post("/feedback", dependencies=operator, response_model=None)
    async def feedback(
        decision: Annotated[str, Body(max_length=100)], label: Annotated[str, Body(max_length=20)],
        force: Annotated[bool, Body()] = False, note: Annotated[str, Body(max_length=1000)] = "",
    ) -> Any:  # fmt: skip
        return await answer(station.feedback, decision, label, force, note, build=change_json)

    @router.post("/undo", dependencies=operator, response_model=None)
    async def undo(model: Annotated[str | None, Query()] = None) -> Any:
        return await answer(station.undo, model, build=change_json)

    @router.get("/history", response_model=None)
    async def history(model: Annotated[str | None, Query()] = None) -> Any:
        return await answer(station.history, model)

    @router.post("/rollback", dependencies=operator, response_model=None)
    async def rollback(
        version: Annotated[int, Body(ge=0)], model: Annotated[str | None, Body()] = None
    ) -> Any:
        return await answer(station.rollback, model, version, build=change_json)

    @router.get("/drift", response_model=None)
    async def drift(model: Annotated[str | None, Query()] = None) -> Any:
        return await answer(station.drift, model)

    return router


def station_collector(station: Station) -> Any:
    """A Prometheus collector of the station's figures (registered on the service's registry)."""

    def family(name: str, text: str, labels: tuple[str, ...] = ("model",)) -> GaugeMetricFamily:
        return GaugeMetricFamily(name, text, labels=list(labels))

    class Collector:
        def collect(self) -> Any:
            g = {
                "version": family("patchcore_model_version", "served model version"),
                "rate": family("patchcore_drift_anomalous_rate", "anomalous decisions / decisions, drift window"),
                "fa": family("patchcore_drift_false_alarm_rate",
                             "decisions anomalous that the operator marked good / goods, drift window"),
                "fa_low": family("patchcore_drift_false_alarm_rate_ci95_low",
                                 "lower end of that rate's 95% Clopper-Pearson interval"),
                "cal_high": family("patchcore_calibrated_false_alarm_rate_ci95_high",
                                   "upper end of the calibration's 95% interval for its false-alarm rate"),
                "alarm": family("patchcore_drift_alarm",
                                "1 while the goods' false-alarm rate lies above the calibrated interval (95%)"),
                "goods": family("patchcore_drift_goods", "goods (passed or marked good) in the drift window"),
                "quantile": family("patchcore_drift_good_score", "score quantiles of the goods, drift window",
                                   ("model", "quantile")),
                "queued": family("patchcore_watch_queued", "watched files waiting to be scored"),
                "watched": family("patchcore_watch_files", "watched files done since start", ("model", "outcome")),
            }  # fmt: skip
            for name in list(station.predictors):
                try:
                    d = station.drift(name)
                except StationError:
                    continue
                g["version"].add_metric([name], d["model_version"])
                if d["anomalous_rate"] is not None:
                    g["rate"].add_metric([name], d["anomalous_rate"])
                if d["false_alarm_rate"] is not None:
                    g["fa"].add_metric([name], d["false_alarm_rate"])
                    g["fa_low"].add_metric([name], d["false_alarm_rate_ci95"][0])
                if d["calibrated_ci95"] is not None:
                    g["cal_high"].add_metric([name], d["calibrated_ci95"][1])
                g["alarm"].add_metric([name], 1.0 if d["drift_alarm"] else 0.0)
                g["goods"].add_metric([name], d["goods"])
                for q, value in d["good_score_quantiles"].items():
                    g["quantile"].add_metric([name, q], value)
            for name, watcher in list(station.watchers.items()):
                g["queued"].add_metric([name], watcher.pending)
                g["watched"].add_metric([name, "scored"], watcher.scored)
                g["watched"].add_metric([name, "skipped"], watcher.skipped)
            yield from g.values()

    return Collector()


def station_extension(
    station: Station | StationSettings, models: Mapping[str, Path] | None = None
) -> ServiceExtension:
    """The station as a :class:`~patchcore.deploy.service.ServiceExtension`. ``models`` (name -> path, as
    ``patchcore serve`` was given them): the station's folder is opened and ``--watch`` checked now, before
    any model is loaded (a bad folder or name: a one-line :class:`DeployError`)."""
    if isinstance(station, StationSettings):
        station = Station(station)
    if models is not None:
        paths = {name: Path(p) for name, p in models.items()}
        folder = Path(station.settings.folder) if station.settings.folder else default_folder(paths)
        station.open(folder, list(paths))

    def on_result(event: ScoreEvent) -> None:
        station.on_scored(event.model, event.filename, event.image, event.scored.prediction)

    @contextlib.asynccontextmanager
    async def lifespan(state: Any) -> AsyncIterator[None]:
        station.attach(state)
        collector = station_collector(station)
        state.metrics.registry.register(collector)
        station.start(lambda: state.ready.is_set() or state.load_error is not None)
        try:
            yield
        finally:
            await asyncio.to_thread(station.stop)
            state.metrics.registry.unregister(collector)

    # The service loads the model files as LearningPredictors (versioned, updatable under a lock).
    return ServiceExtension(
        router=station_router(station), on_result=on_result, lifespan=lifespan, predictor_class=LearningPredictor
    )
