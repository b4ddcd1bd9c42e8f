"""What the benchmarks share: the ELPV split they time on, the machine's facts (CPU model and flags, memory,
load average) recorded beside every figure, and the Markdown table they print.

Imported by the scripts in this folder as ``from _common import ...`` (they run as ``python
benchmarks/<script>.py``, which puts this folder on ``sys.path``).
"""

from __future__ import annotations

import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "big_png",
    "cpu_flags",
    "cpu_model",
    "elpv_model_settings",
    "elpv_split",
    "load_average",
    "machine_facts",
    "markdown_table",
    "meminfo_gib",
]


def elpv_split(object_name: str, train_limit: int | None = None, test_limit: int | None = None):
    """The ELPV cells of ``object_name`` (mono / poly) as the library splits them (train: the first 2/3 of the
    good cells in file order), cut to the first ``train_limit`` / ``test_limit`` images."""
    from patchcore.data import load_elpv

    obj = load_elpv(objects=[object_name])[0]
    return obj.train[:train_limit], obj.test[:test_limit]


def elpv_model_settings() -> dict[str, Any]:
    """The estimator settings of the shipped configs/elpv.yaml (its ``model`` section), read from the file so a
    benchmark times what users run and cannot drift from it."""
    import yaml

    config = yaml.safe_load((Path(__file__).resolve().parent.parent / "configs" / "elpv.yaml").read_text())
    return dict(config["model"])


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages, rounded: a timing taken on busy CPUs says so."""
    return [round(x, 2) for x in os.getloadavg()]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> list[str]:
    """The CPU flags that decide the fast matrix paths (bf16, AMX, AVX-512), from /proc/cpuinfo."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return sorted(f for f in flags if "bf16" in f or "amx" in f or f in ("avx512f", "avx512_vnni"))
    except OSError:
        pass
    return []


def meminfo_gib(field: str) -> float | None:
    """A /proc/meminfo field (e.g. MemTotal) in GiB, or None where there is none."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(field + ":"):
                return round(int(line.split()[1]) / 2**20, 2)
    except OSError:
        pass
    return None


def machine_facts() -> dict[str, Any]:
    """CPU, memory, platform and the load average now, as every benchmark records them."""
    load = os.getloadavg()
    return {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_total_gib": meminfo_gib("MemTotal"),
        "load_average": [round(x, 2) for x in load],
        # Another job on the CPUs skews every timing (OpenMP threads wait for busy cores): flagged here.
        "busy": load[0] > 0.5 * (os.cpu_count() or 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> str:
    """A Markdown table. ``align``: one letter per column, ``l`` or ``r`` (default: the first column left, the
    others right: numbers)."""
    align = align or "l" + "r" * (len(columns) - 1)
    if len(align) != len(columns) or set(align) - {"l", "r"}:
        raise ValueError(f"align {align!r} does not fit {len(columns)} columns")
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" if a == "l" else "---:" for a in align) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def big_png(side: int) -> bytes:
    """A smooth horizontal gradient as PNG bytes: a small file that decodes to side x side RGB pixels (probes of
    decoded-pixel budgets)."""
    import io

    import numpy as np
    from PIL import Image

    ramp = np.linspace(0, 255, side, dtype=np.float32)
    image = (ramp[None, :, None] + np.zeros((side, 1, 3), np.float32)).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "PNG", optimize=True)
    return buffer.getvalue()
