"""Scale-out: objects as Ray tasks, sharded fit, federated clients, resumable runs.

One local Ray cluster (2 CPUs, a 200 MB object store) serves the whole module; tiny generated MVTec data
and random-weight ResNet-18 models keep each run to seconds.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from test_workflow import make_mvtec, read_csv, run_cli, write_config

from patchcore.app.runs import run_state
from patchcore.distributed.federated import (
    ClientSpec,
    NoiseSpec,
    add_gaussian_noise,
    gaussian_sigma,
    run_clients,
)
from patchcore.distributed.ray_runner import RayOptions, run_local, run_ray
from patchcore.distributed.sharded import weighted_greedy_select
from patchcore.engine.coreset import greedy_select, start_distances
from patchcore.engine.model import PatchCore

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.usefixtures("single_torch_thread")

SRC = str(Path(__file__).resolve().parents[1] / "src")
TESTS = str(Path(__file__).resolve().parent)


@pytest.fixture(scope="module")
def ray_cluster():
    # Ray's workers import the package (and this module's functions) by name.
    os.environ["PYTHONPATH"] = os.pathsep.join([SRC, TESTS, os.environ.get("PYTHONPATH", "")])
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024**2, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_mvtec(tmp_path_factory.mktemp("dist") / "data")


def _banks(run_dir: Path) -> dict[str, np.ndarray]:
    return {
        p.stem.removeprefix("patchcore_"): torch.load(p, weights_only=True)["memory_bank"].numpy()
        for p in sorted((run_dir / "models").glob("*.pt"))
    }


def _metrics(run_dir: Path) -> dict[str, dict[str, str]]:
    return {
        r["object"]: {k: v for k, v in r.items() if not k.endswith("seconds")}
        for r in read_csv(run_dir / "results.csv")
    }


def _files(run_dir: Path) -> list[str]:
    return sorted(p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if p.is_file())


# ----------------------------------------------------------------------------- runner


def test_runner_returns_values_in_item_order_and_each_error_after_its_retries(ray_cluster):
    # math.sqrt: a function every Ray worker imports at once (a test module's would drag torch in).
    retried = []
    outcomes = run_ray(math.sqrt, [9.0, -1.0, 16.0], RayOptions(retries=1), on_retry=retried.append)
    assert [o.value for o in outcomes if o.ok] == [3.0, 4.0]
    failed = outcomes[1]
    assert not failed.ok and failed.error == "ValueError: math domain error" and failed.attempts == 2
    assert [o.item for o in retried] == [1]
    assert all(o.node for o in outcomes if o.ok)
    local = run_local(math.sqrt, [9.0, -1.0, 16.0], retries=1)
    assert [(o.value, o.error, o.attempts) for o in local] == [
        (o.value, o.error, o.attempts) for o in outcomes
    ]


def test_runner_retries_a_task_whose_worker_dies_then_reports_it(ray_cluster):
    # os._exit kills the worker process, as the kernel's OOM killer would.
    outcome = run_ray(os._exit, [3], RayOptions(retries=1))[0]
    assert not outcome.ok and outcome.attempts == 2
    assert "died" in outcome.error.lower() or "crash" in outcome.error.lower(), outcome.error


# ----------------------------------------------------------------------------- objects as Ray tasks


def test_ray_run_writes_the_same_files_banks_and_metrics_as_a_local_run(ray_cluster, data, tmp_path):
    config = write_config(tmp_path / "c.yaml", "mvtec", data, tmp_path / "out")
    code, _, err = run_cli("train", "-c", config)
    assert code == 0, err
    code, _, err = run_cli("train", "-c", config, "--ray", "group=ray")
    assert code == 0, err
    local, remote = tmp_path / "out" / "tiny" / "run", tmp_path / "out" / "tiny" / "ray"
    assert _files(local) == _files(remote)
    assert "on Ray node" in (remote / "run.log").read_text()
    local_banks, remote_banks = _banks(local), _banks(remote)
    assert list(local_banks) == ["bottle", "screw"] == list(remote_banks)
    for name in local_banks:
        # Same seed, same coreset picks; features may differ in the last bits with the thread count.
        np.testing.assert_allclose(local_banks[name], remote_banks[name], rtol=1e-5, atol=1e-5)
    assert _metrics(local) == _metrics(remote)


def test_a_failing_object_is_retried_reported_and_the_others_finish(ray_cluster, data, tmp_path):
    broken = tmp_path / "data"
    make_mvtec(broken, classes=("bottle", "cable"))
    bad = broken / "cable" / "train" / "good" / "001.png"
    # Cut off the pixels, not the header: an unreadable header is refused before the run starts (issue 12).
    bad.write_bytes(bad.read_bytes()[:-60])
    config = write_config(tmp_path / "c.yaml", "mvtec", broken, tmp_path / "out")
    code, _, err = run_cli("train", "-c", config, "--ray", "execution.retries=1")
    assert code == 2
    message = err.strip().splitlines()[-1]
    assert "1 of 2 objects failed" in message and "cable" in message and "001.png" in message
    run_dir = tmp_path / "out" / "tiny" / "run"
    log_text = (run_dir / "run.log").read_text()
    assert "cable: attempt 1 failed" in log_text and "cable: failed after 2 attempt(s)" in log_text
    assert [r["object"] for r in read_csv(run_dir / "results.csv")] == ["bottle", "mean"]
    assert (run_dir / "models" / "patchcore_bottle.pt").is_file()
    assert not (run_dir / "models" / "patchcore_cable.pt").exists()


# ----------------------------------------------------------------------------- sharded fit


def test_weighted_greedy_with_equal_weights_picks_what_the_greedy_loop_picks():
    z = torch.from_numpy(np.random.default_rng(0).normal(size=(500, 16)).astype(np.float32))
    starts = np.array([1, 7, 99])
    plain = greedy_select(z, 40, start_distances(z, starts), method="fused")
    weighted = weighted_greedy_select(z, 40, start_distances(z, starts), np.full(500, 3.0))
    np.testing.assert_array_equal(plain, weighted)


def test_sharded_fit_keeps_the_single_machine_bank_size_and_agrees_on_ray_and_locally(
    ray_cluster, data, tmp_path
):
    config = write_config(tmp_path / "c.yaml", "mvtec", data, tmp_path / "out", evaluation={"heatmaps": 0})
    shards = ["execution.shards=3", "execution.shard_oversampling=2", "data.objects=[bottle]"]
    assert run_cli("train", "-c", config, *shards, "group=local")[0] == 0
    assert run_cli("train", "-c", config, *shards, "group=ray", "evaluation.enabled=false", "--ray")[0] == 0
    runs = {g: tmp_path / "out" / "tiny" / g for g in ("local", "ray")}
    banks = {g: _banks(r)["bottle"] for g, r in runs.items()}
    np.testing.assert_allclose(banks["local"], banks["ray"], rtol=1e-5, atol=1e-5)
    assert len(banks["local"]) == int(216 * 0.1)  # what one machine keeps: percentage of all patches
    summary = json.loads((runs["local"] / "summary.json").read_text())["objects"][0]
    stats = summary["stats"]
    assert stats["shards"] == 3 and stats["n_patches"] == 216 and stats["n_train_images"] == 6
    assert stats["union_size"] == 3 * int(72 * 0.2)  # each shard: 2 images, 72 patches, 20% kept
    # Every bank vector is a training patch feature: the merge selects, never averages.
    full = PatchCore(**{**_model_params(), "sampler": "identity"}).fit(_train_images(data)).memory_bank_
    distances = np.sqrt(((banks["local"][:, None, :] - full[None]) ** 2).sum(-1)).min(1)
    assert distances.max() < 1e-3
    assert summary["metrics"]["image_auroc"] >= 0.9


def _model_params() -> dict:
    return {"backbone": "resnet18", "weights": "random", "resize": 48, "imagesize": 48, "batch_size": 4}


def _train_images(data: Path) -> list[Path]:
    return sorted((data / "bottle" / "train" / "good").glob("*.png"))


# ----------------------------------------------------------------------------- federated


def test_federated_iid_gives_an_ordinary_model_that_evaluate_reproduces(data, tmp_path):
    config = write_config(
        tmp_path / "c.yaml",
        "mvtec",
        data,
        tmp_path / "out",
        evaluation={"heatmaps": 0},
    )
    code, out, err = run_cli(
        "federated",
        "-c",
        config,
        "federated.clients=2",
        "federated.local_percentage=0.3",
        "data.objects=[bottle]",
    )
    assert code == 0, err
    run_dir = tmp_path / "out" / "tiny" / "run"
    assert "| bottle | bottle | 2 |" in out
    rows = json.loads((run_dir / "federated.json").read_text())["rows"]
    assert rows[0]["bank"] == rows[0]["central_bank"] == int(216 * 0.1)
    model = PatchCore.load(run_dir / "models" / "patchcore_bottle.pt")
    assert model.stats_.clients == 2 and model.stats_.client_images == (3, 3)
    code, _, err = run_cli("evaluate", "-m", run_dir / "models", "-c", config, "data.objects=[bottle]")
    assert code == 0, err
    evaluated = read_csv(tmp_path / "out" / "tiny" / "run_eval" / "results.csv")[0]
    assert float(evaluated["image_auroc"]) == pytest.approx(rows[0]["federated"]["image_auroc"], abs=1e-6)


def test_federated_clients_give_the_same_banks_as_ray_actors_and_here(ray_cluster, data):
    model = PatchCore(**_model_params())
    images = _train_images(data)
    clients = [ClientSpec("a", images[:2], 0), ClientSpec("b", images[2:], 1)]
    here = run_clients(model, clients, 0.3)
    actors = run_clients(model, clients, 0.3, ray_options=RayOptions())
    assert [b.n_images for b in here] == [2, 4] == [b.n_images for b in actors]
    for a, b in zip(here, actors, strict=True):
        assert len(a.vectors) == int(a.n_patches * 0.3)
        np.testing.assert_allclose(a.vectors, b.vectors, rtol=1e-5, atol=1e-5)


def test_federated_by_category_saves_the_joint_bank_as_each_objects_model(data, tmp_path):
    config = write_config(tmp_path / "c.yaml", "mvtec", data, tmp_path / "out", evaluation={"heatmaps": 0})
    code, _, err = run_cli(
        "federated", "-c", config, "federated.partition=by_category", "federated.weighted=true"
    )
    assert code == 0, err
    banks = _banks(tmp_path / "out" / "tiny" / "run")
    np.testing.assert_array_equal(banks["bottle"], banks["screw"])
    assert len(banks["bottle"]) == int(432 * 0.1)


def test_federated_folders_merges_one_bank_per_site_folder(data, tmp_path):
    images = sorted((data / "bottle" / "train" / "good").glob("*.png"))
    for k, site in enumerate(("north", "south")):
        (tmp_path / site).mkdir()
        for image in images[k * 3 : (k + 1) * 3]:
            (tmp_path / site / image.name).write_bytes(image.read_bytes())
    config = write_config(tmp_path / "c.yaml", "mvtec", data, tmp_path / "out", evaluation={"heatmaps": 0})
    sites = f"federated.sites=[{tmp_path / 'north'}, {tmp_path / 'south'}]"
    code, out, err = run_cli(
        "federated", "-c", config, "federated.partition=folders", sites, "data.objects=[bottle]",
        "federated.compare_centralised=false", "federated.bank_size=10",
    )  # fmt: skip
    assert code == 0, err
    model = PatchCore.load(tmp_path / "out" / "tiny" / "run" / "models" / "patchcore_bottle.pt")
    assert model.stats_.client_images == (3, 3) and len(model.memory_bank_) == 10
    code, _, err = run_cli("federated", "-c", config, "federated.partition=folders")
    assert code == 2 and "federated.sites" in err


def test_gaussian_noise_clips_vectors_and_has_the_stated_sigma():
    noise = NoiseSpec(epsilon=0.5, delta=1e-5, clip=2.0)
    sigma = gaussian_sigma(noise)
    assert sigma == pytest.approx(2 * 2.0 * np.sqrt(2 * np.log(1.25e5)) / 0.5)
    vectors = np.full((400, 256), 10.0, dtype=np.float32)  # norm 160, clipped to 2
    noisy = add_gaussian_noise(vectors, noise, np.random.default_rng(0))
    residual = noisy - 2.0 / 16.0  # each clipped coordinate is 10 * 2 / 160
    # 102,400 draws: the sample standard deviation is within 1% of sigma with overwhelming probability.
    assert residual.std() == pytest.approx(sigma, rel=0.01)
    assert abs(residual.mean()) < 5 * sigma / np.sqrt(residual.size)
    with pytest.raises(ValueError, match="epsilon"):
        NoiseSpec(epsilon=2.0, delta=1e-5, clip=1.0)


# ----------------------------------------------------------------------------- resume


def test_resume_keeps_finished_objects_and_redoes_damaged_or_changed_ones(data, tmp_path):
    config = write_config(tmp_path / "c.yaml", "mvtec", data, tmp_path / "out", evaluation={"heatmaps": 0})
    assert run_cli("train", "-c", config)[0] == 0
    run_dir = tmp_path / "out" / "tiny" / "run"
    bottle, screw = run_dir / "models" / "patchcore_bottle.pt", run_dir / "models" / "patchcore_screw.pt"
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (bottle, screw)}
    screw.write_bytes(screw.read_bytes()[:100])  # a damaged model file: its record no longer matches
    code, out, err = run_cli("train", "--resume", run_dir)
    assert code == 0, err
    assert "bottle: finished before with this config, kept" in err
    assert bottle.stat().st_mtime_ns == before[bottle][1]
    assert screw.read_bytes() != before[screw][0][:100] and PatchCore.load(screw).memory_bank_.shape[0] == 21
    assert [r["object"] for r in read_csv(run_dir / "results.csv")] == ["bottle", "screw", "mean"]
    # Another coreset size is another config: refused as it is (nothing touched), both objects trained again
    # with --restart-changed, and the log names the changed key.
    code, _, err = run_cli("train", "--resume", run_dir, "model.percentage=0.05")
    assert code == 2 and "model.percentage: 0.1 -> 0.05" in err and "--restart-changed" in err
    assert PatchCore.load(bottle).memory_bank_.shape[0] == 21
    code, _, err = run_cli("train", "--resume", run_dir, "--restart-changed", "model.percentage=0.05")
    assert code == 0, err
    assert "kept" not in err
    assert "--restart-changed: model.percentage: 0.1 -> 0.05" in (run_dir / "run.log").read_text()
    assert PatchCore.load(bottle).memory_bank_.shape[0] == int(216 * 0.05)


def test_resume_of_a_missing_run_folder_exits_2(tmp_path):
    code, _, err = run_cli(
        "train",
        "-c",
        write_config(tmp_path / "c.yaml", "mvtec", tmp_path, tmp_path),
        "--resume",
        tmp_path / "nope",
    )
    assert code == 2 and "not a run folder" in err


def test_kill_9_mid_run_then_resume_gives_the_uninterrupted_runs_models(data, tmp_path):
    """Catches: a resume that loses or refits finished work, or takes a half-written object for finished;
    asserts that the kill really landed mid-run (not after the run had finished)."""
    config = write_config(tmp_path / "c.yaml", "mvtec", data, tmp_path / "out", evaluation={"heatmaps": 0})
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "patchcore.app.cli", "train", "-c", str(config), "--no-progress"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run_dir = tmp_path / "out" / "tiny" / "run"
    record = run_dir / "completed" / "bottle.json"
    deadline = time.monotonic() + 120
    try:
        while not record.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert record.exists()
    # The kill landed mid-run (else this test proves nothing about resuming): the process died of it, the
    # run is still marked incomplete, and an object is unfinished.
    assert process.returncode == -signal.SIGKILL
    state = run_state(run_dir)
    assert not state.complete and state.objects.get("screw") != "done"
    # What a kill leaves is never taken for finished: only recorded objects have model files.
    recorded = {p.stem for p in (run_dir / "completed").glob("*.json")}
    models = {p.stem.removeprefix("patchcore_") for p in (run_dir / "models").glob("*.pt")}
    assert models <= recorded | {"screw"}  # screw's file can only exist once complete (atomic write)
    for path in run_dir.rglob("*.pt"):
        PatchCore.load(path)  # complete (atomic writes), or it would raise
    code, _, err = run_cli("train", "--resume", run_dir)
    assert code == 0, err
    assert "bottle: finished before with this config, kept" in err
    assert run_cli("train", "-c", config, "group=clean")[0] == 0
    clean = _banks(tmp_path / "out" / "tiny" / "clean")
    for name, bank in _banks(run_dir).items():
        np.testing.assert_allclose(bank, clean[name], rtol=1e-5, atol=1e-5)
    assert _metrics(run_dir) == _metrics(tmp_path / "out" / "tiny" / "clean")


# ----------------------------------------------------------------------------- a real two-node cluster


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(process: subprocess.Popen) -> None:
    """Stop a ``ray start --block`` node and everything it started (its own process group)."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # raylet, GCS and workers left in the group
    process.wait()


