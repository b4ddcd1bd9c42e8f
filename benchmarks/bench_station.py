"""Load run of the inspection station on loopback: scoring requests at a fixed concurrency with operator
feedback ("good part", each one a model update) interleaved, then a check that every answer is consistent
with the model version it names.

Starts ``patchcore serve`` itself (a subprocess on a free 127.0.0.1 port, with an API key and a station
folder) on a tiny calibrated model (resnet18, seeded random weights, 48 px: benchmarks/make_tiny_model.py),
sends ``--requests`` scoring requests (alternately ``/predict`` and ``/inspect``) with ``--concurrency`` in
flight, and after every ``requests / feedbacks``-th answer one ``/feedback`` (label good, forced past the
guard) on a recent ``/inspect`` decision. Bounded: every phase stops after ``--seconds``.

Consistency: afterwards the final model file is loaded and rolled back version by version (newest first);
at each version the images are scored again, and every answer that named that version must carry that
score (within ``--rtol`` x score + ``--atol``: float32 distances of a freshly loaded index and of one grown
in place differ in their last bits). Resident memory of the
server is read at the start (after warm-up) and at the end. Prints a table, writes JSON.

    python benchmarks/bench_station.py                       # 2,000 requests, concurrency 16, 100 feedbacks
    python benchmarks/bench_station.py --requests 200 --feedbacks 10 --out /tmp/station.json
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import io
import json
import os
import platform
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=2000, help="scoring requests")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--feedbacks", type=int, default=100, help="'good part' feedbacks interleaved")
    p.add_argument("--images", type=int, default=16, help="distinct images cycled through")
    p.add_argument("--threads", type=int, default=None, help="the server's intra-op threads")
    p.add_argument("--seconds", type=float, default=1200.0, help="the load phase stops after this")
    p.add_argument("--rtol", type=float, default=1e-3, help="relative tolerance of the consistency check")
    p.add_argument("--atol", type=float, default=0.02, help="absolute tolerance of the consistency check")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.requests < 1 or args.concurrency < 1 or not 0 <= args.feedbacks <= args.requests:
        p.error("need requests >= 1, concurrency >= 1 and 0 <= feedbacks <= requests")
    return args


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def make_images(count: int) -> list[tuple[str, bytes]]:
    """Good-looking images and, every fourth, one with a bright square (PNG bytes)."""
    sys.path.insert(0, str(ROOT))
    from make_tiny_model import good

    out = []
    for i in range(count):
        image = np.asarray(good(1000 + i)).copy()
        if i % 4 == 3:
            image[14:30, 14:30] = 255
        buffer = io.BytesIO()
        from PIL import Image

        Image.fromarray(image).save(buffer, format="PNG")
        out.append((f"img{i:02d}.png", buffer.getvalue()))
    return out


def start_server(model: Path, key_file: Path, station: Path, port: int, threads: int | None) -> subprocess.Popen:
    command = [
        sys.executable, "-m", "patchcore.app.cli", "serve", "--model", f"tiny={model}",
        "--host", "127.0.0.1", "--port", str(port), "--api-key-file", str(key_file),
        "--station-dir", str(station),
    ]  # fmt: skip
    if threads:
        command += ["--threads", str(threads)]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def wait_ready(url: str, headers: dict, process: subprocess.Popen, timeout: float = 600) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if process.poll() is not None:
            raise RuntimeError(f"server exited: {process.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"{url}/readyz", headers=headers, timeout=2).status_code == 200:
                return time.monotonic() - t0
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    raise TimeoutError("server not ready")


async def run_load(
    url: str, headers: dict, images: list[tuple[str, bytes]], args: argparse.Namespace, pid: int
) -> dict:
    rss: dict[int, float] = {}  # scoring answers so far -> the server's resident memory (MiB)
    answers: list[dict[str, Any]] = []  # {"route", "image", "status", "version", "score", "ms"}
    decisions: list[tuple[str, int]] = []  # (/inspect decision id, image index), not yet fed back
    counter = iter(range(args.requests))
    every = max(1, args.requests // args.feedbacks) if args.feedbacks else 0
    deadline = time.monotonic() + args.seconds
    done = 0
    pending_feedback = 0
    limits = httpx.Limits(max_connections=args.concurrency + 1, max_keepalive_connections=args.concurrency + 1)

    async def feedback(client: httpx.AsyncClient) -> None:
        if not decisions:
            return
        decision, index = decisions.pop()
        t0 = time.perf_counter()
        try:
            r = await client.post("/feedback", json={"decision": decision, "label": "good", "force": True})
            status, body = r.status_code, r.json()
        except (httpx.HTTPError, ValueError) as exc:
            status, body = 0, {"detail": repr(exc)}
        entry = {"route": "/feedback", "image": index, "status": status, "ms": (time.perf_counter() - t0) * 1e3}
        if status == 200:
            d = body["decision"]
            entry.update(version=d["rescored_version"], score=d["rescored_score"], created=body["version"])
        else:
            entry["detail"] = body.get("detail")
        answers.append(entry)

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal done, pending_feedback
        for i in counter:
            if time.monotonic() > deadline:
                return
            index = i % len(images)
            name, data = images[index]
            route = "/predict" if i % 2 == 0 else "/inspect"
            t0 = time.perf_counter()
            try:
                r = await client.post(route, files={"file": (name, data)})
                status, body = r.status_code, r.json()
            except (httpx.HTTPError, ValueError) as exc:
                status, body = 0, {"detail": repr(exc)}
            entry = {"route": route, "image": index, "status": status, "ms": (time.perf_counter() - t0) * 1e3}
            if status == 200:
                entry.update(version=body.get("model_version"), score=body["score"])
                if route == "/inspect":
                    decisions.append((body["id"], index))
            else:
                entry["detail"] = body.get("detail")
            answers.append(entry)
            done += 1
            if done % max(1, args.requests // 10) == 0:
                rss[done] = round(rss_mib(pid), 1)
            if every and done % every == 0:
                pending_feedback += 1
            while pending_feedback and decisions:
                pending_feedback -= 1
                await feedback(client)

    t0 = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=300, limits=limits) as client:
        await asyncio.gather(*(worker(client) for _ in range(args.concurrency)))
    return {
        "answers": answers, "rss_mib": rss, "seconds": time.perf_counter() - t0,
        "stopped_by_time": done < args.requests,
    }  # fmt: skip


def expected_scores(model_path: Path, images: list[tuple[str, bytes]], versions: set[int]) -> dict[int, list[float]]:
    """The images' scores at each version, from the final model file rolled back newest first."""
    from PIL import Image

    from patchcore import PatchCore
    from patchcore.deploy.inference import Predictor

    model = PatchCore.load(model_path, device="cpu")
    pil = [Image.open(io.BytesIO(data)).convert("RGB") for _, data in images]
    out: dict[int, list[float]] = {}
    for version in sorted(versions, reverse=True):
        if version != model.version_:
            model.rollback(version)
        out[version] = [r.score for r in Predictor(model, per_call_range=False).predict(pil)]
    return out


