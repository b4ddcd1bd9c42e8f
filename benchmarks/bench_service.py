"""Load test of ``patchcore serve`` on loopback: throughput and latency percentiles at several
concurrencies, a long run watching the server's resident memory, a run with bad uploads mixed in, and the
parity of the service's scores with ``patchcore predict``'s (the Predictor) on the same files.

Starts the server itself (a subprocess on a free 127.0.0.1 port), drives it with an async httpx client,
stops it at the end; every phase is bounded in requests and in seconds. Prints a table, writes JSON.

    python benchmarks/bench_service.py --model results/elpv/effnetlite0_224/models/patchcore_mono.pt
    python benchmarks/bench_service.py --model M --long-requests 10000 --levels 1 8 32
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import io
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from patchcore.deploy.settings import Runtime

ROOT = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model file (.pt) or export folder (with --runtime)")
    p.add_argument("--runtime", default=Runtime.TORCH.value, choices=[r.value for r in Runtime])
    p.add_argument("--object", default="mono", help="ELPV cells whose test images are sent")
    p.add_argument("--images", type=int, default=64, help="distinct test images cycled through")
    p.add_argument("--levels", type=int, nargs="+", default=[1, 8, 32], help="concurrencies measured")
    p.add_argument("--requests-per-level", type=int, default=256)
    p.add_argument("--long-requests", type=int, default=10_000, help="the long run (memory flatness)")
    p.add_argument("--long-concurrency", type=int, default=16)
    p.add_argument("--bad-requests", type=int, default=500, help="the mixed run, 10%% of them bad uploads")
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--threads", type=int, default=None, help="the server's intra-op threads")
    p.add_argument("--phase-seconds", type=float, default=1800.0, help="every phase stops after this")
    p.add_argument("--out", type=Path, default=None)
    return p.parse_args(argv)


# --------------------------------------------------------------------------- server


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(args: argparse.Namespace, port: int) -> subprocess.Popen:
    command = [
        sys.executable, "-m", "patchcore.app.cli", "serve", "--model", f"{args.object}={args.model}",
        "--host", "127.0.0.1", "--port", str(port), "--runtime", args.runtime,
        "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms),
    ]  # fmt: skip
    if args.threads:
        command += ["--threads", str(args.threads)]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def wait_ready(url: str, process: subprocess.Popen, timeout: float = 600) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if process.poll() is not None:
            raise RuntimeError(f"server exited: {process.stderr.read().decode()[-2000:]}")
        try:
            response = httpx.get(f"{url}/readyz", timeout=2)
            if response.status_code == 200:
                return time.monotonic() - t0
            if "error" in response.json():
                raise RuntimeError(f"the server cannot load the model: {response.json()['error']}")
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    raise TimeoutError("server not ready")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


# --------------------------------------------------------------------------- load


def test_images(obj: str, count: int) -> list[tuple[str, bytes, Path]]:
    from patchcore.data import load_dataset

    (data,) = load_dataset("elpv", None, [obj])
    samples = data.test[:: max(1, len(data.test) // count)][:count]
    return [(s.image_path.name, s.image_path.read_bytes(), s.image_path) for s in samples]


def cli_predict_scores(args: argparse.Namespace, paths: list[Path]) -> list[float]:
    """What ``patchcore predict`` prints for these files (its JSON lines), run as users run it."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="patchcore-predict-") as tmp:
        command = [
            sys.executable, "-m", "patchcore.app.cli", "predict", "--model", str(args.model),
            *map(str, paths), "--out", str(Path(tmp) / "p"), "--no-heatmaps", "--device", "cpu",
        ]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, check=True)
    return [json.loads(line)["score"] for line in done.stdout.splitlines()]


