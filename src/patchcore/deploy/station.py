"""The inspection station: what an operator runs a shift on, behind the service's key.

- ``POST /inspect``: score an image as the station (the page's drop zone): the decision is kept in the
  recent list (thumbnail, heatmap) and appended to the audit log;
- ``GET /decisions`` (newest first, ``?anomalous=true`` filters), ``GET /decisions/{id}`` (with heatmap);
- ``POST /feedback`` (operator): ``{"decision": ID, "label": "good" | "defect", "force": false}``. "good"
  adds the image to the model (``partial_fit``), swaps the served model atomically, saves the model file
  and answers the image scored again by the new version; the guard against teaching a defect answers
  409 with ``"refused": true`` (the page asks the operator to confirm, then sends ``force``). "defect"
  is recorded (drift figures, audit log); on a decision that had been taught as good it also removes
  that update;
- ``POST /undo`` (operator): removes the newest update; ``GET /history``; ``POST /rollback`` (operator);
- ``GET /drift``: the drift figures (:mod:`patchcore.deploy.drift`), also exported on ``/metrics``;
- ``GET /station``: models with their versions, the caller's role, the watched folders;
- watched folders (``patchcore serve --watch DIR``): :mod:`patchcore.deploy.watch`.

The station keeps its files (``audit.jsonl`` and its rotations, ``watch-<model>.jsonl``) in its folder.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import io
import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import PIL.Image

from ..heatmaps import overlay
from .audit import AuditLog, Decision, DecisionStore, StoredDecision, replay
from .drift import drift_figures
from .errors import DeployError
from .inference import Predictor
from .learning import LearningPredictor, NotLearnable
from .uploads import UploadError, decode_upload
from .watch import FolderWatcher, SkipFile, WatchedFile

try:
    from ..engine.model import UpdateRefused
except ImportError:  # pragma: no cover - before line learning (PatchCore.partial_fit) is available

    class UpdateRefused(ValueError):  # type: ignore[no-redef]
        """Never raised: without partial_fit no update is tried (NotLearnable says why)."""


__all__ = ["Station", "StationError", "StationSettings", "station_router"]

log = logging.getLogger("patchcore")

THUMBNAIL_SIDE = 96
HEATMAP_SIDE = 512


class StationError(Exception):
    """A station request that is refused: ``status`` is the HTTP status, ``extra`` goes into the answer."""

    def __init__(self, status: int, message: str, **extra: Any):
        super().__init__(message)
        self.status = status
        self.extra = extra


@dataclass(frozen=True)
class StationSettings:
    """How the station keeps its records and watches folders (``patchcore serve`` flags)."""

    folder: str | None = None  # None: a "station" folder beside the first model
    recent: int = 500  # decisions kept in memory (the page's list)
    image_budget_bytes: int = 256 * 1024 * 1024  # uploaded images kept for feedback, all together
    audit_max_bytes: int = 10 * 1024 * 1024  # the audit log is rotated past this size
    audit_keep: int = 5  # rotated audit files kept
    drift_window: int = 200  # decisions the drift figures look at
    watch: tuple[str, ...] = ()  # "[MODEL=]DIR"
    watch_poll_s: float = 0.5
    watch_settle_s: float = 1.0  # a file's size and mtime must stay unchanged this long
    watch_queue: int = 64

    def __post_init__(self) -> None:
        checks = [
            (self.recent >= 1, f"--station-recent must be >= 1, got {self.recent}"),
            (self.image_budget_bytes >= 0, "the station's image budget must be >= 0"),
            (self.audit_max_bytes >= 1024, "--audit-max-mb must be at least 1 KiB"),
            (self.audit_keep >= 1, f"the audit log must keep >= 1 rotated file, got {self.audit_keep}"),
            (self.drift_window >= 1, f"--drift-window must be >= 1, got {self.drift_window}"),
            (0 < self.watch_poll_s <= 60, f"--watch-poll must be in (0, 60] s, got {self.watch_poll_s}"),
            (0 <= self.watch_settle_s <= 3600, f"--watch-settle must be in [0, 3600] s, got {self.watch_settle_s}"),
            (1 <= self.watch_queue <= 100_000, f"--watch-queue must be in 1..100000, got {self.watch_queue}"),
        ]  # fmt: skip
        for ok, message in checks:
            if not ok:
                raise DeployError(message)


def parse_watch_specs(specs: tuple[str, ...] | list[str], models: list[str]) -> dict[str, Path]:
    """``[MODEL=]DIR`` -> {model: folder}; checked up front (one line per problem)."""
    out: dict[str, Path] = {}
    for spec in specs:
        name, sep, folder = spec.partition("=")
        if not sep or not name or "/" in name or name not in models and Path(spec).is_dir():
            name, folder = "", spec
        if not name:
            if len(models) != 1:
                raise DeployError(f"--watch {spec}: several models are served, say which: --watch MODEL=DIR")
            name = models[0]
        if name not in models:
            raise DeployError(f"--watch {spec}: no served model is named {name!r} ({', '.join(models)})")
        path = Path(folder)
        if not path.is_dir():
            raise DeployError(f"--watch {spec}: {path} is not a folder")
        if name in out:
            raise DeployError(f"--watch: model {name!r} is given two folders; one folder per model")
        out[name] = path
    return out


def _png(image: PIL.Image.Image, side: int) -> bytes:
    image = image.copy()
    image.thumbnail((side, side))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode("ascii")


class Station:
    """The station's state: recent decisions, the audit log, feedback on the served models, watchers,
    drift. ``predictors`` is the service's live name -> predictor mapping (filled once models load)."""

    def __init__(
        self,
        settings: StationSettings,
        predictors: Mapping[str, Predictor],
        model_paths: Mapping[str, Path],
        max_upload_bytes: int = 20 * 1024 * 1024,
        max_pixels: int = 40_000_000,
    ):
        self.settings = settings
        self.predictors = predictors
        self.max_upload_bytes = max_upload_bytes
        self.max_pixels = max_pixels
        names = list(model_paths) or list(predictors)
        self.watch_folders = parse_watch_specs(settings.watch, names)
        if settings.folder is not None:
            self.folder = Path(settings.folder)
        else:
            first = next(iter(model_paths.values()), None)
            if first is None:
                raise DeployError("the station needs a folder for its records (--station-dir)")
            self.folder = (first.parent if first.is_file() else first.parent) / "station"
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self.audit = AuditLog(self.folder / "audit.jsonl", settings.audit_max_bytes, settings.audit_keep)
        except OSError as exc:
            raise DeployError(f"station folder {self.folder}: {exc.strerror or exc}") from None
        self.store = DecisionStore(settings.recent, settings.image_budget_bytes)
        for decision in replay(self.audit.read(), settings.recent):
            self.store.add(StoredDecision(decision, None, None, None))
        self.watchers: dict[str, FolderWatcher] = {}
        self._stop = threading.Event()
        self._starter: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self, ready: Callable[[], bool] = lambda: True) -> None:
        """Start the watchers once ``ready()`` (the models are loaded)."""

        def run() -> None:
            while not ready():
                if self._stop.wait(0.1):
                    return
            for model, folder in self.watch_folders.items():
                watcher = FolderWatcher(
                    folder, self.folder / f"watch-{model}.jsonl", self._watch_handler(model),
                    poll=self.settings.watch_poll_s, settle=self.settings.watch_settle_s,
                    queue_size=self.settings.watch_queue, max_bytes=self.max_upload_bytes,
                )  # fmt: skip
                watcher.start()
                self.watchers[model] = watcher
                log.info("watching %s for model %s (results: %s)", folder, model, watcher.results)

        self._starter = threading.Thread(target=run, name="station-start", daemon=True)
        self._starter.start()

    def stop(self) -> None:
        self._stop.set()
        if self._starter is not None:
            self._starter.join(30)
        for watcher in self.watchers.values():
            watcher.stop()
        self.audit.close()

    # ------------------------------------------------------------------ scoring

    def predictor(self, model: str | None) -> Predictor:
        if model is None:
            if len(self.predictors) == 1:
                model = next(iter(self.predictors))
            else:
                raise StationError(
                    400, f"several models are served: pass model=NAME ({', '.join(self.predictors)})"
                )
        predictor = self.predictors.get(model)
        if predictor is None:
            raise StationError(
                404, f"unknown or not yet loaded model {model!r}; served: {', '.join(self.predictors)}"
            )
        return predictor

    def model_name(self, model: str | None) -> str:
        if model is None:
            self.predictor(None)
            return next(iter(self.predictors))
        self.predictor(model)
        return model

    def decode(self, data: bytes, name: str) -> PIL.Image.Image:
        return decode_upload(data, self.max_upload_bytes, self.max_pixels, name)

    def inspect(self, model: str | None, data: bytes, name: str) -> StoredDecision:
        """An uploaded image scored and recorded (the page's drop zone; blocking)."""
        model_name = self.model_name(model)
        return self.record(model_name, self.decode(data, name), data, name, "upload")

    def record(
        self, model: str, image: PIL.Image.Image, data: bytes, name: str, source: str, path: str | None = None
    ) -> StoredDecision:
        """Score ``image`` with ``model``, keep the decision and log it (blocking: call off the event loop)."""
        predictor = self.predictor(model)
        prediction = predictor.predict([image], names=[name])[0]
        decision = Decision(
            id=uuid.uuid4().hex[:12],
            time=round(time.time(), 3),
            model=model,
            model_version=int(getattr(prediction, "model_version", 0)),
            image=name,
            source=source,
            sha256=hashlib.sha256(data).hexdigest(),
            score=float(prediction.score),
            normalized_score=prediction.normalized_score,
            anomalous=prediction.anomalous,
            threshold=prediction.threshold,
            width=image.width,
            height=image.height,
            path=path,
        )
        stored = StoredDecision(
            decision,
            thumbnail_png=_png(image, THUMBNAIL_SIDE),
            heatmap_png=_png(overlay(image, prediction.unit_map), HEATMAP_SIDE),
            image_bytes=data if source == "upload" else None,
        )
        self.audit.append("decision", decision=decision.to_dict())
        self.store.add(stored)
        return stored

    def _watch_handler(self, model: str) -> Callable[[WatchedFile, bytes], dict[str, Any]]:
        def handle(file: WatchedFile, data: bytes) -> dict[str, Any]:
            try:
                image = self.decode(data, file.path.name)
                stored = self.record(model, image, data, file.path.name, "watch", str(file.path))
            except (UploadError, ValueError) as exc:  # not an image; or a score that cannot be computed
                raise SkipFile(str(exc)) from exc
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
            raise StationError(
                409, f"model {model!r} is not served for learning (feedback needs --runtime torch)"
            )
        reason = predictor.why_not_learnable()
        if reason:
            raise StationError(409, f"model {model!r} cannot learn: {reason}")
        return predictor

    def _image_of(self, item: StoredDecision) -> PIL.Image.Image:
        d = item.decision
        data = item.image_bytes
        if data is None and d.path is not None:
            try:
                data = Path(d.path).read_bytes()
            except OSError:
                data = None
            if data is not None and hashlib.sha256(data).hexdigest() != d.sha256:
                data = None  # the file was replaced since: not the image that was decided on
        if data is None:
            raise StationError(
                409, f"{d.image}: the image is no longer held (add it with `patchcore update --model M FILE`)"
            )
        return self.decode(data, d.image)

    def _rescored(self, model: str, item: StoredDecision, **changes: Any) -> Decision:
        image = self._image_of(item)
        prediction = self.predictor(model).predict([image], names=[item.decision.image])[0]
        return dataclasses.replace(
            item.decision,
            rescored_score=float(prediction.score),
            rescored_anomalous=prediction.anomalous,
            rescored_version=int(getattr(prediction, "model_version", 0)),
            **changes,
        )

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
        change = None
        if label == "defect":
            if d.feedback == "good" and d.feedback_version is not None:
                # A defect had been taught as good: its update is taken out, later ones stay.
                learner = self._learner(d.model)
                change = learner.remove_update(d.feedback_version)
                new = self._rescored(
                    d.model, item, feedback="defect", feedback_time=now, feedback_version=None, forced=False
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
                self.audit.append("feedback-refused", decision_id=d.id, label=label, reason=str(exc))
                raise StationError(409, str(exc), refused=True) from exc
            except NotLearnable as exc:
                raise StationError(409, str(exc)) from exc
            new = self._rescored(
                d.model, item, feedback="good", feedback_time=now, feedback_version=change.version_after,
                forced=force,
            )  # fmt: skip
        self.store.update(new)
        self.audit.append(
            "feedback", label=label, decision=new.to_dict(), change=change.to_dict() if change else None
        )
        return {"decision": new, "change": change}

    def undo(self, model: str | None) -> dict[str, Any]:
        """Remove the newest update of ``model`` (blocking)."""
        name = self.model_name(model)
        learner = self._learner(name)
        history = learner.history()
        versions = [int(_field(h, "version")) for h in history if int(_field(h, "version")) > 0]
        if not versions:
            raise StationError(409, f"model {name!r} has no update to undo (version {learner.version})")
        newest = max(versions)
        change = learner.remove_update(newest)
        decision = self._clear_feedback(name, newest)
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
            new = self._rescored(model, item, **changes)
        except StationError:  # the image is no longer held: the record still loses its feedback
            new = dataclasses.replace(found, **changes)
        self.store.update(new)
        return new

    def rollback(self, model: str | None, version: int) -> dict[str, Any]:
        name = self.model_name(model)
        learner = self._learner(name)
        before = learner.version
        try:
            change = learner.rollback(version)
        except (KeyError, ValueError) as exc:
            raise StationError(400, f"cannot roll {name!r} back to version {version}: {exc}") from exc
        cleared = []
        for h in learner_history_versions(before, version):
            decision = self._clear_feedback(name, h)
            if decision is not None:
                cleared.append(decision)
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
            reason = (
                predictor.why_not_learnable() if isinstance(predictor, LearningPredictor) else "not learnable"
            )
            models.append(
                {
                    "name": name,
                    "version": getattr(predictor, "version", 0),
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


def learner_history_versions(before: int, after: int) -> list[int]:
    """The versions a rollback from ``before`` to ``after`` removed."""
    return list(range(after + 1, before + 1))


def _field(record: Any, name: str) -> Any:
    return record[name] if isinstance(record, dict) else getattr(record, name)


def _plain(record: Any) -> Any:
    if dataclasses.is_dataclass(record) and not isinstance(record, type):
        return dataclasses.asdict(record)
    return record


def decision_json(item: StoredDecision, heatmap: bool = False, thumbnail: bool = True) -> dict[str, Any]:
    out = item.decision.to_dict()
    out["image_held"] = item.image_bytes is not None or item.decision.path is not None
    if thumbnail:
        out["thumbnail_png_base64"] = _b64(item.thumbnail_png)
    if heatmap:
        out["heatmap_png_base64"] = _b64(item.heatmap_png)
    return out


# ---------------------------------------------------------------------- HTTP


def station_router(
    station: Station,
    role: Callable[..., Any] | None = None,
    require_operator: Callable[..., Any] | None = None,
) -> Any:
    """The station's routes as a FastAPI router. The service mounts it behind its key; ``role`` is the
    dependency that names the caller's role, ``require_operator`` the one that refuses a viewer."""
    from fastapi import APIRouter, Body, Depends, File, HTTPException, Query, UploadFile
    from fastapi.responses import JSONResponse

    router = APIRouter()
    operator = [Depends(require_operator)] if require_operator is not None else []

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
        out = {
            "decision": item_of(result.get("decision")),
            "change": change.to_dict() if change else None,
            "version": change.version_after if change else None,
        }
        if "cleared" in result:
            out["cleared"] = [d.id for d in result["cleared"]]
        return out

    if role is not None:

        async def caller_role(who: Annotated[Any, Depends(role)]) -> str:
            return str(getattr(who, "value", who))

    else:

        async def caller_role() -> str:
            return "operator"

    @router.get("/station")
    async def overview(who: Annotated[str, Depends(caller_role)]) -> dict[str, Any]:
        return {**station.overview(), "role": who}

    @router.post("/inspect", response_model=None)
    async def inspect(
        file: Annotated[UploadFile, File()], model: Annotated[str | None, Query()] = None
    ) -> Any:
        t0 = time.perf_counter()
        name = (file.filename or "upload").replace("\\", "/").rsplit("/", 1)[-1]
        data = await file.read(station.max_upload_bytes + 1)

        def build(stored: StoredDecision) -> dict[str, Any]:
            out = decision_json(stored, heatmap=True)
            out["latency_ms"] = round((time.perf_counter() - t0) * 1000.0, 3)
            return out

        return await answer(station.inspect, model, data, name, build=build)

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
    """A Prometheus collector of the station's figures (register it on the service's registry)."""
    from prometheus_client.core import GaugeMetricFamily

    class Collector:
        def collect(self) -> Any:
            gauges = {
                "version": GaugeMetricFamily("patchcore_model_version", "served model version", labels=["model"]),
                "rate": GaugeMetricFamily(
                    "patchcore_drift_anomalous_rate", "anomalous decisions / decisions over the drift window",
                    labels=["model"],
                ),
                "fa": GaugeMetricFamily(
                    "patchcore_drift_false_alarm_rate",
                    "decisions anomalous that the operator marked good / goods, over the drift window",
                    labels=["model"],
                ),
                "fa_low": GaugeMetricFamily(
                    "patchcore_drift_false_alarm_rate_ci95_low", "lower end of its 95% Clopper-Pearson interval",
                    labels=["model"],
                ),
                "cal_high": GaugeMetricFamily(
                    "patchcore_calibrated_false_alarm_rate_ci95_high",
                    "upper end of the calibration's 95% interval for its false-alarm rate", labels=["model"],
                ),
                "alarm": GaugeMetricFamily(
                    "patchcore_drift_alarm",
                    "1 while the goods' false-alarm rate lies above the calibrated interval (95%)",
                    labels=["model"],
                ),
                "goods": GaugeMetricFamily("patchcore_drift_goods", "goods in the drift window", labels=["model"]),
                "quantile": GaugeMetricFamily(
                    "patchcore_drift_good_score", "score quantiles of the goods in the drift window",
                    labels=["model", "quantile"],
                ),
                "watch_queue": GaugeMetricFamily(
                    "patchcore_watch_queued", "watched files waiting to be scored", labels=["model"]
                ),
            }  # fmt: skip
            for name in list(station.predictors):
                try:
                    d = station.drift(name)
                except StationError:
                    continue
                gauges["version"].add_metric([name], d["model_version"])
                if d["anomalous_rate"] is not None:
                    gauges["rate"].add_metric([name], d["anomalous_rate"])
                if d["false_alarm_rate"] is not None:
                    gauges["fa"].add_metric([name], d["false_alarm_rate"])
                    gauges["fa_low"].add_metric([name], d["false_alarm_rate_ci95"][0])
                if d["calibrated_ci95"] is not None:
                    gauges["cal_high"].add_metric([name], d["calibrated_ci95"][1])
                gauges["alarm"].add_metric([name], 1.0 if d["drift_alarm"] else 0.0)
                gauges["goods"].add_metric([name], d["goods"])
                for q, value in d["good_score_quantiles"].items():
                    gauges["quantile"].add_metric([name, q], value)
            for name, watcher in list(station.watchers.items()):
                gauges["watch_queue"].add_metric([name], watcher.pending)
            yield from gauges.values()

    return Collector()
