"""``patchcore serve``: a REST service (FastAPI + uvicorn) over one or more models, with dynamic
batching, Prometheus metrics, Bearer-key auth with two roles and a web page at ``/``.

Safe by default: :class:`RequestGuard`, an ASGI middleware in front of everything, answers every request
whose path is not in :data:`PUBLIC_PATHS` (the one place public routes are declared) with 401 unless it
carries a key, before any byte of its body is read; it bounds the body while it streams (chunked or
not), checks ``Host`` / ``Origin`` on a key-less server, and labels the metrics by route template. A route
added anywhere (this module's router, an extension's router, even ``app.get`` on the built app) is behind
the key without saying so.

Roles: the operator key (``--api-key-file``) may do everything; the optional viewer key
(``--viewer-key-file``) may score and look. A route that changes the served model or its records adds
``Depends(require_operator)`` (403 for a viewer). A key-less server treats every caller as the operator
(it is meant for loopback, where ``Host`` is checked).

Extensions (the inspection station): ``create_app(models, settings, extensions=[ServiceExtension(...)])``
adds protected routers, a listener called with every scored image, and a lifespan context for background
tasks, without editing this module.

FastAPI, uvicorn and prometheus-client are the ``serve`` extra: imported here, and this module is
imported only by ``patchcore serve``, so the core package works without them.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import io
import json
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import numpy as np
import PIL.Image

from .errors import DeployError

try:
    from fastapi import APIRouter, Depends, FastAPI, File, HTTPException, Query, Request, UploadFile
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from prometheus_client import (
        CONTENT_TYPE_LATEST,
        CollectorRegistry,
        Counter,
        Gauge,
        Histogram,
        generate_latest,
    )
    from starlette.routing import Match
    from starlette.types import Message, Receive, Scope, Send
except ImportError as exc:  # pragma: no cover - the extra is installed in CI
    raise DeployError("patchcore serve needs the 'serve' extra: pip install 'patchcore[serve]'") from exc

from ..heatmaps import overlay
from .batching import DynamicBatcher, PixelBudget
from .inference import ImagePrediction, Predictor
from .settings import RENDER_COST, ServiceSettings
from .uploads import UploadError, declared_pixels, decode_upload
from .webpage import PAGE

__all__ = [
    "PUBLIC_PATHS",
    "LoadedModel",
    "Principal",
    "RequestGuard",
    "ScoreEvent",
    "Scored",
    "ServiceExtension",
    "ServiceSettings",
    "ServiceState",
    "authenticate",
    "create_app",
    "get_state",
    "parse_model_specs",
    "require_operator",
    "run_service",
]

log = logging.getLogger("patchcore")

#: The only paths answered without a key: the liveness probe and the page shell (which holds no data).
PUBLIC_PATHS = frozenset({"/healthz", "/"})
#: Routes whose body may hold ``max_files`` uploads; every other route takes one upload at most.
BATCH_PATHS = frozenset({"/predict/batch"})
#: The metrics label of a path that matches no route (a fixed label: unknown paths add no series).
UNKNOWN_ROUTE = "other"
#: Seconds a stopping server (SIGTERM, Ctrl-C) waits for requests in flight before cancelling them.
SHUTDOWN_GRACE_S = 5.0
#: The status of a request whose client went away before its answer (nginx's convention; never sent).
CLIENT_GONE = 499
_LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})
_WILDCARD = frozenset({"0.0.0.0", "::", ""})  # noqa: S104 - names, not a bind


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Principal:
    """Who a request acts for: ``operator`` (everything) or ``viewer`` (score and look)."""

    role: Literal["operator", "viewer"]

    @property
    def is_operator(self) -> bool:
        return self.role == "operator"


OPERATOR = Principal("operator")
VIEWER = Principal("viewer")


@dataclass(frozen=True)
class LoadedModel:
    """A model loaded (and warmed up) before the app is built, with the file it came from."""

    predictor: Predictor
    path: Path


@dataclass(frozen=True)
class Scored:
    """One image's prediction and the predictor that made it (a swapped model never mixes into an answer)."""

    prediction: ImagePrediction
    predictor: Predictor