def summarize(run: dict, expected: dict[int, list[float]], rtol: float, atol: float) -> dict[str, Any]:
    """Every answer against the score of its image at the version it names: consistent within
    ``rtol * |expected| + atol`` (float32 distance arithmetic: a freshly loaded index and one grown in place
    differ in the last bits; a patch equal to a bank row gives 0 or a few hundredths). Also counted: the
    answers for which some other version's score lies more than 2 tolerances away (an answer scored by that
    version, but naming this one, would have been caught)."""
    answers = run["answers"]
    ok = [a for a in answers if a["status"] == 200]
    mismatches, worst_abs, worst_rel, telling = [], 0.0, 0.0, 0
    for a in ok:
        if a["version"] not in expected:
            mismatches.append({**a, "why": "version not in the model's history"})
            continue
        want = expected[a["version"]][a["image"]]
        diff = abs(a["score"] - want)
        worst_abs = max(worst_abs, diff)
        if abs(want) > 0.1:
            worst_rel = max(worst_rel, diff / abs(want))
        tol = rtol * abs(want) + atol
        others = [e[a["image"]] for v, e in expected.items() if abs(e[a["image"]] - want) > 2 * tol]
        telling += bool(others)  # an answer from another version would have shown
        if diff > tol:
            mismatches.append({**a, "want": want})
    routes: dict[str, Any] = {}
    for route in ("/predict", "/inspect", "/feedback"):
        ms = np.asarray([a["ms"] for a in answers if a["route"] == route])
        routes[route] = {
            "answers": int(len(ms)),
            "errors": sum(1 for a in answers if a["route"] == route and a["status"] != 200),
            "p50_ms": round(float(np.percentile(ms, 50)), 1) if len(ms) else None,
            "p95_ms": round(float(np.percentile(ms, 95)), 1) if len(ms) else None,
        }
    scoring = sum(1 for a in answers if a["route"] != "/feedback")
    return {
        "scoring_requests": scoring,
        "feedbacks": routes["/feedback"]["answers"],
        "errors": sum(1 for a in answers if a["status"] != 200),
        "error_examples": [a for a in answers if a["status"] != 200][:5],
        "versions_named": len({a["version"] for a in ok}),
        "consistent": len(ok) - len(mismatches),
        "inconsistent": len(mismatches),
        "inconsistent_examples": mismatches[:5],
        "answers_another_version_would_contradict": telling,
        "max_abs_diff": worst_abs,
        "max_rel_diff_scores_over_0.1": worst_rel,
        "seconds": round(run["seconds"], 2),
        "throughput_rps": round(scoring / run["seconds"], 2),
        "routes": routes,
        "stopped_by_time": run["stopped_by_time"],
    }


