"""Pretrained weights fetched on first use, the way torchvision does it.

A torchvision weights file lands in the torch hub cache (``torch.hub.get_dir()/checkpoints``) under its
published name, which carries a prefix of the file's SHA-256 (``wide_resnet50_2-95faca4d.pth``). The first
use downloads it (urllib, a progress bar on stderr), checks the prefix of the real hash against the one the
name promises, and only then renames the temporary file into place: an interrupted or corrupted download is
never used, and never left where a later run would take it for the real file.

- ``PATCHCORE_OFFLINE=1`` (or ``patchcore ... --offline``) never touches the network: a missing file is the
  error that says which file to put where.
- ``PATCHCORE_WEIGHTS_MIRROR=https://server/path`` fetches ``<mirror>/<file name>`` instead of the upstream
  URL (networks that reach only an internal server).

:data:`EXPECTED_SHA256_PREFIX` maps a file name to the hash prefix it must have; a name that is not in it
is checked against the prefix its name carries (torchvision's convention). Tests inject entries there for
files they generate; the production table is empty, so every real file is checked against torchvision's
published prefix.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

from ..fileio import _UMASK

__all__ = [
    "EXPECTED_SHA256_PREFIX",
    "MIRROR_ENV",
    "OFFLINE_ENV",
    "WeightsUnavailableError",
    "expected_prefix",
    "fetch_weights",
    "is_offline",
]

OFFLINE_ENV = "PATCHCORE_OFFLINE"
MIRROR_ENV = "PATCHCORE_WEIGHTS_MIRROR"

# file name -> required SHA-256 prefix, overriding the prefix in the name (tests; empty in production).
EXPECTED_SHA256_PREFIX: dict[str, str] = {}

# torch.hub's convention: "<name>-<hex digits>.<ext>"; the hex digits are the first digits of the SHA-256.
_HASH_IN_NAME = re.compile(r"-([a-f0-9]{6,})\.")
_CHUNK = 1 << 20
_TIMEOUT_S = 60.0


class WeightsUnavailableError(RuntimeError):
    """A weights file is not on this machine and cannot (or may not) be downloaded."""


def is_offline() -> bool:
    """Whether ``PATCHCORE_OFFLINE`` forbids downloads (``1``, ``true``, ``yes``, ``on``)."""
    return os.environ.get(OFFLINE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def expected_prefix(file_name: str) -> str | None:
    """The SHA-256 prefix ``file_name`` must have: the injected one, else the one its name carries."""
    if file_name in EXPECTED_SHA256_PREFIX:
        return EXPECTED_SHA256_PREFIX[file_name].lower()
    match = _HASH_IN_NAME.search(file_name)
    return match.group(1) if match else None


def _source_url(file_name: str, url: str) -> str:
    mirror = os.environ.get(MIRROR_ENV, "").strip()
    if not mirror:
        return url
    return mirror.rstrip("/") + "/" + file_name


def fetch_weights(file_name: str, url: str, directory: Path, what: str, progress: bool = True) -> Path:
    """``directory/file_name``, downloaded from ``url`` (or the mirror) when it is not there yet.

    ``what`` names the weights in messages (``"the ImageNet weights of backbone 'wideresnet50'"``). A file
    already in place is used as it is (torchvision does not re-hash its cache either).
    """
    path = Path(directory) / file_name
    if path.is_file():
        return path
    source = _source_url(file_name, url)
    manual = (
        f"Put the file {file_name} into {path.parent} (download it from {url}), or pass weights=PATH to a "
        "copy of it."
    )
    if is_offline():
        raise WeightsUnavailableError(
            f"{what} are not on this machine and cannot be downloaded here ({OFFLINE_ENV} is set). {manual}"
        )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WeightsUnavailableError(f"{what}: cannot create the cache folder {path.parent}: {exc}") from exc
    prefix = expected_prefix(file_name)
    try:
        _download(source, path, prefix, progress)
    except WeightsUnavailableError as exc:
        raise WeightsUnavailableError(f"{what}: {exc}. {manual}") from None
    return path


def _download(url: str, target: Path, prefix: str | None, progress: bool) -> None:
    """Stream ``url`` into a temporary file beside ``target``; hash, check, then rename into place."""
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    temp_path = Path(temporary)
    try:
        digest = hashlib.sha256()
        received = 0
        try:
            request = urllib.request.Request(url, headers={"User-Agent": "patchcore"})
            with (
                urllib.request.urlopen(request, timeout=_TIMEOUT_S) as response,
                os.fdopen(handle, "wb") as out,
            ):
                handle = -1
                length = response.headers.get("Content-Length")
                total = int(length) if length and length.isdigit() else None
                with _progress_bar(target.name, total, progress) as advance:
                    while True:
                        chunk = response.read(_CHUNK)
                        if not chunk:
                            break
                        out.write(chunk)
                        digest.update(chunk)
                        received += len(chunk)
                        advance(len(chunk))
                out.flush()
                os.fsync(out.fileno())
        except urllib.error.HTTPError as exc:
            raise WeightsUnavailableError(f"downloading {url} failed: HTTP {exc.code} {exc.reason}") from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise WeightsUnavailableError(f"downloading {url} failed: {reason}") from None
        except Exception as exc:  # http.client.IncompleteRead and friends: the connection died
            raise WeightsUnavailableError(
                f"downloading {url} failed after {received} bytes: {exc!r}"
            ) from None
        if total is not None and received != total:
            raise WeightsUnavailableError(
                f"downloading {url} stopped after {received} of {total} bytes (the connection was closed)"
            )
        if received == 0:
            raise WeightsUnavailableError(f"downloading {url} gave an empty file")
        actual = digest.hexdigest()
        if prefix is not None and not actual.startswith(prefix):
            raise WeightsUnavailableError(
                f"the file downloaded from {url} has SHA-256 {actual[: max(len(prefix), 8)]}..., not the "
                f"expected {prefix}... (a corrupted download, or a mirror serving another file); it was not kept"
            )
        os.chmod(temp_path, 0o644 & ~_UMASK)  # mkstemp's 0600 -> what a plain download would get
        os.replace(temp_path, target)
    finally:
        if handle != -1:
            os.close(handle)
        temp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def _progress_bar(name: str, total: int | None, enabled: bool) -> Iterator[Callable[[int], None]]:
    """A rich progress bar on stderr while the body runs; yields ``advance(bytes)`` (a no-op when disabled)."""
    if not enabled:
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    bar = Progress(
        TextColumn("downloading {task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
        TimeRemainingColumn(), console=Console(file=sys.stderr),
    )  # fmt: skip
    with bar:
        task = bar.add_task(name, total=total)
        yield lambda n: bar.advance(task, n)