@dataclass(frozen=True)
class ScoreEvent:
    """What an extension's ``on_result`` hears after every image scored through a route."""

    model: str
    filename: str
    image: PIL.Image.Image
    scored: Scored
    record: Mapping[str, Any]  # the JSON answered for this image
    principal: Principal


@dataclass(frozen=True)
class ServiceExtension:
    """Protected routes and hooks added to the service by another module (e.g. the inspection station).

    ``router``: included behind the guard (add ``Depends(require_operator)`` to operator-only routes);
    ``on_result``: called on the event loop after every image scored by a route (keep it quick);
    ``lifespan``: an async context manager factory entered at start-up with the :class:`ServiceState`
    (start background tasks) and left at shutdown; ``predictor_class``: the :class:`Predictor` subclass
    that loads the served model files (its ``load`` has Predictor's signature; at most one extension sets it).
    """

    router: APIRouter | None = None
    on_result: Callable[[ScoreEvent], None] | None = None
    lifespan: Callable[[ServiceState], contextlib.AbstractAsyncContextManager[Any]] | None = None
    predictor_class: type[Predictor] | None = None


def _predictor_class(extensions: Sequence[ServiceExtension]) -> type[Predictor]:
    classes = [e.predictor_class for e in extensions if e.predictor_class is not None]
    if len(classes) > 1:
        raise DeployError(f"several extensions set the predictor class: {[c.__name__ for c in classes]}")
    return classes[0] if classes else Predictor


# --------------------------------------------------------------------------- helpers


def parse_model_specs(specs: list[str]) -> dict[str, Path]:
    """``NAME=PATH`` or ``PATH`` (name: the file stem without ``patchcore_``, or the folder name)."""
    models: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            path, name = spec, ""
        p = Path(path)
        if not p.exists():
            raise DeployError(f"model {p} does not exist")
        name = name or (p.stem if p.is_file() else p.name).removeprefix("patchcore_")
        if not name or name in models:
            raise DeployError(f"model name {name!r} is empty or given twice: name them with NAME=PATH")
        models[name] = p
    if not models:
        raise DeployError("no model given")
    return models


def read_api_key(path: str | None, flag: str = "--api-key-file") -> bytes | None:
    """The key in ``path`` (stripped), or a one-line :class:`DeployError` naming the file."""
    if path is None:
        return None
    p = Path(path)
    if p.is_dir():
        raise DeployError(f"{flag} {p} is a folder, not a file holding the key")
    if not p.is_file():
        raise DeployError(f"{flag} {p} does not exist")
    try:
        key = p.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise DeployError(f"{flag} {p} cannot be read as text: {exc}") from None
    if len(key) < 16:
        raise DeployError(f"the key in {flag} {p} is shorter than 16 characters")
    if any(c.isspace() for c in key):
        raise DeployError(f"the key in {flag} {p} holds white space (one line, no spaces)")
    return key.encode()


def read_keys(settings: ServiceSettings) -> dict[bytes, Principal]:
    """The keys a request may carry and the principal each stands for (empty: a key-less server)."""
    operator = read_api_key(settings.api_key_file)
    viewer = read_api_key(settings.viewer_key_file, "--viewer-key-file")
    if viewer is not None and operator is None:
        raise DeployError("--viewer-key-file needs --api-key-file (the operator's key) too")
    if viewer is not None and hmac.compare_digest(viewer, operator or b""):
        raise DeployError("the viewer key and the operator key are the same: give the viewer its own")
    keys: dict[bytes, Principal] = {}
    if operator is not None:
        keys[operator] = OPERATOR
    if viewer is not None:
        keys[viewer] = VIEWER
    return keys


def allowed_host_names(settings: ServiceSettings) -> frozenset[str] | None:
    """The ``Host`` names a key-less server answers to; None: any (a wildcard bind, warned about)."""
    host = settings.host.strip("[]").lower()
    if host in _WILDCARD:
        return None
    names = {host, *(h.lower().strip("[]") for h in settings.allowed_hosts)}
    if host in _LOOPBACK:
        names |= _LOOPBACK
    return frozenset(names)


