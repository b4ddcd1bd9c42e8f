"""Issue 24's probe table, every row re-run against the real CLI and a real ``patchcore serve`` on 127.0.0.1.

Each row does what the issue's row did (scaled down where the original is impractical in a probe, keeping the
property: a chunked body far over a small cap instead of 1.47 GB, 2000 x 2000 images with ``--max-pixels``
and ``--max-request-pixels`` at a tenth of their defaults instead of 6000 x 6000 at the defaults, a Ray
address that refuses at once instead of a 30 s timeout), checks what the issue demands of it, and records
(row, probe, observed, verdict). Prints a markdown table and writes it with the raw observations as JSON into
``benchmarks/results/``. Bounded: every process has a timeout, the whole run a deadline (``--deadline-s``),
servers are stopped by the probe; everything lives in a temporary folder that is removed at the end.

    PYTHONPATH=src python benchmarks/probe_hostile.py              # all rows
    PYTHONPATH=src python benchmarks/probe_hostile.py --rows 1 4b  # some rows

The tiny model is benchmarks/make_tiny_model.py's (resnet18, seeded random weights, 48 px, calibrated);
run data are tests/test_workflow.py's generated MVTec trees.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import pty
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import big_png  # noqa: E402 (benchmarks/ is on the path just above)

KEY = "probe-operator-" + "k" * 24
AUTH = {"Authorization": f"Bearer {KEY}"}
MVTEC_CLASSES = ("bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut", "pill",
                 "screw", "tile", "toothbrush", "transistor", "wood", "zipper")  # fmt: skip


# ----------------------------------------------------------------------------- plumbing


@dataclass
class Result:
    row: str
    probe: str
    observed: str = ""
    verdict: str = "not run"
    seconds: float = 0.0
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class Ctx:
    work: Path
    deadline: float
    model: Path = Path()
    uncalibrated: Path = Path()
    mvtec: Path = Path()
    rows_file: Path | None = None

    def left(self, wanted: float) -> float:
        return max(1.0, min(wanted, self.deadline - time.monotonic()))


def env() -> dict[str, str]:
    return {
        **os.environ, "PYTHONPATH": str(ROOT / "src"), "PATCHCORE_OFFLINE": "1", "OMP_NUM_THREADS": "1",
        "PYTHONWARNINGS": "ignore",
    }  # fmt: skip


CLI = [sys.executable, "-m", "patchcore.app.cli"]


@dataclass
class Ran:
    rc: int
    out: str
    err: str
    seconds: float
    max_rss_mb: float = 0.0

    def lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.strip()]

    def one_line(self) -> bool:
        return self.rc == 2 and len(self.lines()) == 1 and "Traceback" not in self.err

    def line(self) -> str:
        lines = self.lines()
        last = lines[-1] if lines else "(nothing on stderr)"
        return last if len(last) <= 240 else f"{last[:110]} ... {last[-125:]}"


def cli(ctx: Ctx, *argv: Any, timeout: float = 180, cwd: Path | None = None) -> Ran:
    """``patchcore ARGV`` as a child process; its peak resident memory from wait4's rusage."""
    started = time.monotonic()
    process = subprocess.Popen(
        [*CLI, *map(str, argv)], env=env(), cwd=cwd or ctx.work, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        out, err = process.communicate(timeout=ctx.left(timeout))
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        return Ran(-9, out, err + f"\n(probe: killed after {timeout} s)", time.monotonic() - started)
    return Ran(process.returncode, out, err, time.monotonic() - started)


def cli_rss(ctx: Ctx, *argv: Any, timeout: float = 600) -> Ran:
    """Like :func:`cli`, with the child's own peak RSS (``wait4``), stdout and stderr to files."""
    started = time.monotonic()
    out_path, err_path = ctx.work / "child.out", ctx.work / "child.err"
    with out_path.open("w") as out, err_path.open("w") as err:
        process = subprocess.Popen([*CLI, *map(str, argv)], env=env(), cwd=ctx.work, stdout=out, stderr=err)
    end = time.monotonic() + ctx.left(timeout)
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() > end:
            process.kill()
            pid, status, usage = os.wait4(process.pid, 0)
            break
        time.sleep(0.05)
    process.returncode = os.waitstatus_to_exitcode(status)
    return Ran(process.returncode, out_path.read_text(), err_path.read_text(), time.monotonic() - started,
               usage.ru_maxrss / 1024.0)  # fmt: skip


def tree(root: Path) -> dict[str, int]:
    """Every file under ``root`` with its mtime: what a refusal must leave as it was."""
    if not root.exists():
        return {}
    return {p.relative_to(root).as_posix(): p.stat().st_mtime_ns for p in sorted(root.rglob("*")) if p.is_file()}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """``patchcore serve`` as a child process on a free loopback port, stopped (SIGTERM, then SIGKILL) on exit."""

    def __init__(self, ctx: Ctx, *args: Any, key: bool = True, model: Path | None = None):
        self.ctx, self.port = ctx, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = ["serve", "--model", f"tiny={model or ctx.model}", "--port", self.port, "--threads", "1",
                "--station-dir", tempfile.mkdtemp(dir=ctx.work), *args]  # fmt: skip
        if key:
            key_file = ctx.work / "operator.key"
            key_file.write_text(KEY)
            argv += ["--api-key-file", key_file]
        self.headers = AUTH if key else {}
        self.process = subprocess.Popen([*CLI, *map(str, argv)], env=env(), cwd=ctx.work,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip

    def __enter__(self) -> Server:
        end = time.monotonic() + self.ctx.left(240)
        while time.monotonic() < end:
            if self.process.poll() is not None:
                raise RuntimeError(f"serve exited {self.process.returncode}: {self.process.stderr.read()[-400:]!r}")
            try:
                if httpx.get(f"{self.url}/readyz", headers=self.headers, timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        self.stop()  # __exit__ is not called when __enter__ fails: never leave a server behind
        raise RuntimeError("serve not ready in time")

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self, grace: float = 20) -> float | None:
        """SIGTERM; seconds until it exited (None: it did not, then SIGKILL)."""
        if self.process.poll() is not None:
            return 0.0
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=grace)
            return time.monotonic() - started
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            return None

    def memory_mb(self) -> dict[str, float]:
        fields = {}
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = round(int(value.split()[0]) / 1024.0, 1)
        return fields

    def metric(self, name: str, **labels: str) -> float:
        from prometheus_client.parser import text_string_to_metric_families

        total = 0.0
        text = httpx.get(f"{self.url}/metrics", headers=self.headers, timeout=30).text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    total += sample.value
        return total


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


def goods(folder: Path, n: int, start: int = 100) -> list[Path]:
    from make_tiny_model import good

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"{i:03d}.png"
        good(start + i).save(path)
        paths.append(path)
    return paths


def defect(seed: int) -> Image.Image:
    from make_tiny_model import good

    array = np.asarray(good(seed)).copy()
    array[12 + seed % 8 : 30 + seed % 8, 14:32] = (255, 255, 255)
    return Image.fromarray(array)


def copy_model(ctx: Ctx, name: str, source: Path | None = None) -> Path:
    target = ctx.work / name
    shutil.copyfile(source or ctx.model, target)
    return target


def mvtec_config(ctx: Ctx, name: str, data: Path, out: Path) -> Path:
    from test_workflow import write_config

    return write_config(ctx.work / name, "mvtec", data, out, evaluation={"heatmaps": 0})


ROWS: list[tuple[str, str, Callable[[Ctx, Result], None], bool]] = []


def row(number: str, probe: str, heavy: bool = False):
    """Register a probe; it fills ``result.observed`` and sets ``result.verdict`` (pass / FAIL)."""

    def register(function: Callable[[Ctx, Result], None]) -> Callable[[Ctx, Result], None]:
        ROWS.append((number, probe, function, heavy))
        return function

    return register


def verdict(result: Result, ok: bool, observed: str, **data: Any) -> None:
    result.verdict = "pass" if ok else "FAIL"
    result.observed = observed
    result.data.update(data)


# ----------------------------------------------------------------------------- the rows


def _chunked_head(port: int, headers: dict[str, str]) -> bytes:
    lines = ["POST /predict HTTP/1.1", f"Host: 127.0.0.1:{port}", "Transfer-Encoding: chunked",
             "Content-Type: multipart/form-data; boundary=b0undary"]  # fmt: skip
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _send_until_answered(port: int, head: bytes, total: int, chunk: int = 65536) -> tuple[int, int, bool]:
    """(status, body bytes sent, whether the answer came before the first body byte)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    sent, early = 0, False
    try:
        sock.sendall(head)
        early = bool(select.select([sock], [], [], 3)[0])
        if not early:
            part = b'--b0undary\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\n\r\n'
            sock.sendall(f"{len(part):x}\r\n".encode() + part + b"\r\n")
            piece = f"{chunk:x}\r\n".encode() + b"\x00" * chunk + b"\r\n"
            sock.settimeout(5)
            with contextlib.suppress(TimeoutError):  # the server stopped reading: its answer is on the way
                while sent < total and not select.select([sock], [], [], 0)[0]:
                    sock.sendall(piece)
                    sent += chunk
            sock.settimeout(60)
            select.select([sock], [], [], 60)
        answer = sock.recv(65536)
    except (BrokenPipeError, ConnectionResetError):
        try:  # the answer may already be in our receive buffer
            answer = sock.recv(65536)
        except OSError:
            answer = b""
    finally:
        sock.close()
    return (int(answer.split()[1]) if answer else 0), sent, early


@row("1", "chunked POST /predict, no Content-Length: wrong key (1 GB announced); with the key, 64 MB at a 2 MB cap")
def row_1(ctx: Ctx, result: Result) -> None:
    cap_mb = 2
    with Server(ctx, "--max-upload-mb", cap_mb) as server:
        before = server.metric("patchcore_request_body_bytes_total", endpoint="/predict")
        wrong = _send_until_answered(server.port, _chunked_head(server.port, {"Authorization": "Bearer " + "nope-" * 5}),
                                     total=1 << 30)  # fmt: skip
        read_wrong = server.metric("patchcore_request_body_bytes_total", endpoint="/predict") - before
        total = 64 << 20
        status, sent, _ = _send_until_answered(server.port, _chunked_head(server.port, AUTH), total=total)
        read_keyed = server.metric("patchcore_request_body_bytes_total", endpoint="/predict") - before - read_wrong
    # The body limit of one upload is the per-image cap plus the multipart framing's allowance.
    from patchcore.deploy.settings import ServiceSettings

    limit = ServiceSettings(max_upload_bytes=cap_mb * 1024 * 1024).max_body_bytes
    ok = (wrong[0] == 401 and wrong[2] and wrong[1] == 0 and read_wrong == 0 and status == 413
          and read_keyed <= limit + 256 * 1024 and sent < total)  # fmt: skip
    verdict(result, ok,
            f"wrong key: {wrong[0]} from the headers, {wrong[1]} body bytes sent, {read_wrong:.0f} read; with the "
            f"key: {status} after {read_keyed / 2**20:.2f} MB read (limit {limit / 2**20:.2f} MB), the client "
            f"had sent {sent / 2**20:.1f} of {total / 2**20:.0f} MB",
            wrong_status=wrong[0], wrong_read=read_wrong, keyed_status=status, keyed_read=read_keyed, limit=limit,
            keyed_sent=sent)  # fmt: skip


def _export(ctx: Ctx, model: Path, out: Path, fmt: str = "onnx", *extra: Any) -> Ran:
    return cli(ctx, "export", "-m", model, "--format", fmt, "--out", out, *extra, timeout=300)


@row("2", "ONNX export with the bank initializer x1.5, then serve --runtime onnx")
def row_2(ctx: Ctx, result: Result) -> None:
    import onnx
    import torch
    from onnx import numpy_helper

    out = ctx.work / "row2"
    ran = _export(ctx, ctx.model, out)
    assert ran.rc == 0, ran.err
    graph = onnx.load(out / "patchcore.onnx")
    bank_shape = list(torch.load(ctx.model, weights_only=True)["memory_bank"].T.shape)
    (bank,) = [t for t in graph.graph.initializer if list(t.dims) == bank_shape]
    bank.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(bank) * 1.5, bank.name))
    onnx.save(graph, out / "patchcore.onnx")
    served = cli(ctx, "serve", "--model", out, "--runtime", "onnx", "--port", free_port(), timeout=180)
    ok = served.one_line() and "patchcore.onnx" in served.line()
    verdict(result, ok, f"rc {served.rc} in {served.seconds:.1f} s: {served.line()}")


@row("3", "JPEG with EXIF orientation 6: score from /predict and from patchcore predict")
def row_3(ctx: Ctx, result: Result) -> None:
    from make_tiny_model import good

    pixels = np.asarray(good(7)).copy()
    pixels[:, :12] = 255  # a bright band on the left of the upright image
    upright = Image.fromarray(pixels)
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # orientation 6 = rotate 270 (90 clockwise) to view
    exif = stored.getexif()
    exif[0x0112] = 6
    folder = ctx.work / "row3"
    folder.mkdir()
    path = folder / "camera.jpg"
    stored.save(path, exif=exif, quality=95)
    ran = cli(ctx, "predict", "-m", ctx.model, path, "--out", ctx.work / "row3_out", "--no-progress")
    assert ran.rc == 0, ran.err
    offline = json.loads(ran.out.strip().splitlines()[-1])["score"]
    with Server(ctx) as server:
        answer = httpx.post(f"{server.url}/predict", files={"file": ("camera.jpg", path.read_bytes())},
                            headers=server.headers, timeout=120).json()  # fmt: skip
    online = answer["score"]
    ok = abs(online - offline) <= 1e-4 * max(1.0, abs(offline))
    verdict(result, ok, f"service {online:.4f}, predict {offline:.4f}", service=online, predict=offline)


@row("4", "calibrate on a 'good' folder of 10 goods + 10 defects")
def row_4(ctx: Ctx, result: Result) -> None:
    folder = ctx.work / "row4"
    good_paths = goods(folder, 10, start=300)
    defects = []
    for i in range(10):
        path = folder / f"defect_{i}.png"
        defect(400 + i).save(path)
        defects.append(path)
    ran = cli(ctx, "calibrate", "-m", ctx.model, folder, "--out", ctx.work / "row4.pt")
    warning = next((line for line in ran.err.splitlines() if "outliers" in line), "")
    named = sum(p.name in warning for p in defects)
    wrong = sum(p.name in warning for p in good_paths)
    ok = ran.rc == 0 and bool(warning) and named > 0 and wrong == 0
    verdict(result, ok, f"rc {ran.rc}; {warning[-200:] or 'no warning'} "
            f"({named} defects named, {wrong} goods named)", warning=warning)  # fmt: skip


@row("4b", "calibrate calib/ calib/ calib/000.png calib/000.png (10 distinct images)")
def row_4b(ctx: Ctx, result: Result) -> None:
    calib = ctx.work / "row4b"
    paths = goods(calib, 10, start=500)
    ran = cli(ctx, "calibrate", "-m", ctx.model, calib, calib, paths[0], paths[0], "--out", ctx.work / "row4b.pt")
    counted = json.loads(ran.out)["n_images"] if ran.rc == 0 else None
    line = next((line for line in ran.err.splitlines() if "distinct" in line), "")
    ok = counted == 10 and "10 distinct images" in line
    verdict(result, ok, f"rc {ran.rc}, n_images {counted}; {line[line.find('22'):][:160]}", n_images=counted)


@row("4c", "export A as OpenVINO into X, then B as ONNX into X; serve X")
def row_4c(ctx: Ctx, result: Result) -> None:
    out = ctx.work / "row4c"
    first = _export(ctx, ctx.model, out, "openvino")
    assert first.rc == 0, first.err
    before = tree(out)
    second = _export(ctx, ctx.uncalibrated, out, "onnx")
    unchanged = tree(out) == before
    # An OpenVINO folder given a stray ONNX graph of another export: the loader refuses to serve it.
    other = ctx.work / "row4c_b"
    assert _export(ctx, ctx.uncalibrated, other, "onnx").rc == 0
    shutil.copyfile(other / "patchcore.onnx", out / "patchcore.onnx")
    served = cli(ctx, "serve", "--model", out, "--runtime", "openvino", "--port", free_port(), timeout=180)
    ok = second.one_line() and unchanged and served.one_line()
    verdict(result, ok, f"second export: rc {second.rc}, X unchanged: {unchanged} ({second.line()}); a stray "
            f"graph added: serve rc {served.rc}: {served.line()}")  # fmt: skip


@row("4d", "two 16-bit grey PNGs identical but one pixel (4095 vs 4096), patchcore predict")
def row_4d(ctx: Ctx, result: Result) -> None:
    folder = ctx.work / "row4d"
    folder.mkdir()
    base = np.random.default_rng(0).integers(0, 4095, (48, 48)).astype(np.uint16)
    base[0, 0] = 4095
    other = base.copy()
    other[0, 0] = 4096
    Image.fromarray(base).save(folder / "a.png")
    Image.fromarray(other).save(folder / "b.png")
    ran = cli(ctx, "predict", "-m", ctx.model, folder, "--out", ctx.work / "row4d_out", "--no-progress")
    scores = [json.loads(line)["score"] for line in ran.out.strip().splitlines()]
    ok = ran.rc == 0 and len(scores) == 2 and abs(scores[0] - scores[1]) <= 0.01 * max(scores)
    verdict(result, ok, f"scores {scores[0]:.4f} / {scores[1]:.4f}" if len(scores) == 2 else ran.line())


@row("4e", "predict --out DIR --overwrite where DIR is the input folder")
def row_4e(ctx: Ctx, result: Result) -> None:
    folder = ctx.work / "row4e"
    goods(folder, 3, start=600)
    before = tree(folder)
    ran = cli(ctx, "predict", "-m", ctx.model, folder, "--out", folder, "--overwrite", "--no-progress")
    nested = cli(ctx, "predict", "-m", ctx.model, folder, "--out", folder / "maps", "--overwrite", "--no-progress")
    ok = ran.one_line() and nested.one_line() and tree(folder) == before
    verdict(result, ok, f"rc {ran.rc} / {nested.rc} (a folder inside), folder unchanged: {tree(folder) == before}: "
            f"{ran.line()}")  # fmt: skip


SIDE = 2000  # rows 5, 6: 4 Mpx; --max-pixels and --max-request-pixels at a tenth of their defaults
LIMITS = ("--max-pixels", 4_000_000, "--max-request-pixels", 24_000_000, "--max-pixels-in-flight", 24_000_000)


@row("5", f"{SIDE}x{SIDE} PNG with heatmap (limits at 1/10 of the defaults); 12 in /predict/batch; 17 files",
     heavy=True)  # fmt: skip
def row_5(ctx: Ctx, result: Result) -> None:
    data = big_png(SIDE)
    with Server(ctx, *LIMITS) as server:
        idle = server.memory_mb()
        started = time.monotonic()
        one = httpx.post(f"{server.url}/predict?heatmap=true", files={"file": ("big.png", data)},
                         headers=server.headers, timeout=ctx.left(600))  # fmt: skip
        single = {"status": one.status_code, "seconds": round(time.monotonic() - started, 2), **server.memory_mb()}
        started = time.monotonic()
        files = [("file", (f"big{i}.png", data)) for i in range(12)]
        many = httpx.post(f"{server.url}/predict/batch?heatmap=true", files=files, headers=server.headers,
                          timeout=ctx.left(600))  # fmt: skip
        batch = {"status": many.status_code, "seconds": round(time.monotonic() - started, 2), **server.memory_mb()}
        small = png_bytes(np.full((48, 48, 3), 90, np.uint8))
        crowd = httpx.post(f"{server.url}/predict/batch", files=[("file", (f"s{i}.png", small)) for i in range(17)],
                           headers=server.headers, timeout=ctx.left(120))  # fmt: skip
    ok = (single["status"] == 200 and batch["status"] == 413 and batch["seconds"] < 10
          and batch["VmHWM"] - single["VmHWM"] < 100 and crowd.status_code == 413)  # fmt: skip
    verdict(result, ok,
            f"one with heatmap: {single['status']} in {single['seconds']} s, VmHWM {idle['VmHWM']} -> "
            f"{single['VmHWM']} MB; 12 in a batch: {batch['status']} in {batch['seconds']} s, VmHWM "
            f"{batch['VmHWM']} MB ({many.json().get('detail', '')[:90]}); 17 files: {crowd.status_code}",
            idle=idle, single=single, batch=batch, files_17=crowd.status_code)  # fmt: skip


async def _hang_up(url: str, data: bytes, headers: dict[str, str], after: float) -> str:
    async with httpx.AsyncClient(base_url=url, timeout=after, headers=headers) as client:
        try:
            response = await client.post("/predict?heatmap=true", files={"file": ("big.png", data)})
            return f"answered {response.status_code}"
        except httpx.TimeoutException:
            return "hung up"


@row("6", f"10 clients send the {SIDE}x{SIDE} image (heatmap) and hang up after 0.5 s; then a small request",
     heavy=True)  # fmt: skip
def row_6(ctx: Ctx, result: Result) -> None:
    data = big_png(SIDE)
    with Server(ctx, *LIMITS) as server:
        before = server.metric("patchcore_images_total")
        idle = server.memory_mb()

        async def abandon() -> list[str]:
            return await asyncio.gather(*(_hang_up(server.url, data, server.headers, 0.5) for _ in range(10)))

        outcomes = asyncio.run(abandon())
        started = time.monotonic()
        small = png_bytes(np.full((48, 48, 3), 90, np.uint8))
        answer = httpx.post(f"{server.url}/predict", files={"file": ("small.png", small)}, headers=server.headers,
                            timeout=ctx.left(600))  # fmt: skip
        waited = time.monotonic() - started
        time.sleep(2.0)
        scored = server.metric("patchcore_images_total") - before - 1
        after = server.memory_mb()
    hung = outcomes.count("hung up")
    ok = answer.status_code == 200 and scored <= 2 and waited < 30 and hung == 10
    verdict(result, ok,
            f"{hung} of 10 hung up; images scored for them: {scored:.0f}; the next request waited {waited:.2f} s "
            f"({answer.status_code}); VmRSS {idle['VmRSS']} -> {after['VmRSS']} MB",
            scored_for_abandoned=scored, next_waited_s=waited, idle=idle, after=after)  # fmt: skip


@row("7", "train / federated --ray 127.0.0.1:1; SIGTERM to a running train (7d shares the run)")
def row_7(ctx: Ctx, result: Result) -> None:
    config = mvtec_config(ctx, "row7.yaml", ctx.mvtec, ctx.work / "row7_out")
    parts, ok = [], True
    for command in ("train", "federated"):
        ran = cli(ctx, command, "-c", config, "--ray", "127.0.0.1:1", "data.objects=[bottle]", timeout=120)
        good = ran.one_line() and ran.seconds < 30 and not (ctx.work / "row7_out").exists()
        ok &= good
        parts.append(f"{command} --ray: rc {ran.rc} in {ran.seconds:.1f} s, no run folder: "
                     f"{not (ctx.work / 'row7_out').exists()}")  # fmt: skip
    parts.append(f"({ran.line()[:110]})")
    term = result.data.get("sigterm")  # filled by row 7d's live run
    if term is None:
        ok = False
        parts.append("SIGTERM: not measured (row 7d did not run)")
    else:
        ok &= term["rc"] == 143 and term["seconds"] < 30
        parts.append(f"SIGTERM to train mid-run: rc {term['rc']} after {term['seconds']:.1f} s")
    verdict(result, ok, "; ".join(parts))


@row("7b", "serve --max-wait-ms 1e12 / nan; SIGTERM with a half-sent request held open")
def row_7b(ctx: Ctx, result: Result) -> None:
    runs = {v: cli(ctx, "serve", "--model", ctx.model, "--max-wait-ms", v, "--port", free_port()) for v in ("1e12", "nan")}
    with Server(ctx) as server:
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        sock.sendall(_chunked_head(server.port, AUTH) + b"10\r\n0123456789abcdef\r\n")  # and then nothing
        time.sleep(0.5)
        seconds = server.stop(grace=30)
        sock.close()
    ok = all(r.one_line() for r in runs.values()) and seconds is not None and seconds < 15
    verdict(result, ok, f"1e12: rc {runs['1e12'].rc} ({runs['1e12'].line()[:80]}); nan: rc {runs['nan'].rc}; "
            f"SIGTERM with a request held open: " + (f"ended in {seconds:.1f} s" if seconds is not None
                                                       else "still alive after 30 s"))  # fmt: skip


def _jpegs(folder: Path, n: int, side: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    base = np.tile(np.linspace(60, 180, side, dtype=np.float32), (side, 1))[..., None]
    paths = []
    for i in range(n):
        rng = np.random.default_rng(i)
        noise = np.kron(rng.normal(0, 20, (side // 10, side // 10, 3)).astype(np.float32), np.ones((10, 10, 1)))
        path = folder / f"img_{i:04d}.jpg"
        Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


RSS_IMAGES = (8, 40)  # row 7c: peak RSS of predict on N and 5N images of 1500 x 1500, batches of 32


@row("7c", f"predict on {RSS_IMAGES[0]} and {RSS_IMAGES[1]} JPEGs of 1500x1500 (uncalibrated model: the two-pass "
     "path), --batch-size 32 (a default model's), no heatmaps; peak RSS", heavy=True)  # fmt: skip
def row_7c(ctx: Ctx, result: Result) -> None:
    few, many = RSS_IMAGES
    paths = _jpegs(ctx.work / "row7c", many, 1500)
    peaks = {}
    for n in RSS_IMAGES:
        out = ctx.work / f"row7c_out_{n}"
        ran = cli_rss(ctx, "predict", "-m", ctx.uncalibrated, *paths[:n], "--out", out, "--no-progress",
                      "--batch-size", 32, "--no-heatmaps")  # fmt: skip
        assert ran.rc == 0, ran.err[-400:]
        peaks[n] = round(ran.max_rss_mb, 1)
        shutil.rmtree(out)
    per_image = (peaks[many] - peaks[few]) / (many - few)
    ok = per_image < 0.5  # an image is 6.75 MB decoded: growth of a fraction of one over all is noise
    verdict(result, ok, f"peak RSS {peaks[few]} MB for {few} images, {peaks[many]} MB for {many}: "
            f"{per_image:+.2f} MB per extra image", peaks=peaks, per_image_mb=per_image)  # fmt: skip


@row("7d", "train --resume RUN while that run is being written by a live train", heavy=True)
def row_7d(ctx: Ctx, result: Result) -> None:
    from test_workflow import make_mvtec

    from patchcore.app.runs import INCOMPLETE_MARKER

    data = make_mvtec(ctx.work / "row7d_data", classes=MVTEC_CLASSES)
    config = mvtec_config(ctx, "row7d.yaml", data, ctx.work / "row7d_out")
    run_dir = ctx.work / "row7d_out" / "tiny" / "run"
    live = subprocess.Popen([*CLI, "train", "-c", str(config), "--no-progress"], env=env(), cwd=ctx.work,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    end = time.monotonic() + ctx.left(180)
    while not (run_dir / INCOMPLETE_MARKER).exists() and live.poll() is None and time.monotonic() < end:
        time.sleep(0.05)
    before = tree(run_dir)
    second = cli(ctx, "train", "--resume", run_dir)
    still_live = live.poll() is None
    started = time.monotonic()
    live.send_signal(signal.SIGTERM)
    try:
        live.communicate(timeout=30)
        rc = live.returncode
    except subprocess.TimeoutExpired:
        live.kill()
        live.communicate()
        rc = -9
    ctx_sigterm = {"rc": rc, "seconds": time.monotonic() - started, "live_when_signalled": still_live}
    result.data["sigterm"] = ctx_sigterm
    touched = {k for k in before if tree(run_dir).get(k) != before[k]} - {"run.log"}
    ok = still_live and second.one_line() and "being written by another process" in second.line()
    verdict(result, ok, f"resume: rc {second.rc} while the first ran ({second.line()[:120]})",
            sigterm=ctx_sigterm, note=f"files the first run changed meanwhile: {len(touched)}")  # fmt: skip


def _finished_run(ctx: Ctx, name: str, classes: tuple[str, ...] = ("bottle", "screw")) -> tuple[Path, Path]:
    from test_workflow import make_mvtec

    data = make_mvtec(ctx.work / f"{name}_data", classes=classes)
    config = mvtec_config(ctx, f"{name}.yaml", data, ctx.work / f"{name}_out")
    ran = cli(ctx, "train", "-c", config, "--no-progress", timeout=400)
    assert ran.rc == 0, ran.err[-400:]
    return ctx.work / f"{name}_out" / "tiny" / "run", config


@row("8", "train --resume RUN model.percentage=0.2 (a finished run)")
def row_8(ctx: Ctx, result: Result) -> None:
    run_dir, _ = _finished_run(ctx, "row8")
    before = tree(run_dir)
    ran = cli(ctx, "train", "--resume", run_dir, "model.percentage=0.2")
    ok = ran.rc == 2 and "model.percentage: 0.1 -> 0.2" in ran.err and tree(run_dir) == before
    verdict(result, ok, f"rc {ran.rc}, run unchanged: {tree(run_dir) == before}: {ran.line()}")


@row("9", "train --resume RUN -c other.yaml (another data root)")
def row_9(ctx: Ctx, result: Result) -> None:
    from test_workflow import make_mvtec

    run_dir, _ = _finished_run(ctx, "row9")
    other_data = make_mvtec(ctx.work / "row9_other", classes=("bottle",))
    other = mvtec_config(ctx, "row9_other.yaml", other_data, ctx.work / "row9_out")
    before = tree(run_dir)
    ran = cli(ctx, "train", "--resume", run_dir, "-c", other)
    ok = ran.rc == 2 and "data.root" in ran.err and tree(run_dir) == before
    verdict(result, ok, f"rc {ran.rc}, run unchanged: {tree(run_dir) == before}: {ran.line()}")


@row("10", "train killed (kill -9) after its model was saved, before its evaluation; then --resume", heavy=True)
def row_10(ctx: Ctx, result: Result) -> None:
    from test_workflow import make_mvtec

    data = make_mvtec(ctx.work / "row10_data", classes=("bottle",))
    # More test images: a longer evaluation, so that the kill lands inside it.
    test_good = data / "bottle" / "test" / "good"
    for i, source in enumerate(sorted(test_good.glob("*.png")) * 30):
        shutil.copyfile(source, test_good / f"x{i:03d}.png")
    config = mvtec_config(ctx, "row10.yaml", data, ctx.work / "row10_out")
    run_dir = ctx.work / "row10_out" / "tiny" / "run"
    fitted = run_dir / "completed" / "bottle.fitted.json"
    live = subprocess.Popen([*CLI, "train", "-c", str(config), "--no-progress"], env=env(), cwd=ctx.work,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    from patchcore.app.runs import run_state

    def saved_not_evaluated() -> bool:  # the marker says "fitted" (written after the fitted record)
        try:
            return fitted.exists() and run_state(run_dir).objects.get("bottle") == "fitted"
        except (OSError, ValueError):
            return False

    end = time.monotonic() + ctx.left(300)
    while not saved_not_evaluated() and live.poll() is None and time.monotonic() < end:
        time.sleep(0.005)
    live.kill()
    live.wait()
    if not saved_not_evaluated():
        verdict(result, False, "the run ended before the kill could land between fit and evaluation")
        return
    import torch

    def bank() -> np.ndarray:  # the file is rewritten after the evaluation (its records); the bank must not change
        return torch.load(run_dir / "models" / "patchcore_bottle.pt", weights_only=True)["memory_bank"].numpy()

    fitted_bank = bank()
    ran = cli(ctx, "train", "--resume", run_dir, "--no-progress", timeout=400)
    log = (run_dir / "run.log").read_text()
    reused = "evaluated, not refitted" in log and log.count("bottle: fitting on") == 1
    same = bool(np.array_equal(bank(), fitted_bank))
    ok = ran.rc == 0 and reused and same and (run_dir / "results.csv").exists()
    verdict(result, ok, f"killed with the model saved; resume rc {ran.rc}, log: "
            f"{'evaluated, not refitted' if reused else 'refitted'}; memory bank unchanged: {same}")  # fmt: skip


@row("11", "export --format openvino --out DIR holding an ONNX export; and a DIR holding notes.txt")
def row_11(ctx: Ctx, result: Result) -> None:
    out = ctx.work / "row11"
    assert _export(ctx, ctx.model, out).rc == 0
    before = tree(out)
    ran = _export(ctx, ctx.model, out, "openvino")
    notes = ctx.work / "row11_notes"
    notes.mkdir()
    (notes / "notes.txt").write_text("keep")
    other = _export(ctx, ctx.model, notes, "openvino")
    ok = ran.one_line() and other.one_line() and tree(out) == before and sorted(os.listdir(notes)) == ["notes.txt"]
    verdict(result, ok, f"rc {ran.rc} / {other.rc}, files unchanged: {tree(out) == before}: {ran.line()[:150]}")


@row("12", "calibrate one model twice (10 images, then 3 at rate 0.4); two calibrations at once")
def row_12(ctx: Ctx, result: Result) -> None:
    model = copy_model(ctx, "row12.pt")
    many = goods(ctx.work / "row12_a", 10, start=700)
    few = goods(ctx.work / "row12_b", 3, start=800)
    first = cli(ctx, "calibrate", "-m", model, *many)
    second = cli(ctx, "calibrate", "-m", model, *few, "--false-alarm-rate", "0.4")
    named = "replaces the one in" in second.err
    # Two at once, on a fresh copy: both start before either has written.
    model2 = copy_model(ctx, "row12_race.pt")
    procs = [subprocess.Popen([*CLI, "calibrate", "-m", str(model2), *map(str, paths)], env=env(), cwd=ctx.work,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for paths in (many, few)]  # fmt: skip
    outs = [p.communicate(timeout=ctx.left(300)) for p in procs]
    codes = [p.returncode for p in procs]
    refused = [err for (_, err), code in zip(outs, codes, strict=True) if code == 2]
    # Either one was refused ("changed while this calibration ran"), or they ran one after the other and the
    # second said what it replaced: never both rc 0 with one result lost silently.
    serial = codes == [0, 0] and sum("replaces the one in" in err for _, err in outs) == 1
    race_ok = (sorted(codes) == [0, 2] and "changed while" in refused[0]) or serial
    ok = first.rc == 0 and second.rc == 0 and named and race_ok
    race = (f"one refused: {refused[0].strip().splitlines()[-1][:110]}" if refused
            else f"codes {codes}, the second named the first: {serial}")  # fmt: skip
    verdict(result, ok, f"second calibration names the replaced one: {named}; at once: {race}")


@row("13", "calibrate a model file with mode 0444")
def row_13(ctx: Ctx, result: Result) -> None:
    model = copy_model(ctx, "row13.pt")
    model.chmod(0o444)
    before = model.read_bytes()
    ran = cli(ctx, "calibrate", "-m", model, *goods(ctx.work / "row13", 3, start=900))
    ok = ran.one_line() and "read-only" in ran.line() and model.read_bytes() == before
    verdict(result, ok, f"rc {ran.rc}, file unchanged: {model.read_bytes() == before}: {ran.line()[:150]}")


@row("14", "train --resume on a folder that holds only a config.yaml")
def row_14(ctx: Ctx, result: Result) -> None:
    folder = ctx.work / "row14"
    folder.mkdir()
    shutil.copyfile(mvtec_config(ctx, "row14.yaml", ctx.mvtec, ctx.work / "row14_out"), folder / "config.yaml")
    ran = cli(ctx, "train", "--resume", folder)
    ok = ran.one_line() and "not a run folder" in ran.line() and os.listdir(folder) == ["config.yaml"]
    verdict(result, ok, f"rc {ran.rc}, folder holds {sorted(os.listdir(folder))}: {ran.line()[:150]}")


@row("15", "federated sites [sites/a, sites/a]")
def row_15(ctx: Ctx, result: Result) -> None:
    site = ctx.work / "row15" / "sites" / "a"
    site.mkdir(parents=True)
    for image in sorted((ctx.mvtec / "bottle" / "train" / "good").glob("*.png"))[:3]:
        shutil.copyfile(image, site / image.name)
    config = mvtec_config(ctx, "row15.yaml", ctx.mvtec, ctx.work / "row15_out")
    ran = cli(ctx, "federated", "-c", config, "federated.partition=folders", f"federated.sites=[{site}, {site}]",
              "data.objects=[bottle]")  # fmt: skip
    ok = ran.one_line() and "twice" in ran.line() and not (ctx.work / "row15_out").exists()
    verdict(result, ok, f"rc {ran.rc}: {ran.line()}")


@row("16", "calibrate --batch-size 0/-1, into an unwritable folder; export --out a file / under a file / "
     "unwritable; serve --threads 0")  # fmt: skip
def row_16(ctx: Ctx, result: Result) -> None:
    images = goods(ctx.work / "row16", 3, start=950)
    unwritable = Path("/sys/patchcore-probe") if os.geteuid() == 0 else ctx.work / "locked"
    if os.geteuid() != 0:
        unwritable.mkdir()
        unwritable.chmod(0o555)
    a_file = ctx.work / "row16_notes.txt"
    a_file.write_text("keep")
    runs = {
        "calibrate --batch-size 0": cli(ctx, "calibrate", "-m", ctx.model, *images, "--batch-size", "0"),
        "calibrate --batch-size -1": cli(ctx, "calibrate", "-m", ctx.model, *images, "--batch-size", "-1"),
        "calibrate --out unwritable": cli(ctx, "calibrate", "-m", ctx.model, *images, "--out", unwritable / "m.pt"),
        "export --out a file": _export(ctx, ctx.model, a_file),
        "export --out under a file": _export(ctx, ctx.model, a_file / "sub"),
        "export --out unwritable": _export(ctx, ctx.model, unwritable / "x"),
        "serve --threads 0": cli(ctx, "serve", "--model", ctx.model, "--threads", "0"),
    }
    bad = [name for name, ran in runs.items() if not ran.one_line()]
    ok = not bad and a_file.read_text() == "keep"
    verdict(result, ok, "; ".join(f"{name}: rc {ran.rc}" for name, ran in runs.items())
            + (f"; not one line / exit 2: {bad}" if bad else ""),
            lines={name: ran.line() for name, ran in runs.items()})  # fmt: skip


@row("17", "serve on a port already bound")
def row_17(ctx: Ctx, result: Result) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        ran = cli(ctx, "serve", "--model", ctx.model, "--port", busy.getsockname()[1])
    ok = ran.one_line() and "in use" in ran.line()
    verdict(result, ok, f"rc {ran.rc} in {ran.seconds:.1f} s: {ran.line()[:150]}")


@row("18", "serve --model a truncated .pt; a malicious .pt (pickle with code); an export folder with a garbage .onnx")
def row_18(ctx: Ctx, result: Result) -> None:
    truncated = ctx.work / "row18_cut.pt"
    truncated.write_bytes(ctx.model.read_bytes()[:5000])
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(ctx.work / "row18_pwned"),))

    malicious = ctx.work / "row18_evil.pt"
    malicious.write_bytes(pickle.dumps(Evil()))
    export = ctx.work / "row18_export"
    assert _export(ctx, ctx.model, export).rc == 0
    (export / "patchcore.onnx").write_bytes(b"garbage" * 100)
    runs = {
        "truncated": cli(ctx, "serve", "--model", truncated, "--port", free_port()),
        "malicious": cli(ctx, "serve", "--model", malicious, "--port", free_port()),
        "garbage onnx": cli(ctx, "serve", "--model", export, "--runtime", "onnx", "--port", free_port()),
    }
    ok = all(r.one_line() for r in runs.values()) and not (ctx.work / "row18_pwned").exists()
    verdict(result, ok, "; ".join(f"{name}: rc {r.rc} ({r.line()[:70]})" for name, r in runs.items()))


@row("19", "train --ray auto (no cluster) / --ray host:notaport")
def row_19(ctx: Ctx, result: Result) -> None:
    config = mvtec_config(ctx, "row19.yaml", ctx.mvtec, ctx.work / "row19_out")
    from ray._private.services import find_bootstrap_address, find_gcs_addresses

    addresses = ["localhost:notaport"]
    if not (os.environ.get("RAY_ADDRESS") or find_gcs_addresses() or find_bootstrap_address(None)):
        addresses.insert(0, "auto")  # else `auto` would join the cluster that runs here
    runs = {a: cli(ctx, "train", "-c", config, "--ray", a, "data.objects=[bottle]", timeout=120)
            for a in addresses}  # fmt: skip
    ok = all(r.one_line() for r in runs.values()) and not (ctx.work / "row19_out").exists()
    verdict(result, ok, "; ".join(f"{a}: rc {r.rc} in {r.seconds:.1f} s" for a, r in runs.items())
            + f"; no run folder: {not (ctx.work / 'row19_out').exists()}")  # fmt: skip


@row("20", "predict on 300 images + a truncated file last; --skip-bad; streaming; progress on a terminal", heavy=True)
def row_20(ctx: Ctx, result: Result) -> None:
    folder = ctx.work / "row20"
    paths = goods(folder, 300, start=1000)
    data = paths[0].read_bytes()
    last = folder / "zzz_truncated.png"
    last.write_bytes(data[: len(data) // 2])
    out = ctx.work / "row20_out"
    refused = cli(ctx, "predict", "-m", ctx.model, folder, "--out", out, "--no-progress")
    nothing = not out.exists() or not any(out.iterdir())
    # --skip-bad, stderr on a terminal (pty) so that progress bars may show; predictions.jsonl must grow while
    # the command runs (results streamed, not written at the end).
    master, slave = pty.openpty()
    skipping = subprocess.Popen([*CLI, "predict", "-m", str(ctx.model), str(folder), "--out", str(out),
                                 "--skip-bad", "--batch-size", "4"], env={**env(), "COLUMNS": "100"}, cwd=ctx.work,
                                stdout=subprocess.PIPE, stderr=slave, text=True)  # fmt: skip
    os.close(slave)
    terminal, seen_while_running = b"", 0
    jsonl = out / "predictions.jsonl"
    with ThreadPoolExecutor(max_workers=1) as reader:
        stdout = reader.submit(skipping.communicate, timeout=ctx.left(900))
        while not stdout.done():
            if select.select([master], [], [], 0.5)[0]:
                with contextlib.suppress(OSError):
                    terminal += os.read(master, 65536)
            if skipping.poll() is None and jsonl.exists():
                seen_while_running = max(seen_while_running, len(jsonl.read_bytes().splitlines()))
        out_lines = stdout.result()[0].strip().splitlines()
    with contextlib.suppress(OSError):
        while select.select([master], [], [], 0.2)[0]:
            chunk = os.read(master, 65536)
            if not chunk:
                break
            terminal += chunk
    os.close(master)
    lines_seen_while_running = seen_while_running
    shown = terminal.decode(errors="replace")
    named = "zzz_truncated.png" in shown
    progress = "score" in shown or "check" in shown
    ok = (refused.one_line() and "zzz_truncated.png" in refused.line() and nothing and skipping.returncode == 0
          and len(out_lines) == 300 and named and lines_seen_while_running >= 100 and progress)  # fmt: skip
    verdict(result, ok,
            f"without --skip-bad: rc {refused.rc} after {refused.seconds:.1f} s, nothing written: {nothing} "
            f"({refused.line()[:80]}); --skip-bad: rc {skipping.returncode}, {len(out_lines)} lines, the bad file "
            f"named: {named}, {lines_seen_while_running} lines out before the process ended, progress on the "
            f"terminal: {progress}", refused_s=refused.seconds)  # fmt: skip


@row("21", "/openapi.json without the key; key-less server given Host: evil.example / Origin: http://evil.example")
def row_21(ctx: Ctx, result: Result) -> None:
    with Server(ctx) as keyed:
        schema = httpx.get(f"{keyed.url}/openapi.json", timeout=30).status_code
        docs = httpx.get(f"{keyed.url}/docs", timeout=30).status_code
    image = png_bytes(np.asarray(__import__("make_tiny_model").good(3)))
    with Server(ctx, key=False) as open_server:
        host = httpx.get(f"{open_server.url}/models", headers={"Host": "evil.example"}, timeout=30).status_code
        origin = httpx.post(f"{open_server.url}/predict", files={"file": ("a.png", image)},
                            headers={"Origin": "http://evil.example"}, timeout=120).status_code  # fmt: skip
        own = httpx.post(f"{open_server.url}/predict", files={"file": ("a.png", image)},
                         headers={"Origin": open_server.url}, timeout=120).status_code  # fmt: skip
    ok = schema == 401 and docs in (401, 404) and host == 403 and origin == 403 and own == 200
    verdict(result, ok, f"/openapi.json {schema}, /docs {docs}; key-less: Host evil {host}, Origin evil {origin}, "
            f"own origin {own}")  # fmt: skip


@row("22", "params | head; a PNG / the .json sidecar as --model; --false-alarm-rate 1e-300; --max-upload-mb "
     "nan/inf; --api-key-file DIR; --weights notes.txt")  # fmt: skip
def row_22(ctx: Ctx, result: Result) -> None:
    piped = subprocess.run(f"{' '.join(CLI)} params | head -1", shell=True, env=env(), cwd=ctx.work,
                           capture_output=True, text=True, timeout=ctx.left(120))  # fmt: skip
    quiet = piped.stderr.strip() == "" and piped.stdout.strip() != ""
    png = ctx.work / "row22.png"
    __import__("make_tiny_model").good(1).save(png)
    sidecar = ctx.work / "row22.json"
    sidecar.write_text(json.dumps({"object": "x"}))
    notes = ctx.work / "notes.txt"
    notes.write_text("things to remember\n")
    runs = {
        "PNG as --model": cli(ctx, "predict", "-m", png, png, "--out", ctx.work / "row22_a"),
        "JSON as --model": cli(ctx, "predict", "-m", sidecar, png, "--out", ctx.work / "row22_b"),
        "--false-alarm-rate 1e-300": cli(ctx, "calibrate", "-m", ctx.model, png, "--false-alarm-rate", "1e-300"),
        "--max-upload-mb nan": cli(ctx, "serve", "--model", ctx.model, "--max-upload-mb", "nan"),
        "--max-upload-mb inf": cli(ctx, "serve", "--model", ctx.model, "--max-upload-mb", "inf"),
        "--api-key-file DIR": cli(ctx, "serve", "--model", ctx.model, "--api-key-file", ctx.work),
        "--weights notes.txt": cli(ctx, "predict", "-m", ctx.model, png, "--weights", notes, "--out",
                                   ctx.work / "row22_c"),
    }  # fmt: skip
    bad = [n for n, r in runs.items()
           if not r.one_line() or "weights_only" in r.err or "0" * 100 in r.err or r.line().endswith(": 101")]
    ok = quiet and not bad
    verdict(result, ok, f"params | head: stderr {'empty' if quiet else repr(piped.stderr[-80:])}; "
            + "; ".join(f"{n}: rc {r.rc}" for n, r in runs.items()) + (f"; FAILED: {bad}" if bad else ""),
            lines={n: r.line() for n, r in runs.items()})  # fmt: skip


# ----------------------------------------------------------------------------- driver


def setup(ctx: Ctx) -> None:
    import torch
    from make_tiny_model import main as make_tiny
    from test_workflow import make_mvtec

    from patchcore import PatchCore

    torch.set_num_threads(1)
    ctx.model = make_tiny(ctx.work / "tiny")
    model = PatchCore.load(ctx.model, device="cpu")
    model.calibration_ = None
    ctx.uncalibrated = model.save(ctx.work / "tiny" / "patchcore_uncalibrated.pt")
    ctx.mvtec = make_mvtec(ctx.work / "mvtec")


def run_row(ctx: Ctx, number: str, probe: str, function: Callable[[Ctx, Result], None],
            shared: dict[str, Result]) -> Result:  # fmt: skip
    result = shared.setdefault(number, Result(number, probe))
    started = time.monotonic()
    try:
        if time.monotonic() > ctx.deadline:
            result.verdict, result.observed = "not run", "the probe's deadline passed"
        else:
            function(ctx, result)
    except Exception as exc:  # a probe that breaks is reported, the others still run
        result.verdict = "ERROR"
        result.observed = f"{type(exc).__name__}: {str(exc)[:300]}"
        result.data["traceback"] = traceback.format_exc()[-2000:]
    result.seconds = round(time.monotonic() - started, 1)
    print(f"[{result.seconds:7.1f} s] row {number}: {result.verdict}", file=sys.stderr, flush=True)
    if ctx.rows_file is not None:  # each row as it ends: a run cut short still leaves its finished rows
        with ctx.rows_file.open("a") as handle:
            handle.write(json.dumps({**result.__dict__, "load": os.getloadavg()}, default=str) + "\n")
    return result


def order_key(number: str) -> tuple[int, str]:
    digits = "".join(c for c in number if c.isdigit())
    return int(digits), number[len(digits):]


def markdown(results: list[Result]) -> str:
    lines = ["| # | probe | observed | verdict |", "|---|---|---|---|"]
    for r in sorted(results, key=lambda r: order_key(r.row)):
        observed = r.observed.replace("|", "/").replace("\n", " ")
        lines.append(f"| {r.row} | {r.probe.replace('|', '/')} | {observed} | {r.verdict} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", nargs="*", help="row numbers to run (default: all)")
    p.add_argument("--deadline-s", type=float, default=2400, help="stop starting rows after this many seconds")
    p.add_argument("--parallel", type=int, default=3, help="light rows run this many at a time")
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--table-from", nargs="+", metavar="JSONL",
                   help="print the table of rows recorded by earlier runs (the last record of each row wins)")
    args = p.parse_args(argv)
    if args.table_from:
        merged: dict[str, Result] = {}
        for name in args.table_from:
            for line in Path(name).read_text().splitlines():
                record = json.loads(line)
                record.pop("load", None)
                merged[record["row"]] = Result(**record)
        print(markdown(list(merged.values())))
        return 0
    chosen = [r for r in ROWS if not args.rows or r[0] in args.rows]
    if "7" in [r[0] for r in chosen] and "7d" not in [r[0] for r in chosen]:
        chosen += [r for r in ROWS if r[0] == "7d"]  # row 7's SIGTERM is measured on 7d's live run
    work = Path(tempfile.mkdtemp(prefix="probe_hostile_"))
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H%M%S")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ctx = Ctx(work=work, deadline=time.monotonic() + args.deadline_s, rows_file=out / f"probe_hostile_{stamp}.jsonl")
    load_start = os.getloadavg()
    started = time.monotonic()
    shared: dict[str, Result] = {}
    try:
        setup(ctx)
        light = [r for r in chosen if not r[3] and r[0] != "7"]
        heavy = [r for r in chosen if r[3]]
        with ThreadPoolExecutor(max_workers=max(1, args.parallel)) as pool:
            list(pool.map(lambda r: run_row(ctx, r[0], r[1], r[2], shared), light))
        for number, probe, function, _ in heavy:  # alone: they measure memory and time
            run_row(ctx, number, probe, function, shared)
        for number, probe, function, _ in chosen:
            if number == "7":
                shared[number] = Result(number, probe, data={"sigterm": shared.get("7d", Result("", "")).data.get("sigterm")})
                run_row(ctx, number, probe, function, shared)
    finally:
        if args.keep:
            print(f"work folder kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    results = [shared[r[0]] for r in chosen if r[0] in shared]
    table = markdown(results)
    print(table)
    counts = {v: sum(r.verdict == v for r in results) for v in ("pass", "FAIL", "ERROR", "not run")}
    print(f"\n{counts}; {time.monotonic() - started:.0f} s; load average {load_start} -> {os.getloadavg()}")
    record = {
        "when": stamp, "load_start": load_start, "load_end": os.getloadavg(),
        "seconds": round(time.monotonic() - started, 1), "counts": counts, "table": table,
        "rows": [r.__dict__ for r in results],
    }  # fmt: skip
    target = out / f"probe_hostile_{stamp}.json"
    target.write_text(json.dumps(record, indent=1, default=str))
    (out / f"probe_hostile_{stamp}.md").write_text(table + "\n")
    print(f"written: {target}", file=sys.stderr)
    return 0 if counts["FAIL"] == counts["ERROR"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