@pytest.mark.slow
def test_train_against_a_two_node_cluster_address_uses_that_clusters_nodes(data, tmp_path):
    """`ray start --head` + `ray start --address` (one CPU each), then `patchcore train --ray ADDRESS`.

    Catches a `--ray ADDRESS` that is ignored (a local cluster started instead: its node ids are not the
    started nodes'), or objects that never reach Ray. Which node runs which object is Ray's choice (a retry may
    land on the node that already ran the other object), so the test pins only that every object ran on one
    of the two started nodes and that both nodes had joined before the run.

    The nodes run with ``--block`` in their own process groups and are stopped by group, so the test never
    touches another Ray instance on the machine (``ray stop`` would stop every one)."""
    ray_bin = str(Path(sys.executable).with_name("ray"))
    port = _free_port()
    address = f"127.0.0.1:{port}"
    # A private Ray temp folder: `ray start` records the cluster's address there, where a later ray.init()
    # elsewhere on the machine will not find it (short: Ray's socket paths must stay under 108 bytes).
    temp_dir = tempfile.mkdtemp(prefix="ray2n-", dir="/tmp")
    env = {**os.environ, "PYTHONPATH": SRC, "RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    env["RAY_TMPDIR"] = temp_dir
    common = ["--node-ip-address=127.0.0.1", "--num-cpus=1", "--object-store-memory=200000000", "--block"]
    common += ["--disable-usage-stats"]
    nodes: list[subprocess.Popen] = []

    def start(*args: str) -> None:
        log = (tmp_path / f"node{len(nodes)}.log").open("w")
        nodes.append(
            subprocess.Popen(
                [ray_bin, "start", *args, *common], env=env, stdout=log, stderr=log, start_new_session=True
            )
        )

    config = write_config(tmp_path / "c.yaml", "mvtec", data, tmp_path / "out", evaluation={"heatmaps": 0})
    try:
        start("--head", f"--port={port}", "--include-dashboard=false")
        deadline = time.monotonic() + 90
        while subprocess.run(
            [ray_bin, "status", f"--address={address}"], env=env, capture_output=True
        ).returncode:
            assert time.monotonic() < deadline and nodes[0].poll() is None, (
                tmp_path / "node0.log"
            ).read_text()
            time.sleep(1)
        start(f"--address={address}")
        node_ids: set[str] = set()
        while len(node_ids) < 2:
            status = subprocess.run(
                [ray_bin, "status", f"--address={address}", "-v"], env=env, capture_output=True, text=True
            ).stdout
            node_ids = set(re.findall(r"Node: ([0-9a-f]{20,})", status))
            assert time.monotonic() < deadline + 90 and nodes[1].poll() is None, (
                tmp_path / "node1.log"
            ).read_text()
            time.sleep(1)
        command = [sys.executable, "-m", "patchcore.app.cli", "train", "-c", str(config), "--no-progress"]
        result = subprocess.run(
            [*command, "--ray", address], env=env, capture_output=True, text=True, timeout=240
        )
        assert result.returncode == 0, result.stderr[-3000:]
    finally:
        for node in reversed(nodes):
            _stop(node)
        shutil.rmtree(temp_dir, ignore_errors=True)
    run_dir = tmp_path / "out" / "tiny" / "run"
    assert [r["object"] for r in read_csv(run_dir / "results.csv")] == ["bottle", "screw", "mean"]
    nodes_used = re.findall(r"trained in [\d.]+ s on Ray node (\w+)", (run_dir / "run.log").read_text())
    assert len(nodes_used) == 2 and set(nodes_used) <= node_ids, (nodes_used, node_ids)