def _host_name(value: str) -> str:
    """``example.com:8000`` -> ``example.com``; ``[::1]:8000`` -> ``::1``."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def _png_base64(image: PIL.Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _training_metrics(path: Path) -> dict[str, Any]:
    """The metrics ``patchcore train`` wrote beside a model file (patchcore_<object>.json), if any."""
    side = path.with_suffix(".json") if path.is_file() else None
    if side is None or not side.is_file():
        return {}
    try:
        return dict(json.loads(side.read_text()).get("metrics") or {})
    except (ValueError, OSError, AttributeError):
        return {}


def _model_info(predictor: Predictor, path: Path | None) -> dict[str, Any]:
    info = predictor.info()
    if path is not None:
        info["metrics"] = _training_metrics(path)
        info["path"] = str(path)
    return info


def load_model(
    name: str, path: Path, settings: ServiceSettings, predictor_class: type[Predictor] = Predictor
) -> LoadedModel:
    """Load and warm up one model; any failure is a one-line :class:`DeployError` naming the file."""
    try:
        predictor = predictor_class.load(
            path, device=settings.device, runtime=settings.runtime, per_call_range=False,
            threads=settings.threads,
        )  # fmt: skip
        # Warm-up: the extractor, the index and the runtime's kernels are built before traffic.
        size = predictor.info().get("input_size") or [224, 224]
        predictor.predict([PIL.Image.new("RGB", (int(size[1]), int(size[0])))], names=["warm-up"])
    except Exception as exc:  # noqa: BLE001 - every loader's own error type (torch, onnxruntime, openvino)
        message = " ".join(str(exc).split()) or type(exc).__name__
        raise DeployError(f"cannot load model {name!r} from {path} ({settings.runtime}): {message}") from exc
    return LoadedModel(predictor, path)


# --------------------------------------------------------------------------- state


class _Metrics:
    """Prometheus metrics in a registry of this app's own (several apps in one process stay apart)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "patchcore_requests", "HTTP requests answered", ["endpoint", "status"], registry=self.registry
        )
        self.errors = Counter(
            "patchcore_errors",
            "requests answered with an error",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "patchcore_request_latency_seconds", "request latency", ["endpoint"], registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
        )  # fmt: skip
        self.body_bytes = Counter(
            "patchcore_request_body_bytes", "request body bytes read by the server", ["endpoint"],
            registry=self.registry,
        )  # fmt: skip
        self.batch_size = Histogram(
            "patchcore_batch_size", "images per model call (dynamic batching)", ["model"], registry=self.registry,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
        )  # fmt: skip
        self.images = Counter("patchcore_images", "images scored", ["model"], registry=self.registry)
        self.pixels_in_flight = Gauge(
            "patchcore_pixels_in_flight", "decoded pixels of the requests at work (a heatmap counts more)",
            registry=self.registry,
        )  # fmt: skip
        self.dropped = Counter(
            "patchcore_dropped_requests", "requests whose client went away before the answer", ["endpoint"],
            registry=self.registry,
        )  # fmt: skip


