"""Issue 24's service probes, rows 5 and 6, re-run against ``patchcore serve`` on loopback (bounded):

- row 5: one 6000 x 6000 PNG (a ~100 kB file) with ``heatmap=true``, then 12 of them in one
  ``/predict/batch`` request: answers, seconds and the server's resident memory (VmRSS now, VmHWM peak);
- row 6: 10 clients send that image with ``heatmap=true`` and hang up after 0.5 s; then one small request:
  how long it waited, how many images the server scored, its memory.

    python benchmarks/make_tiny_model.py /tmp/tiny
    python benchmarks/probe_service_limits.py --model /tmp/tiny/patchcore_tiny.pt
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from _common import big_png
from PIL import Image


def memory_mib(pid: int) -> dict[str, float]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = round(int(value.split()[0]) / 1024.0, 1)
    return fields


def scored(url: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        total += sum(s.value for s in family.samples if s.name == "patchcore_images_total")
    return total


async def hang_up(url: str, data: bytes, after: float) -> str:
    async with httpx.AsyncClient(base_url=url, timeout=after) as client:
        try:
            response = await client.post("/predict?heatmap=true", files={"file": ("big.png", data)})
            return f"answered {response.status_code}"
        except httpx.TimeoutException:
            return "hung up"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--side", type=int, default=6000)
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--batch", type=int, default=12)
    args = p.parse_args(argv)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "patchcore.app.cli", "serve", "--model", f"tiny={args.model}", "--port", str(port),
         "--threads", "1"],
        stderr=subprocess.PIPE,
    )  # fmt: skip
    out: dict = {"load_start": os.getloadavg(), "side": args.side}
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        data = big_png(args.side)
        out["file_bytes"] = len(data)
        out["idle"] = memory_mib(server.pid)
        t0 = time.monotonic()
        one = httpx.post(f"{url}/predict?heatmap=true", files={"file": ("big.png", data)}, timeout=600)
        out["row5_single"] = {"status": one.status_code, "seconds": round(time.monotonic() - t0, 2),
                              **memory_mib(server.pid)}  # fmt: skip
        t0 = time.monotonic()
        files = [("file", (f"big{i}.png", data)) for i in range(args.batch)]
        many = httpx.post(f"{url}/predict/batch?heatmap=true", files=files, timeout=600)
        out["row5_batch"] = {"status": many.status_code, "seconds": round(time.monotonic() - t0, 2),
                             "detail": many.json().get("detail"), **memory_mib(server.pid)}  # fmt: skip
        before = scored(url)

        async def abandon() -> list[str]:
            return await asyncio.gather(*(hang_up(url, data, 0.5) for _ in range(args.clients)))

        outcomes = asyncio.run(abandon())
        t0 = time.monotonic()
        small = io.BytesIO()
        Image.new("RGB", (48, 48), (90, 90, 90)).save(small, "PNG")
        next_one = httpx.post(f"{url}/predict", files={"file": ("small.png", small.getvalue())}, timeout=600)
        waited = time.monotonic() - t0
        time.sleep(2.0)
        out["row6"] = {
            "clients": outcomes, "next_status": next_one.status_code, "next_waited_s": round(waited, 2),
            "images_scored_for_the_abandoned": scored(url) - before - 1, **memory_mib(server.pid),
        }  # fmt: skip
    finally:
        server.terminate()
        server.wait(timeout=60)
    out["load_end"] = os.getloadavg()
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
