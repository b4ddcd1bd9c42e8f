"""``patchcore serve``: a REST service (FastAPI + uvicorn) over one or more models, with dynamic
batching, Prometheus metrics, optional Bearer-key auth and a web page at ``/``.

FastAPI, uvicorn and prometheus-client are the ``serve`` extra: imported here, and this module is
imported only by ``patchcore serve``, so the core package works without them.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import io
import json
import logging
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import PIL.Image

from .errors import DeployError

try:
    from fastapi import Depends, FastAPI, File, HTTPException, Query, Request, UploadFile
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
except ImportError as exc:  # pragma: no cover - the extra is installed in CI
    raise DeployError("patchcore serve needs the 'serve' extra: pip install 'patchcore[serve]'") from exc

from ..heatmaps import overlay
from .batching import DynamicBatcher
from .inference import ImagePrediction, Predictor
from .uploads import UploadError, decode_upload
from .webpage import PAGE

__all__ = ["ServiceSettings", "create_app", "parse_model_specs", "run_service"]

log = logging.getLogger("patchcore")


@dataclass
class ServiceSettings:
    max_batch: int = 16
    max_wait_ms: float = 5.0
    runtime: str = "torch"  # torch | onnx | openvino
    device: str = "auto"
    api_key_file: str | None = None
    max_upload_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_files: int = 64  # per /predict/batch request
    threads: int | None = None  # intra-op threads of the backend (None: the library's default)

    def validate(self) -> None:
        if self.max_batch < 1:
            raise DeployError(f"--max-batch must be >= 1, got {self.max_batch}")
        if self.max_wait_ms < 0:
            raise DeployError(f"--max-wait-ms must be >= 0, got {self.max_wait_ms}")
        if self.runtime not in ("torch", "onnx", "openvino"):
            raise DeployError(f"unknown runtime {self.runtime!r}: torch, onnx or openvino")
        if self.threads is not None and self.threads < 1:
            raise DeployError(f"--threads must be >= 1, got {self.threads}")
        if self.max_upload_bytes < 1 or self.max_pixels < 1:
            raise DeployError("upload limits must be positive")


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


def read_api_key(path: str | None) -> bytes | None:
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        raise DeployError(f"API key file {p} does not exist")
    key = p.read_text().strip()
    if len(key) < 16:
        raise DeployError(f"API key in {p} is shorter than 16 characters")
    return key.encode()


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
        self.batch_size = Histogram(
            "patchcore_batch_size", "images per model call (dynamic batching)", ["model"], registry=self.registry,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
        )  # fmt: skip
        self.images = Counter("patchcore_images", "images scored", ["model"], registry=self.registry)


class _State:
    def __init__(self, specs: dict[str, Path], settings: ServiceSettings):
        self.specs = specs
        self.settings = settings
        self.predictors: dict[str, Predictor] = {}
        self.batchers: dict[str, DynamicBatcher] = {}
        self.info: dict[str, dict[str, Any]] = {}
        self.ready = threading.Event()
        self.load_error: str | None = None


def create_app(
    models: dict[str, Path] | dict[str, Predictor], settings: ServiceSettings | None = None
) -> Any:
    """The FastAPI application. ``models``: name -> model path (loaded in the background at start-up,
    ``/readyz`` says when done) or name -> an already loaded :class:`Predictor`."""
    settings = settings or ServiceSettings()
    settings.validate()
    api_key = read_api_key(settings.api_key_file)
    metrics = _Metrics()
    paths = {n: m for n, m in models.items() if not isinstance(m, Predictor)}
    state = _State(paths, settings)
    for name, m in models.items():
        if isinstance(m, Predictor):
            state.predictors[name] = m
            state.info[name] = m.info()

    def load_models() -> None:
        try:
            for name, path in paths.items():
                t0 = time.perf_counter()
                predictor = Predictor.load(
                    path, device=settings.device, runtime=settings.runtime, per_call_range=False,
                    threads=settings.threads,
                )  # fmt: skip
                info = predictor.info()
                info["metrics"] = _training_metrics(path)
                info["path"] = str(path)
                # Warm-up: the extractor, the index and the runtime's kernels are built before traffic.
                size = info.get("input_size") or [224, 224]
                predictor.predict([PIL.Image.new("RGB", (int(size[1]), int(size[0])))], names=["warm-up"])
                state.info[name] = info
                state.predictors[name] = predictor
                log.info(
                    "model %s ready (%s, %.1f s): %s",
                    name,
                    settings.runtime,
                    time.perf_counter() - t0,
                    predictor.describe(),
                )
            state.ready.set()
        except Exception as exc:  # noqa: BLE001 - reported by /readyz and the log
            state.load_error = f"{type(exc).__name__}: {exc}"
            log.error("model loading failed: %s", state.load_error)

    def run_batch(name: str):
        def run(images: list[PIL.Image.Image]) -> list[ImagePrediction]:
            return state.predictors[name].predict(images, names=[f"upload{i}" for i in range(len(images))])

        return run

    @asynccontextmanager
    async def lifespan(app: Any):
        for name in models:
            batcher = DynamicBatcher(
                run_batch(name), settings.max_batch, settings.max_wait_ms / 1000.0,
                on_batch=lambda n, name=name: metrics.batch_size.labels(name).observe(n), name=name,
            )  # fmt: skip
            batcher.start()
            state.batchers[name] = batcher
        if paths:
            threading.Thread(target=load_models, name="model-loader", daemon=True).start()
        else:
            state.ready.set()
        try:
            yield
        finally:
            for batcher in state.batchers.values():
                await batcher.stop()

    app = FastAPI(title="patchcore", version="1", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.patchcore = state

    def require_key(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        # Constant-time comparison: the time taken says nothing about how much of the key matched.
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key):
            raise HTTPException(401, "missing or wrong API key (Authorization: Bearer <key>)",
                                headers={"WWW-Authenticate": "Bearer"})  # fmt: skip

    @app.middleware("http")
    async def count(request: Request, call_next):
        t0 = time.perf_counter()
        endpoint = request.url.path if request.url.path in _ENDPOINTS else "other"
        length = request.headers.get("content-length")
        limit = (
            settings.max_upload_bytes * (settings.max_files if endpoint == "/predict/batch" else 1) + 65536
        )
        if length is not None and length.isdigit() and int(length) > limit:
            # Refused before the body is read.
            response = JSONResponse(
                {"detail": f"request body of {length} bytes exceeds {limit}"}, status_code=413
            )
        else:
            try:
                response = await call_next(request)
            except Exception as exc:  # noqa: BLE001 - one failing request answers 500, the rest go on
                log.exception("request failed")
                response = JSONResponse({"detail": f"internal error: {type(exc).__name__}"}, status_code=500)
        metrics.requests.labels(endpoint, str(response.status_code)).inc()
        if response.status_code >= 400:
            metrics.errors.labels(endpoint, str(response.status_code)).inc()
        metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)
        return response

    def pick_model(name: str | None) -> str:
        if state.load_error:
            raise HTTPException(503, f"models failed to load: {state.load_error}")
        if not state.ready.is_set():
            raise HTTPException(503, "models are still loading; see /readyz")
        if name is None:
            if len(state.predictors) == 1:
                return next(iter(state.predictors))
            raise HTTPException(
                400, f"several models are served: pass ?model=NAME ({', '.join(state.predictors)})"
            )
        if name not in state.predictors:
            raise HTTPException(404, f"unknown model {name!r}; served: {', '.join(state.predictors)}")
        return name

    async def read_image(upload: UploadFile) -> PIL.Image.Image:
        data = await upload.read(settings.max_upload_bytes + 1)
        try:
            # Decoding is CPU work: off the event loop.
            return await asyncio.to_thread(
                decode_upload,
                data,
                settings.max_upload_bytes,
                settings.max_pixels,
                upload.filename or "upload",
            )
        except UploadError as exc:
            raise HTTPException(exc.status, str(exc)) from exc

    def record(
        name: str, prediction: ImagePrediction, image: PIL.Image.Image, filename: str, t0: float,
        heatmap: bool, mask: bool,
    ) -> dict[str, Any]:  # fmt: skip
        predictor = state.predictors[name]
        out: dict[str, Any] = {
            "model": name,
            "image": filename,
            **predictor.result_fields(prediction),
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

    async def score(name: str, image: PIL.Image.Image) -> ImagePrediction:
        result = await state.batchers[name].submit(image)
        metrics.images.labels(name).inc()
        return result

    auth = [Depends(require_key)]

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", dependencies=auth)
    async def readyz() -> Response:
        if state.load_error:
            return JSONResponse({"ready": False, "error": state.load_error}, status_code=503)
        if not state.ready.is_set():
            return JSONResponse(
                {"ready": False, "loading": sorted(set(models) - set(state.predictors))}, status_code=503
            )
        return JSONResponse({"ready": True, "models": sorted(state.predictors)})

    @app.get("/models", dependencies=auth)
    async def list_models() -> dict[str, Any]:
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

    @app.get("/metrics", dependencies=auth)
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/predict", dependencies=auth)
    async def predict(
        file: Annotated[UploadFile, File()],
        model: Annotated[str | None, Query()] = None,
        heatmap: Annotated[bool, Query()] = False,
        mask: Annotated[bool, Query()] = False,
    ) -> dict[str, Any]:
        t0 = time.perf_counter()
        name = pick_model(model)
        image = await read_image(file)
        prediction = await score(name, image)
        return await asyncio.to_thread(
            record, name, prediction, image, file.filename or "upload", t0, heatmap, mask
        )

    @app.post("/predict/batch", dependencies=auth)
    async def predict_batch(
        file: Annotated[list[UploadFile], File()],
        model: Annotated[str | None, Query()] = None,
        heatmap: Annotated[bool, Query()] = False,
        mask: Annotated[bool, Query()] = False,
    ) -> dict[str, Any]:
        t0 = time.perf_counter()
        name = pick_model(model)
        if len(file) > settings.max_files:
            raise HTTPException(
                413, f"{len(file)} files exceed the limit of {settings.max_files} per request"
            )
        # Every file is checked before any is scored: a bad one refuses the request, naming it.
        images = [await read_image(f) for f in file]
        predictions = await asyncio.gather(*(score(name, im) for im in images))
        results = [
            await asyncio.to_thread(record, name, p, im, f.filename or "upload", t0, heatmap, mask)
            for p, im, f in zip(predictions, images, file, strict=True)
        ]
        return {
            "model": name,
            "results": results,
            "latency_ms": round((time.perf_counter() - t0) * 1000.0, 3),
        }

    @app.get("/", response_class=HTMLResponse, dependencies=auth)
    async def page() -> str:
        return PAGE

    return app


_ENDPOINTS = {"/", "/predict", "/predict/batch", "/models", "/healthz", "/readyz", "/metrics"}


def run_service(
    model_specs: list[str], settings: ServiceSettings, host: str = "127.0.0.1", port: int = 8000
) -> None:
    """Load the models and serve until interrupted."""
    try:
        import uvicorn
    except ImportError as exc:
        raise DeployError("patchcore serve needs the 'serve' extra: pip install 'patchcore[serve]'") from exc
    if not 0 <= port <= 65535:
        raise DeployError(f"--port must be in 0..65535, got {port}")
    models = parse_model_specs(model_specs)
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s: reachable from other machines%s", host,
                    "" if settings.api_key_file else " WITHOUT an API key (--api-key-file)")  # fmt: skip
    if settings.threads is not None:
        import torch

        # On a busy machine, fewer intra-op threads than cores avoids OpenMP threads waiting on each other.
        torch.set_num_threads(settings.threads)
    app = create_app(models, settings)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