class ServiceState:
    """Everything one app serves: its models, batchers, keys, metrics and extensions' listeners."""

    def __init__(
        self, settings: ServiceSettings, keys: dict[bytes, Principal], to_load: dict[str, Path],
        listeners: Sequence[Callable[[ScoreEvent], None]] = (), predictor_class: type[Predictor] = Predictor,
    ):  # fmt: skip
        self.settings = settings
        self.keys = keys
        self._to_load = to_load  # models still to load in the background
        self.predictor_class = predictor_class
        self.names: list[str] = []  # every served model, in the order given
        self.model_paths: dict[str, Path] = dict(to_load)  # name -> the file or folder it was loaded from
        self.predictors: dict[str, Predictor] = {}
        self.batchers: dict[str, DynamicBatcher] = {}
        self.info: dict[str, dict[str, Any]] = {}
        self.metrics = _Metrics()
        self.pixels = PixelBudget(settings.max_pixels_in_flight)
        self.metrics.pixels_in_flight.set_function(lambda: self.pixels.used)
        self.listeners = list(listeners)
        self.ready = threading.Event()
        self.load_error: str | None = None
        self.allowed_hosts = allowed_host_names(settings) if not keys else None
        self.routes: list[Any] = []  # the app's routes, for the metrics' route-template labels

    # ---- models

    def pick_model(self, name: str | None) -> str:
        if self.load_error:
            raise HTTPException(503, f"models failed to load: {self.load_error}")
        if not self.ready.is_set():
            raise HTTPException(503, "models are still loading; see /readyz")
        if name is None:
            if len(self.predictors) == 1:
                return next(iter(self.predictors))
            raise HTTPException(
                400, f"several models are served: pass ?model=NAME ({', '.join(self.predictors)})"
            )
        if name not in self.predictors:
            raise HTTPException(404, f"unknown model {name!r}; served: {', '.join(self.predictors)}")
        return name

    def swap_predictor(self, name: str, predictor: Predictor, info: dict[str, Any] | None = None) -> None:
        """Serve ``predictor`` as ``name`` from the next batch on (a batch in progress keeps its own)."""
        if name not in self.predictors:
            raise KeyError(name)
        self.info[name] = {**self.info[name], **(info if info is not None else predictor.info())}
        self.predictors[name] = predictor

    def _run_batch(self, name: str) -> Callable[[Sequence[PIL.Image.Image]], list[Scored]]:
        def run(images: Sequence[PIL.Image.Image]) -> list[Scored]:
            predictor = self.predictors[name]  # one predictor for the whole batch
            predictions = predictor.predict(list(images), names=[f"upload{i}" for i in range(len(images))])
            return [Scored(p, predictor) for p in predictions]

        return run

    async def score(self, name: str, image: PIL.Image.Image) -> Scored:
        """Score one image with the served model ``name`` (dynamic batching with concurrent callers)."""
        result: Scored = await self.batchers[name].submit(image)
        self.metrics.images.labels(name).inc()
        return result

    def _load_in_background(self) -> None:
        try:
            for name, path in self._to_load.items():
                t0 = time.perf_counter()
                loaded = load_model(name, path, self.settings, self.predictor_class)
                self.info[name] = _model_info(loaded.predictor, path)
                self.predictors[name] = loaded.predictor
                log.info("model %s ready (%s, %.1f s): %s", name, self.settings.runtime,
                         time.perf_counter() - t0, loaded.predictor.describe())  # fmt: skip
            self.ready.set()
        except Exception as exc:  # noqa: BLE001 - reported by /healthz, /readyz and the log
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.error("model loading failed: %s", self.load_error)

    # ---- requests

    def principal_for(self, authorization: str) -> Principal | None:
        """The principal a request's ``Authorization`` header stands for (None: refused)."""
        if not self.keys:
            return OPERATOR
        scheme, _, token = authorization.partition(" ")
        presented = token.strip().encode()
        found = None
        for key, principal in self.keys.items():
            # Constant-time comparison, against every key: the time says nothing about which or how much matched.
            if hmac.compare_digest(presented, key):
                found = principal
        return found if scheme.lower() == "bearer" else None

    def route_label(self, scope: Scope) -> str:
        """The route template a request matches (``/items/{id}``), or :data:`UNKNOWN_ROUTE`."""
        partial = None
        for route in self.routes:
            match, child = route.matches(scope)
            if match == Match.NONE:
                continue
            # A router included with ``app.include_router`` may be one lazy route without a template.
            template = getattr(route, "path", None) or getattr(child.get("route"), "path", None) or UNKNOWN_ROUTE
            if match == Match.FULL:
                return str(template)
            partial = partial or str(template)  # the path exists, not for this method
        return partial or UNKNOWN_ROUTE

    def body_limit(self, label: str) -> int:
        settings = self.settings
        return settings.max_batch_body_bytes if label in BATCH_PATHS else settings.max_body_bytes

    def notify(self, event: ScoreEvent) -> None:
        for listener in self.listeners:
            try:
                listener(event)
            except Exception:  # noqa: BLE001 - a listener's failure never fails the request
                log.exception("a score listener failed")


def get_state(request: Request) -> ServiceState:
    """The :class:`ServiceState` of the app serving ``request`` (a dependency for extension routes)."""
    return request.app.state.patchcore


def authenticate(request: Request) -> Principal:
    """The principal the guard let in (a dependency; the guard has already refused everyone else)."""
    principal = request.scope.get("state", {}).get("principal")
    if not isinstance(principal, Principal):  # pragma: no cover - only without the guard in front
        raise HTTPException(401, "missing or wrong API key", headers={"WWW-Authenticate": "Bearer"})
    return principal


