"""Helpers for the deployment tests: a tiny calibrated model on textured images, and the real uvicorn
server on a free loopback port, in a thread of the test process."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from test_workflow import save, texture, with_square

from patchcore import PatchCore

SIZE = 48


def make_images(root: Path) -> dict[str, list[Path]]:
    """train (8 good), calib (20 good), test good (3) and bad (3, a bright square) images."""
    out: dict[str, list[Path]] = {"train": [], "calib": [], "good": [], "bad": []}
    for i in range(8):
        out["train"].append(save(root / "train" / f"{i:03d}.png", texture(SIZE, SIZE, i)))
    for i in range(20):
        out["calib"].append(save(root / "calib" / f"{i:03d}.png", texture(SIZE, SIZE, 100 + i)))
    for i in range(3):
        out["good"].append(save(root / "test" / f"good_{i}.png", texture(SIZE, SIZE, 200 + i)))
        bad = with_square(texture(SIZE, SIZE, 300 + i), (14, 14, 30, 30))
        out["bad"].append(save(root / "test" / f"bad_{i}.png", bad))
    return out


def tiny_model(images: dict[str, list[Path]]) -> PatchCore:
    model = PatchCore(
        backbone="resnet18", weights="random", resize=SIZE, imagesize=SIZE, device="cpu", percentage=0.5,
        batch_size=4,
    )  # fmt: skip
    return model.fit([str(p) for p in images["train"]])


def free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@contextlib.contextmanager
def running_server(app, timeout: float = 60.0, healthy: tuple[int, ...] = (200,)) -> Iterator[str]:
    """Serve ``app`` with uvicorn on a loopback socket bound here (no port race); yields the base URL once
    /healthz answers one of ``healthy``."""
    import httpx
    import uvicorn

    sock = free_socket()
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code in healthy:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("server did not start")
            time.sleep(0.05)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def wait_ready(url: str, headers: dict | None = None, timeout: float = 120.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while httpx.get(f"{url}/readyz", headers=headers, timeout=5).status_code != 200:
        if time.monotonic() > deadline:
            raise TimeoutError("models did not load")
        time.sleep(0.1)


def png_size(data: bytes) -> tuple[int, int]:
    import io

    from PIL import Image

    return Image.open(io.BytesIO(data)).size


def as_array(data: bytes) -> np.ndarray:
    import io

    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)))