def print_table(result: dict) -> None:
    s = result["summary"]
    print()
    print("| requests (scoring) | concurrency | feedbacks | errors | versions named | answers consistent "
          "| max abs / rel diff | wall s | req/s | RSS start MiB | RSS end MiB |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(
        f"| {s['scoring_requests']} | {result['settings']['concurrency']} | {s['feedbacks']} | {s['errors']} "
        f"| {s['versions_named']} | {s['consistent']} / {s['consistent'] + s['inconsistent']} "
        f"| {s['max_abs_diff']:.1e} / {s['max_rel_diff_scores_over_0.1']:.1e} | {s['seconds']} "
        f"| {s['throughput_rps']} | {result['rss_mib']['start']} | {result['rss_mib']['end']} |"
    )
    print()
    print("| route | answers | errors | p50 ms | p95 ms |")
    print("|---|---:|---:|---:|---:|")
    for route, r in s["routes"].items():
        print(f"| {route} | {r['answers']} | {r['errors']} | {r['p50_ms']} | {r['p95_ms']} |")
    print(f"\nserver RSS (MiB) after N scoring answers: {result['rss_mib']['during']}")
    print(f"\nload average start {result['machine']['load_start']}, end {result['machine']['load_end']}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import make_tiny_model

    result: dict[str, Any] = {
        "created": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_start": os.getloadavg()},
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }
    out = args.out or ROOT / "out" / "station.json"
    with tempfile.TemporaryDirectory(prefix="patchcore-station-") as tmp:
        base = Path(tmp)
        model = make_tiny_model.main(base / "model")
        key = secrets.token_urlsafe(24)
        key_file = base / "key.txt"
        key_file.write_text(key + "\n")
        headers = {"Authorization": f"Bearer {key}"}
        images = make_images(args.images)
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        process = start_server(model, key_file, base / "station", port, args.threads)
        try:
            result["startup_seconds"] = round(wait_ready(url, headers, process), 2)
            for name, data in images[:4]:  # warm-up
                httpx.post(f"{url}/predict", files={"file": (name, data)}, headers=headers, timeout=120)
            rss_start = rss_mib(process.pid)
            run = asyncio.run(run_load(url, headers, images, args, process.pid))
            rss_end = rss_mib(process.pid)
            history = httpx.get(f"{url}/history", headers=headers, timeout=60).json()
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
        result["machine"]["load_end"] = os.getloadavg()
        result["rss_mib"] = {"start": round(rss_start, 1), "end": round(rss_end, 1), "during": run["rss_mib"]}
        result["final_version"] = history["version"]
        versions = {a["version"] for a in run["answers"] if a["status"] == 200}
        result["summary"] = summarize(run, expected_scores(model, images, versions), args.rtol, args.atol)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print_table(result)
    print(json.dumps(result["summary"], default=str))
    print(f"written: {out}")
    return 0 if result["summary"]["errors"] == 0 and result["summary"]["inconsistent"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