def require_operator(principal: Annotated[Principal, Depends(authenticate)]) -> Principal:
    """A dependency for operator-only routes: 403 for the viewer key."""
    if not principal.is_operator:
        raise HTTPException(403, "this needs the operator key; the viewer key may only score and look")
    return principal


# --------------------------------------------------------------------------- the guard


class _BodyTooLarge(Exception):
    pass


class RequestGuard:
    """ASGI middleware in front of everything: host check, auth, body bound, metrics.

    Nothing of a refused request's body is read: the answer goes out from the headers alone. An accepted
    body is counted as it streams (Content-Length or chunked) and refused with 413 the moment it passes
    the route's limit.
    """

    def __init__(self, app: Any, state: ServiceState):
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, send)
            return
        if scope["type"] != "http":  # no websocket routes: refused before the app sees them
            await send({"type": "websocket.close", "code": 1008})
            return
        state = self.state
        metrics = state.metrics
        t0 = time.perf_counter()
        label = state.route_label(scope)
        status = 0
        started = False
        answered = False  # the guard answered (413 mid-body): the app's own answer is dropped
        read = 0

        async def guarded_send(message: Message) -> None:
            nonlocal started, status
            if answered:
                return
            if message["type"] == "http.response.start":
                started = True
                status = int(message["status"])
            await send(message)

        async def answer(code: int, detail: str, headers: dict[str, str] | None = None) -> None:
            await JSONResponse({"detail": detail}, status_code=code, headers=headers)(
                scope, receive, guarded_send
            )

        refusal = self._refusal(scope, label)
        try:
            if refusal is not None:
                await answer(*refusal)
                return
            limit = state.body_limit(label)

            async def bounded_receive() -> Message:
                nonlocal read, answered
                message = await receive()
                if message["type"] == "http.request":
                    read += len(message.get("body", b""))
                    if read > limit:
                        if started:
                            raise _BodyTooLarge
                        await answer(413, f"request body exceeds {limit} bytes")
                        answered = True
                        return {"type": "http.disconnect"}  # the app stops reading
                return message

            try:
                await self.app(scope, bounded_receive, guarded_send)
            except Exception as exc:  # noqa: BLE001 - one failing request answers 500, the rest go on
                if answered:
                    return
                log.exception("request failed")
                if started:
                    raise
                await answer(500, f"internal error: {type(exc).__name__}")
        finally:
            metrics.body_bytes.labels(label).inc(read)
            code = str(status or CLIENT_GONE)
            metrics.requests.labels(label, code).inc()
            if status >= 400 or not status:
                metrics.errors.labels(label, code).inc()
            metrics.latency.labels(label).observe(time.perf_counter() - t0)

    def _refusal(self, scope: Scope, label: str) -> tuple[int, str, dict[str, str] | None] | None:
        """Why a request is refused from its headers alone (status, detail, headers), or None."""
        state = self.state
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if state.allowed_hosts is not None:
            # A key-less server answers only to its own names: a page elsewhere cannot reach it through
            # DNS rebinding (Host) or a cross-site form / fetch (Origin).
            if _host_name(headers.get("host", "")) not in state.allowed_hosts:
                return (
                    403,
                    "Host not allowed: a server without an API key answers only to its bind address",
                    None,
                )
            origin = headers.get("origin")
            if origin is not None and scope.get("method", "GET") not in ("GET", "HEAD", "OPTIONS"):
                if (urlsplit(origin).hostname or "") not in state.allowed_hosts:
                    return 403, "Origin not allowed: cross-site requests to a server without an API key", None
        principal = state.principal_for(headers.get("authorization", ""))
        if principal is not None:
            scope.setdefault("state", {})["principal"] = principal
        elif scope.get("path") not in PUBLIC_PATHS:
            return (
                401,
                "missing or wrong API key (Authorization: Bearer <key>)",
                {"WWW-Authenticate": "Bearer"},
            )
        length = headers.get("content-length")
        if length is not None:
            limit = state.body_limit(label)
            if not length.strip().isdigit():
                return 400, "unreadable Content-Length", None
            if int(length) > limit:
                return 413, f"request body of {int(length)} bytes exceeds {limit}", None
        return None