def bad_uploads(good: bytes) -> list[tuple[str, bytes, int]]:
    import gzip

    from PIL import Image

    bomb = io.BytesIO()
    Image.new("1", (12000, 12000)).save(bomb, "PNG")  # 144 M pixels in a few kB
    return [
        ("empty.png", b"", 400),
        ("notes.png", b"not an image\n" * 50, 400),
        ("truncated.png", good[: len(good) // 3], 400),
        ("bomb.png", bomb.getvalue(), 413),
        ("archive.png", gzip.compress(good), 400),  # a name that says PNG, content that is not
    ]


async def run_load(
    url: str, items: list[tuple[str, bytes]], n: int, concurrency: int, seconds: float, on_done=None
) -> dict[str, Any]:
    """``n`` requests cycling over ``items`` with ``concurrency`` in flight; latencies and answers."""
    latencies: list[float] = []
    answers: list[tuple[int, int, dict | None]] = []  # (item index, status, body)
    counter = iter(range(n))
    deadline = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def worker(client: httpx.AsyncClient) -> None:
        for i in counter:
            if time.monotonic() > deadline:
                return
            name, data = items[i % len(items)]
            t0 = time.perf_counter()
            try:
                response = await client.post("/predict", files={"file": (name, data)})
                status, body = response.status_code, response.json()
            except (httpx.HTTPError, ValueError) as exc:
                status, body = 0, {"detail": repr(exc)}
            latencies.append(time.perf_counter() - t0)
            answers.append((i % len(items), status, body))
            if on_done is not None:
                on_done(len(answers))

    t0 = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    lat = np.asarray(latencies) * 1000.0
    return {
        "requests": len(answers),
        "concurrency": concurrency,
        "seconds": round(wall, 3),
        "throughput_rps": round(len(answers) / wall, 2) if wall else None,
        "p50_ms": round(float(np.percentile(lat, 50)), 1) if len(lat) else None,
        "p95_ms": round(float(np.percentile(lat, 95)), 1) if len(lat) else None,
        "p99_ms": round(float(np.percentile(lat, 99)), 1) if len(lat) else None,
        "errors": sum(1 for _, s, _ in answers if s != 200),
        "answers": answers,
        "stopped_by_time": len(answers) < n,
    }


def batch_stats(url: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for s in family.samples:
            if s.name in ("patchcore_batch_size_sum", "patchcore_batch_size_count"):
                out[s.name] = s.value
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    files = test_images(args.object, args.images)
    images = [(name, data) for name, data, _ in files]
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    result: dict[str, Any] = {
        "created": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_start": os.getloadavg()},
        "model": str(args.model),
        "runtime": args.runtime,
        "settings": {k: v for k, v in vars(args).items() if k not in ("out",)},
    }
    result["settings"]["model"] = str(args.model)
    out = args.out or ROOT / "out" / f"service_{args.object}_{args.runtime}.json"
    process = start_server(args, port)
    try:
        result["startup_seconds"] = round(wait_ready(url, process), 2)
        if args.runtime == "torch":
            expected = cli_predict_scores(args, [path for _, _, path in files])
        else:  # an export folder: the same Predictor that `patchcore predict` uses, on that runtime
            from PIL import Image

            from patchcore.deploy.inference import Predictor

            reference = Predictor.load(args.model, runtime=args.runtime)
            expected = [r.score for r in reference.predict([Image.open(io.BytesIO(d)) for _, d in images])]
        parity = asyncio.run(run_load(url, images, len(images), 4, args.phase_seconds))
        got = {i: body["score"] for i, s, body in parity.pop("answers") if s == 200}
        rel = [abs(got[i] - expected[i]) / abs(expected[i]) for i in got]
        result["parity"] = {"images": len(images), "answered": len(got), "max_rel_diff": max(rel)}
        print(
            f"parity with patchcore predict on {len(images)} images: max rel diff {max(rel):.2e}", flush=True
        )

        result["levels"] = []
        for level in args.levels:
            before = batch_stats(url)
            stats = asyncio.run(run_load(url, images, args.requests_per_level, level, args.phase_seconds))
            stats.pop("answers")
            after = batch_stats(url)
            batches = after["patchcore_batch_size_count"] - before.get("patchcore_batch_size_count", 0)
            scored = after["patchcore_batch_size_sum"] - before.get("patchcore_batch_size_sum", 0)
            stats["mean_batch"] = round(scored / batches, 2) if batches else None
            result["levels"].append(stats)
            print(json.dumps(stats), flush=True)
            atomic_dump(out, result)

        # Long run: resident memory at request 1,000 and every 1,000 after.
        samples: dict[int, float] = {}

        def on_done(count: int) -> None:
            if count % 1000 == 0 or count == 1:
                samples[count] = round(rss_mib(process.pid), 1)

        if args.long_requests > 0:
            long = asyncio.run(
                run_load(url, images, args.long_requests, args.long_concurrency, args.phase_seconds, on_done)
            )
            long.pop("answers")
            samples[long["requests"]] = round(rss_mib(process.pid), 1)
            base = samples.get(1000)
            long["rss_mib"] = samples
            if base:
                later = [v for k, v in samples.items() if k >= 1000]
                long["rss_growth_from_1000"] = round(max(later) / base - 1.0, 4)
            result["long"] = long
            print(json.dumps(long), flush=True)
            atomic_dump(out, result)

        # 10 % bad uploads mixed in.
        bad = bad_uploads(images[0][1])
        mixed: list[tuple[str, bytes]] = []
        expect: list[tuple[str, int, float | None]] = []
        for i in range(args.bad_requests):
            if i % 10 == 9:
                name, data, status = bad[(i // 10) % len(bad)]
                mixed.append((name, data))
                expect.append((name, status, None))
            else:
                j = i % len(images)
                mixed.append(images[j])
                expect.append((images[j][0], 200, expected[j]))
        run = asyncio.run(run_load(url, mixed, len(mixed), 8, args.phase_seconds))
        wrong = []
        for i, status, body in run.pop("answers"):
            name, want, score = expect[i]
            if status != want or (score is not None and abs(body["score"] - score) > 1e-4 * abs(score)):
                wrong.append({"i": i, "name": name, "status": status, "want": want})
        run["bad_sent"] = sum(1 for _, s, _ in expect if s != 200)
        run["unexpected"] = wrong[:20]
        run["n_unexpected"] = len(wrong)
        result["mixed"] = run
        print(json.dumps(run), flush=True)
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        result["machine"]["load_end"] = os.getloadavg()
        atomic_dump(out, result)
    print_table(result)
    print(f"written: {out}")
    return 0


def atomic_dump(path: Path, data: dict) -> None:
    from patchcore.fileio import atomic_write_json

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, data)


def print_table(result: dict[str, Any]) -> None:
    print(
        f"\nservice load test ({result['runtime']}, {result['model']}), load avg at start {result['machine']['load_start']}"
    )
    print("| concurrency | requests | throughput req/s | p50 ms | p95 ms | p99 ms | mean batch | errors |")
    print("|---|---|---|---|---|---|---|---|")
    for s in result.get("levels", []):
        print(
            f"| {s['concurrency']} | {s['requests']} | {s['throughput_rps']} | {s['p50_ms']} | {s['p95_ms']} | "
            f"{s['p99_ms']} | {s['mean_batch']} | {s['errors']} |"
        )
    long = result.get("long")
    if long:
        print(
            f"long run: {long['requests']} requests at concurrency {long['concurrency']}, {long['errors']} errors, "
            f"{long['throughput_rps']} req/s, RSS MiB {long['rss_mib']}, growth from request 1000: "
            f"{long.get('rss_growth_from_1000')}"
        )
    mixed = result.get("mixed")
    if mixed:
        print(
            f"mixed run: {mixed['requests']} requests, {mixed['bad_sent']} bad uploads, "
            f"{mixed['n_unexpected']} unexpected answers"
        )


if __name__ == "__main__":
    sys.exit(main())
