"""The settings of ``patchcore serve``, each declared once: its default, its command-line flag, its help and
its range. The CLI builds the ``serve`` parser from :class:`ServiceSettings`; the service checks the same
ranges when built from Python. No heavy imports: ``patchcore --help`` reads this module.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from dataclasses import dataclass, field
from typing import Any

from .errors import DeployError

__all__ = [
    "EXPORTED_RUNTIMES",
    "RENDER_COST",
    "Option",
    "Runtime",
    "ServiceSettings",
    "check_option",
    "serve_options",
]


class Runtime(enum.StrEnum):
    """What runs a served model: torch (a ``.pt`` file) or an exported graph (ONNX Runtime, OpenVINO)."""

    TORCH = "torch"
    ONNX = "onnx"
    OPENVINO = "openvino"


#: The runtimes that run an exported graph (``patchcore export`` writes their formats).
EXPORTED_RUNTIMES: tuple[Runtime, ...] = (Runtime.ONNX, Runtime.OPENVINO)

MIB = 1024 * 1024
#: What an image costs against the pixel budgets when a heatmap is drawn for it, in pixels per
#: pixel: drawing took 72 MB per megapixel at its peak, decoding and scoring 15.5 (NOTES.md, issue 24 row 5).
RENDER_COST = 6


@dataclass(frozen=True)
class Option:
    """How one setting appears on the command line and which values it takes.

    ``kind``: the type the flag parses (int or float: nan and inf are refused); ``low``/``high``: the
    inclusive range, in the flag's unit; ``scale``: the setting = the flag's value x scale (MB -> bytes);
    ``choices``: for a text setting; ``repeat``: the flag may be given several times (a tuple setting).
    """

    flag: str
    help: str
    kind: type = str
    low: float | None = None
    high: float | None = None
    scale: int = 1
    choices: tuple[str, ...] | None = None
    repeat: bool = False

    def range_text(self) -> str:
        return f"{_num(self.low)}..{_num(self.high)}"


def _num(x: float | None) -> str:
    if x is None:
        return ""
    return str(int(x)) if float(x).is_integer() else str(x)


def _setting(default: Any, flag: str, help: str, **option: Any) -> Any:  # noqa: A002 - argparse's word
    return field(default=default, metadata={"option": Option(flag, help, **option)})


def check_option(option: Option, value: Any) -> Any:
    """``value`` (in the flag's unit) if ``option`` takes it; otherwise a ValueError with one line."""
    if option.choices is not None:
        if str(value) not in option.choices:
            raise ValueError(f"must be one of {', '.join(option.choices)}, got {value!r}")
        return value
    if option.kind in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"must be a number, got {value!r}")
        if option.kind is int and not float(value).is_integer():
            raise ValueError(f"must be an integer in {option.range_text()}, got {value!r}")
        if not math.isfinite(value):
            raise ValueError(f"must be a finite number in {option.range_text()}, got {value}")
        if (option.low is not None and value < option.low) or (
            option.high is not None and value > option.high
        ):
            what = "an integer" if option.kind is int else "a number"
            raise ValueError(f"must be {what} in {option.range_text()}, got {_num(value)}")
    return value


def parse_option(option: Option, text: str) -> Any:
    """The setting's value for the flag's text (scaled), or a ValueError with one line."""
    if option.kind is int:
        try:
            value: Any = int(text)
        except ValueError:
            raise ValueError(f"must be an integer in {option.range_text()}, got {text!r}") from None
    elif option.kind is float:
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"must be a number in {option.range_text()}, got {text!r}") from None
    else:
        value = text
    check_option(option, value)
    if option.scale != 1:
        value = int(value * option.scale)
    return value