# --------------------------------------------------------------------------- routes


def _decode(data: bytes, name: str, settings: ServiceSettings) -> PIL.Image.Image:
    """The one place an upload is decoded (the image-decoding path shared with predict and calibrate)."""
    return decode_upload(data, settings.max_upload_bytes, settings.max_pixels, name)


async def _read(upload: UploadFile, settings: ServiceSettings) -> bytes:
    data = await upload.read(settings.max_upload_bytes + 1)
    if len(data) > settings.max_upload_bytes:
        name = upload.filename or "upload"
        raise HTTPException(413, f"{name}: upload exceeds the limit of {settings.max_upload_bytes} bytes")
    return data


def _request_pixels(uploads: Sequence[tuple[str, bytes]], heatmap: bool, settings: ServiceSettings) -> int:
    """The pixels a request costs (its images' headers; a heatmap counts :data:`RENDER_COST` times), or
    413 if over its budget: refused before any image is decoded."""
    cost = RENDER_COST if heatmap else 1
    total = sum((declared_pixels(data) or 0) * cost for _, data in uploads)
    if total > settings.max_request_pixels:
        raise HTTPException(
            413,
            f"{len(uploads)} image(s) cost {total} pixels"
            f"{f' (x{RENDER_COST} with a heatmap)' if heatmap else ''}, over the limit of "
            f"{settings.max_request_pixels} per request (--max-request-pixels): send fewer or smaller images",
        )
    return total


async def _on_thread(function: Callable[..., Any], *args: Any) -> Any:
    """``function(*args)`` on a worker thread. If the caller is cancelled (its client went away) the
    cancellation waits for the thread to finish: a thread cannot be stopped, and the memory it holds stays
    counted in the pixel budget until it ends."""
    work = asyncio.ensure_future(asyncio.to_thread(function, *args))
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await work
        raise


async def _decode_all(
    uploads: Sequence[tuple[str, bytes]], settings: ServiceSettings
) -> list[PIL.Image.Image]:
    images = []
    for name, data in uploads:
        try:
            # Decoding is CPU work: off the event loop.
            images.append(await _on_thread(_decode, data, name, settings))
        except UploadError as exc:
            raise HTTPException(exc.status, str(exc)) from exc
    return images


def _record(
    name: str, scored: Scored, image: PIL.Image.Image, filename: str, t0: float, heatmap: bool, mask: bool
) -> dict[str, Any]:
    prediction = scored.prediction
    out: dict[str, Any] = {
        "model": name,
        "image": filename,
        **scored.predictor.result_fields(prediction),
        "width": image.width,
        "height": image.height,
    }
    if heatmap:
        out["heatmap_png_base64"] = _png_base64(overlay(image, prediction.unit_map))
    if mask:
        if prediction.mask is None:
            out["mask_png_base64"] = None
        else:
            out["mask_png_base64"] = _png_base64(
                PIL.Image.fromarray(prediction.mask.astype(np.uint8) * 255, mode="L")
            )
    out["latency_ms"] = round((time.perf_counter() - t0) * 1000.0, 3)
    return out


async def _unless_disconnected(request: Request, work: Awaitable[Any]) -> Any:
    """``work``'s result, or a 499 response if the client goes away first: its queued images are dropped
    by the batcher (a cancelled caller is skipped) and nothing more is computed for it."""
    task = asyncio.ensure_future(work)

    async def client_gone() -> None:
        # The body has been read: the next message is the disconnect (or never comes).
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(client_gone())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
        watcher.cancel()
    if task.cancelled() or not task.done():
        get_state(request).metrics.dropped.labels(get_state(request).route_label(request.scope)).inc()
        return Response(status_code=CLIENT_GONE)
    return task.result()


