"""Backbone weights fetched on first use (engine/weights.py), against a real HTTP server on loopback.

The server (http.server in a thread, 127.0.0.1 only) serves the files of a folder; it can be told to close
the connection half-way through a file. A test network registered under a test-only name stands in for a
torchvision backbone, so the files are small; the end-to-end test at the bottom trains the default WRN50
through the CLI from a mirror.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from patchcore.app import cli
from patchcore.engine import backbones, weights
from patchcore.engine.backbones import BackboneError, BackboneSpec, ensure_weights, load_backbone


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - the http.server API
        server: _Server = self.server  # type: ignore[assignment]
        server.requests.append(self.path)
        name = self.path.rsplit("/", 1)[-1]
        path = server.folder / name
        if not path.is_file() or self.path != server.prefix + name:
            self.send_error(404)
            return
        data = path.read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if name in server.cut:
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)  # the connection dies half-way
            self.close_connection = True
            return
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


class _Server(http.server.ThreadingHTTPServer):
    def __init__(self, folder: Path):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.folder = folder
        self.prefix = "/models/"  # files are served at <prefix><name> only
        self.cut: set[str] = set()
        self.requests: list[str] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@pytest.fixture
def server(tmp_path) -> Iterator[_Server]:
    folder = tmp_path / "served"
    folder.mkdir()
    httpd = _Server(folder)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield httpd
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def online(monkeypatch, tmp_path) -> Path:
    """Downloads allowed (conftest turns them off), a fresh torch hub cache; returns its checkpoints folder."""
    monkeypatch.delenv(weights.OFFLINE_ENV, raising=False)
    monkeypatch.delenv(weights.MIRROR_ENV, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    return tmp_path / "torch_home" / "hub" / "checkpoints"


def _tiny_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1))


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nobody listens there once the socket is closed


@pytest.fixture
def tiny_backbone(server) -> Iterator[tuple[str, Path, dict]]:
    """A registered test backbone whose weights file (name-<sha256 prefix>.pth) the server holds."""
    torch.manual_seed(5)
    state = _tiny_net().state_dict()
    staging = server.folder / "staging.pth"
    torch.save(state, staging)
    prefix = hashlib.sha256(staging.read_bytes()).hexdigest()[:8]
    file_name = f"tinynet-{prefix}.pth"
    staging.rename(server.folder / file_name)
    name = "test-tinynet"
    backbones.register_backbone(
        BackboneSpec(
            name=name, build=_tiny_net, default_layers=("0",), weights_file=file_name,
            weights_url=f"{server.url}/models/{file_name}", weights_label="test:tinynet",
        )
    )  # fmt: skip
    try:
        yield name, server.folder / file_name, state
    finally:
        backbones._REGISTRY.pop(name, None)


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def test_first_use_downloads_into_the_hub_cache_checks_the_hash_and_is_not_repeated(
    online, server, tiny_backbone, capsys
):
    name, served, state = tiny_backbone
    network, wid, _ = load_backbone(name)
    assert wid == "test:tinynet"
    assert f"downloading {served.name}" in capsys.readouterr().err  # the progress bar, on stderr
    assert _files(online) == [served.name]  # no temporary file left beside it
    assert (online / served.name).read_bytes() == served.read_bytes()
    for key, value in state.items():
        assert torch.equal(network.state_dict()[key], value)
    assert server.requests == [f"/models/{served.name}"]
    load_backbone(name)  # second use: read from the cache, no request
    assert len(server.requests) == 1


def test_a_file_whose_hash_does_not_match_its_name_is_refused_and_not_kept(online, server, tiny_backbone):
    name, served, _ = tiny_backbone
    served.write_bytes(served.read_bytes() + b"tampered")  # same name, other content
    with pytest.raises(BackboneError, match=r"SHA-256 .* not the expected .*it was not kept"):
        load_backbone(name)
    assert _files(online) == []


def test_an_injected_expected_hash_overrides_the_one_in_the_name(online, server, tiny_backbone, monkeypatch):
    name, served, _ = tiny_backbone
    monkeypatch.setitem(weights.EXPECTED_SHA256_PREFIX, served.name, "0123abcd")
    with pytest.raises(BackboneError, match="0123abcd"):
        load_backbone(name)
    real = hashlib.sha256(served.read_bytes()).hexdigest()[:12]
    monkeypatch.setitem(weights.EXPECTED_SHA256_PREFIX, served.name, real)
    load_backbone(name)
    assert _files(online) == [served.name]


def test_a_connection_dying_half_way_is_refused_and_no_partial_file_is_used(online, server, tiny_backbone):
    name, served, _ = tiny_backbone
    server.cut.add(served.name)
    for _ in range(2):  # the second try does not find a half file from the first
        with pytest.raises(BackboneError, match=r"downloading .*tinynet"):
            load_backbone(name)
        assert _files(online) == []
    server.cut.clear()
    load_backbone(name)  # a working connection then gives the whole file
    assert (online / served.name).read_bytes() == served.read_bytes()


def test_offline_refuses_with_the_file_and_folder_and_makes_no_request(
    online, server, tiny_backbone, monkeypatch
):
    name, served, _ = tiny_backbone
    monkeypatch.setenv(weights.OFFLINE_ENV, "1")
    with pytest.raises(BackboneError) as info:
        load_backbone(name)
    message = str(info.value)
    assert "are not on this machine and cannot be downloaded here" in message
    assert served.name in message and str(online) in message and "weights=PATH" in message
    assert server.requests == []
    assert not online.exists() or _files(online) == []


def test_the_mirror_serves_the_file_name_appended_to_its_base_url(online, server, tiny_backbone, monkeypatch):
    name, served, _ = tiny_backbone
    # The upstream URL is unreachable; only the internal server answers.
    backbones._REGISTRY[name] = BackboneSpec(
        name=name, build=_tiny_net, default_layers=("0",), weights_file=served.name,
        weights_url=f"http://127.0.0.1:{_closed_port()}/{served.name}", weights_label="test:tinynet",
    )  # fmt: skip
    server.prefix = "/internal/torch/"
    monkeypatch.setenv(weights.MIRROR_ENV, f"{server.url}/internal/torch/")
    assert ensure_weights(name) == online / served.name
    assert server.requests == [f"/internal/torch/{served.name}"]


def test_an_unreachable_server_or_a_missing_file_names_the_url(online, server, tiny_backbone, monkeypatch):
    name, served, _ = tiny_backbone
    monkeypatch.setenv(weights.MIRROR_ENV, f"http://127.0.0.1:{_closed_port()}")
    with pytest.raises(BackboneError, match=r"downloading http://127\.0\.0\.1:\d+/tinynet-\w+\.pth failed"):
        load_backbone(name)
    monkeypatch.setenv(weights.MIRROR_ENV, f"{server.url}/nothing-here")
    with pytest.raises(BackboneError, match="HTTP 404"):
        load_backbone(name)
    assert _files(online) == []


def test_the_production_table_checks_torchvisions_own_hash_prefixes():
    assert weights.EXPECTED_SHA256_PREFIX == {}
    spec = backbones._REGISTRY["wideresnet50"]
    assert spec.weights_file == "wide_resnet50_2-95faca4d.pth"
    assert weights.expected_prefix(spec.weights_file) == "95faca4d"
    assert weights.expected_prefix(backbones._REGISTRY["resnet18"].weights_file) == "f37072fd"


# --- the CLI: resolved before the run folder, and the default backbone from a mirror, end to end ---------


def _parts(root: Path, n_train: int = 6, test: bool = True) -> Path:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:40, 0:40]
    for i in range(n_train):
        base = 120 + 30 * np.sin(x / 4.0 + i * 0.1) + rng.normal(0, 2, (40, 40))
        _save(root / "train" / "good" / f"{i:03d}.png", base)
    if test:
        _save(root / "test" / "good" / "000.png", 120 + 30 * np.sin(x / 4.0))
        crack = 120 + 30 * np.sin(x / 4.0)
        crack[15:25, 15:25] = 255
        _save(root / "test" / "crack" / "000.png", crack)
    return root


def _save(path: Path, gray: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(np.stack([gray] * 3, -1), 0, 255).astype(np.uint8)).save(path)


def test_train_with_unreachable_weights_exits_2_and_leaves_no_run_folder(
    online, tmp_path, capsys, monkeypatch
):
    parts = _parts(tmp_path / "parts")
    monkeypatch.setenv(weights.MIRROR_ENV, f"http://127.0.0.1:{_closed_port()}")
    out = tmp_path / "results"
    code = cli.main(["train", str(parts), f"output_dir={out}", "model.resize=32", "model.imagesize=32",
                     "data.num_workers=0", "--no-progress"])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(
        "patchcore train: error: the ImageNet weights of backbone 'wideresnet50': downloading"
    )
    assert not out.exists()  # nothing left behind: no run folder, no `incomplete` marker
    assert _files(online) == []


def test_the_offline_flag_refuses_like_the_environment_variable(online, tmp_path, capsys, monkeypatch):
    parts = _parts(tmp_path / "parts")
    monkeypatch.setenv(weights.MIRROR_ENV, f"http://127.0.0.1:{_closed_port()}")
    out = tmp_path / "results"
    code = cli.main(["train", str(parts), f"output_dir={out}", "--offline", "--no-progress"])
    assert code == 2
    assert "cannot be downloaded here (PATCHCORE_OFFLINE is set)" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.slow
def test_a_fresh_machine_trains_the_default_wrn50_from_a_mirror_without_a_manual_step(
    online, server, tmp_path, capsys, monkeypatch
):
    """WRN50 (the default backbone, ~270 MB): a randomly initialised state dict saved under torchvision's
    file name stands in for the real weights (not available here); its hash is injected as the expected one
    (the production table keeps torchvision's prefix, checked above)."""
    import torchvision

    torch.manual_seed(0)
    file_name = backbones._REGISTRY["wideresnet50"].weights_file
    served = server.folder / file_name
    torch.save(torchvision.models.wide_resnet50_2(weights=None).state_dict(), served)
    monkeypatch.setitem(
        weights.EXPECTED_SHA256_PREFIX, file_name, hashlib.sha256(served.read_bytes()).hexdigest()[:8]
    )
    server.prefix = "/"
    monkeypatch.setenv(weights.MIRROR_ENV, server.url)
    parts = _parts(tmp_path / "parts")
    out = tmp_path / "results"
    code = cli.main(["train", str(parts), f"output_dir={out}", "model.resize=32", "model.imagesize=32",
                     "data.num_workers=0", "evaluation.heatmaps=0", "--no-progress"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert server.requests == [f"/{file_name}"]
    assert (online / file_name).stat().st_size == served.stat().st_size
    run = out / "parts" / "default"
    assert (run / "models" / "patchcore_parts.pt").is_file()
    assert not (run / "incomplete").exists()
    record = json.loads((run / "models" / "patchcore_parts.json").read_text())
    assert record["weights_id"] == "torchvision:Wide_ResNet50_2_Weights.IMAGENET1K_V1"
    assert record["params"]["backbone"] == "wideresnet50"
    # a share of the goods held out for the threshold
    assert record["calibration"]["image_threshold"] is not None


def test_the_written_out_torchvision_weight_urls_are_torchvision_s_own():
    # The registry names torchvision's weight URLs without importing torchvision (startup time): each must be
    # exactly what torchvision's weights enum says, so a torchvision upgrade that moves a file is caught.
    import torchvision.models as tvm

    for enum_member, url in backbones.TORCHVISION_WEIGHTS_URLS.items():
        enum_name, member = enum_member.split(".")
        assert getattr(getattr(tvm, enum_name), member).url == url, enum_member