@dataclass(frozen=True)
class ServiceSettings:
    """How ``patchcore serve`` runs. Every field is a flag of ``patchcore serve`` (``serve_options``)."""

    host: str = _setting("127.0.0.1", "--host", "listen address (the loopback default: this machine only)")
    port: int = _setting(8000, "--port", "TCP port (0: any free port)", kind=int, low=0, high=65535)
    api_key_file: str | None = _setting(
        None, "--api-key-file",
        "file holding the operator key: Bearer auth on every route but /healthz and the page shell",
    )  # fmt: skip
    viewer_key_file: str | None = _setting(
        None, "--viewer-key-file",
        "file holding a second key with viewer rights (score and look; no operator actions)",
    )  # fmt: skip
    allowed_hosts: tuple[str, ...] = _setting(
        (), "--allow-host",
        "a Host name a key-less server also answers to (repeatable; default: the bind address's names)",
        repeat=True,
    )  # fmt: skip
    runtime: Runtime = _setting(
        Runtime.TORCH, "--runtime", "what runs the model", choices=tuple(r.value for r in Runtime)
    )
    device: str = _setting("auto", "--device", "torch device (auto, cpu, cuda, ...)")
    threads: int | None = _setting(
        None,
        "--threads",
        "intra-op threads of torch / the runtime (default: all)",
        kind=int,
        low=1,
        high=1024,
    )
    max_batch: int = _setting(16, "--max-batch", "largest dynamic batch", kind=int, low=1, high=1024)
    max_wait_ms: float = _setting(
        5.0, "--max-wait-ms", "longest wait to fill a batch (ms)", kind=float, low=0, high=1000
    )
    max_upload_bytes: int = _setting(
        20 * MIB, "--max-upload-mb", "largest upload per image (MB)", kind=float, low=0.001, high=2048,
        scale=MIB,
    )  # fmt: skip
    max_pixels: int = _setting(
        40_000_000, "--max-pixels", "largest decoded image (pixels)", kind=int, low=1, high=1_000_000_000
    )
    max_request_pixels: int = _setting(
        240_000_000, "--max-request-pixels",
        f"decoded pixels per request, an image with a heatmap counting {RENDER_COST} times",
        kind=int, low=1, high=10_000_000_000,
    )  # fmt: skip
    max_pixels_in_flight: int = _setting(
        240_000_000, "--max-pixels-in-flight",
        "decoded pixels of all requests at work at once (counted as per request); more wait their turn",
        kind=int, low=1, high=100_000_000_000,
    )  # fmt: skip
    max_files: int = _setting(
        16, "--max-files", "largest number of files in one /predict/batch request", kind=int, low=1, high=1024
    )
    # The inspection station (deploy/station.py): its records, the watched folders, the drift figures.
    station_dir: str | None = _setting(
        None, "--station-dir",
        "folder of the station's audit log and watch results (default: station/ beside the first model)",
    )  # fmt: skip
    watch: tuple[str, ...] = _setting(
        (), "--watch",
        "[MODEL=]DIR: score every new image file that appears in DIR (repeatable, one folder per model)",
        repeat=True,
    )  # fmt: skip
    watch_settle_s: float = _setting(
        1.0, "--watch-settle-s", "a watched file is taken once its size and time stay unchanged this long (s)",
        kind=float, low=0, high=3600,
    )  # fmt: skip
    station_recent: int = _setting(
        500, "--station-recent", "decisions kept in the station's recent list", kind=int, low=1, high=1_000_000
    )
    drift_window: int = _setting(
        200, "--drift-window", "decisions the drift figures look at", kind=int, low=1, high=1_000_000
    )
    audit_max_bytes: int = _setting(
        10 * MIB, "--audit-max-mb", "the station's audit log is rotated past this size (MB)", kind=float,
        low=0.01, high=100_000, scale=MIB,
    )  # fmt: skip

    def __post_init__(self) -> None:
        if not isinstance(self.runtime, Runtime):
            try:
                object.__setattr__(self, "runtime", Runtime(self.runtime))
            except ValueError:
                raise DeployError(
                    f"unknown runtime {self.runtime!r}: {', '.join(r.value for r in Runtime)}"
                ) from None
        object.__setattr__(self, "allowed_hosts", tuple(self.allowed_hosts))
        for f in dataclasses.fields(self):
            option: Option = f.metadata["option"]
            value = getattr(self, f.name)
            if value is None or option.kind is str:
                continue
            try:
                check_option(option, value / option.scale if option.scale != 1 else value)
            except ValueError as exc:
                raise DeployError(f"{option.flag} {exc}") from None
        if self.max_request_pixels > self.max_pixels_in_flight:
            raise DeployError(
                f"--max-request-pixels ({self.max_request_pixels}) exceeds --max-pixels-in-flight "
                f"({self.max_pixels_in_flight}): such a request could never run"
            )

    @property
    def max_body_bytes(self) -> int:
        """The largest request body of a one-image route: one upload plus the multipart framing."""
        return self.max_upload_bytes + 65536

    @property
    def max_batch_body_bytes(self) -> int:
        return self.max_upload_bytes * self.max_files + 65536


def serve_options() -> list[tuple[str, Option, Any]]:
    """(field name, option, default) of every setting, in declaration order."""
    return [(f.name, f.metadata["option"], f.default) for f in dataclasses.fields(ServiceSettings)]