async def _score_uploads(
    request: Request, principal: Principal, uploads: Sequence[tuple[str, bytes]], model: str | None,
    heatmap: bool, mask: bool, t0: float,
) -> list[dict[str, Any]]:  # fmt: skip
    state = get_state(request)
    name = state.pick_model(model)
    pixels = _request_pixels(uploads, heatmap, state.settings)
    records = []
    # The request's pixels are held server-wide from decoding to its last heatmap (it waits its turn).
    async with state.pixels.hold(pixels):
        # Every file is checked before any is scored: a bad one refuses the request, naming it.
        images = await _decode_all(uploads, state.settings)
        scored = await asyncio.gather(*(state.score(name, im) for im in images))
        for (filename, _), image, result in zip(uploads, images, scored, strict=True):
            record = await _on_thread(_record, name, result, image, filename, t0, heatmap, mask)
            state.notify(ScoreEvent(name, filename, image, result, record, principal))
            records.append(record)
    return records


router = APIRouter()


@router.get("/healthz")
async def healthz(request: Request) -> Response:
    if get_state(request).load_error:
        # Public: says that loading failed, not why (the error is in the log and /readyz).
        return JSONResponse({"status": "failed", "detail": "models failed to load"}, status_code=503)
    return JSONResponse({"status": "ok"})


@router.get("/", response_class=HTMLResponse)
async def page() -> str:
    return PAGE


@router.get("/readyz")
async def readyz(request: Request) -> Response:
    state = get_state(request)
    if state.load_error:
        return JSONResponse({"ready": False, "error": state.load_error}, status_code=503)
    if not state.ready.is_set():
        return JSONResponse(
            {"ready": False, "loading": sorted(set(state.names) - set(state.predictors))}, status_code=503
        )
    return JSONResponse({"ready": True, "models": sorted(state.predictors)})


@router.get("/models")
async def list_models(request: Request) -> dict[str, Any]:
    state = get_state(request)
    return {
        "models": [
            {
                "name": name,
                "runtime": info.get("runtime"),
                "backbone": info.get("backbone"),
                "layers": info.get("layers"),
                "input_size": info.get("input_size"),
                "transform": info.get("transform"),
                "calibrated": info.get("calibrated"),
                "threshold": info.get("threshold"),
                "threshold_set_by": info.get("threshold_set_by"),
                "calibration": info.get("calibration"),
                "training_stats": info.get("stats"),
                "metrics": info.get("metrics") or {},
                "evaluation": info.get("evaluation"),
            }
            for name, info in state.info.items()
        ],
        "ready": state.ready.is_set(),
    }


@router.get("/metrics")
async def prometheus(request: Request) -> Response:
    return Response(generate_latest(get_state(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.post("/predict")
async def predict(
    request: Request,
    principal: Annotated[Principal, Depends(authenticate)],
    file: Annotated[UploadFile, File()],
    model: Annotated[str | None, Query()] = None,
    heatmap: Annotated[bool, Query()] = False,
    mask: Annotated[bool, Query()] = False,
) -> Any:
    t0 = time.perf_counter()
    uploads = [(file.filename or "upload", await _read(file, get_state(request).settings))]

    async def work() -> dict[str, Any]:
        return (await _score_uploads(request, principal, uploads, model, heatmap, mask, t0))[0]

    return await _unless_disconnected(request, work())


@router.post("/predict/batch")
async def predict_batch(
    request: Request,
    principal: Annotated[Principal, Depends(authenticate)],
    file: Annotated[list[UploadFile], File()],
    model: Annotated[str | None, Query()] = None,
    heatmap: Annotated[bool, Query()] = False,
    mask: Annotated[bool, Query()] = False,
) -> Any:
    t0 = time.perf_counter()
    settings = get_state(request).settings
    if len(file) > settings.max_files:
        raise HTTPException(413, f"{len(file)} files exceed the limit of {settings.max_files} per request")
    uploads = [(f.filename or "upload", await _read(f, settings)) for f in file]

    async def work() -> dict[str, Any]:
        results = await _score_uploads(request, principal, uploads, model, heatmap, mask, t0)
        return {
            "model": results[0]["model"] if results else model,
            "results": results,
            "latency_ms": round((time.perf_counter() - t0) * 1000.0, 3),
        }

    return await _unless_disconnected(request, work())


# --------------------------------------------------------------------------- the app


def create_app(
    models: Mapping[str, Path | Predictor | LoadedModel],
    settings: ServiceSettings | None = None,
    extensions: Sequence[ServiceExtension] = (),
) -> Any:
    """The FastAPI application. ``models``: name -> model path (loaded in the background at start-up;
    ``/readyz`` says when done, ``/healthz`` answers 503 if loading fails), or name -> an already loaded
    :class:`Predictor` / :class:`LoadedModel`. ``extensions``: protected routers and hooks (see
    :class:`ServiceExtension`)."""
    settings = settings or ServiceSettings()
    keys = read_keys(settings)
    paths = {n: Path(m) for n, m in models.items() if not isinstance(m, (Predictor, LoadedModel))}
    listeners = [e.on_result for e in extensions if e.on_result is not None]
    state = ServiceState(settings, keys, paths, listeners, _predictor_class(extensions))
    state.names = list(models)
    for name, m in models.items():
        if isinstance(m, LoadedModel):
            state.predictors[name], state.info[name] = m.predictor, _model_info(m.predictor, m.path)
            state.model_paths[name] = m.path
        elif isinstance(m, Predictor):
            state.predictors[name], state.info[name] = m, _model_info(m, None)

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        for name in models:
            batcher = DynamicBatcher(
                state._run_batch(name), settings.max_batch, settings.max_wait_ms / 1000.0,
                on_batch=state.metrics.batch_size.labels(name).observe, name=name,
            )  # fmt: skip
            batcher.start()
            state.batchers[name] = batcher
        if paths:
            threading.Thread(target=state._load_in_background, name="model-loader", daemon=True).start()
        else:
            state.ready.set()
        try:
            async with contextlib.AsyncExitStack() as stack:
                for extension in extensions:
                    if extension.lifespan is not None:
                        await stack.enter_async_context(extension.lifespan(state))
                yield
        finally:
            for batcher in state.batchers.values():
                await batcher.stop()

    # No docs pages; the schema (/openapi.json) is behind the key like every route.
    app = FastAPI(title="patchcore", version="1", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.patchcore = state
    # The routers' routes go into the app's own flat route list (prefixes and router dependencies are
    # already part of each route), so ``app.routes`` enumerates every route and labels match templates.
    for included in (router, *(e.router for e in extensions if e.router is not None)):
        app.router.routes.extend(included.routes)
    app.add_middleware(RequestGuard, state=state)
    state.routes = app.router.routes  # the live list: routes added later are labelled too
    return app


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port (listening starts with the server), or a one-line DeployError."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except (socket.gaierror, UnicodeError) as exc:
        raise DeployError(f"--host {host!r} cannot be resolved: {exc}") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn; a bound port still refuses
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise DeployError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def run_service(
    model_specs: list[str], settings: ServiceSettings, extensions: Sequence[ServiceExtension] = ()
) -> None:
    """Check the options, bind the port, load every model (a failure exits the CLI with status 2, naming the
    file), then serve until SIGTERM / Ctrl-C (requests in flight get :data:`SHUTDOWN_GRACE_S`)."""
    try:
        import uvicorn
    except ImportError as exc:
        raise DeployError("patchcore serve needs the 'serve' extra: pip install 'patchcore[serve]'") from exc
    specs = parse_model_specs(model_specs)
    keys = read_keys(settings)
    predictor_class = _predictor_class(extensions)
    if settings.host.strip("[]").lower() not in _LOOPBACK:
        log.warning("listening on %s: reachable from other machines%s", settings.host,
                    "" if keys else " WITHOUT an API key (--api-key-file)")  # fmt: skip
    # Bound first: a busy port is refused at once, not after the models are loaded.
    sock = bind_socket(settings.host, settings.port)
    try:
        if settings.threads is not None:
            import torch

            # On a busy machine, fewer intra-op threads than cores avoids OpenMP threads waiting on each other.
            torch.set_num_threads(settings.threads)
        loaded: dict[str, LoadedModel] = {}
        for name, path in specs.items():
            t0 = time.perf_counter()
            loaded[name] = load_model(name, path, settings, predictor_class)
            log.info("model %s ready (%s, %.1f s): %s", name, settings.runtime, time.perf_counter() - t0,
                     loaded[name].predictor.describe())  # fmt: skip
        app = create_app(loaded, settings, extensions)
        config = uvicorn.Config(
            app, log_level="warning", access_log=False, timeout_graceful_shutdown=int(SHUTDOWN_GRACE_S)
        )
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
