"""Hostile and careless use of runs (issue 24, rows 7, 7d, 8, 9, 10, 14, 15, 19): each refusal is one line,
exit status 2, before anything is written; SIGTERM ends a run; a resumed run redoes only what it must.

Tiny generated MVTec data and a random-weight ResNet-18 at 48 px (tests/test_workflow.py) keep each run to
seconds.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_workflow import make_mvtec, read_csv, run_cli, write_config

from patchcore.app import train as train_module
from patchcore.app.runs import INCOMPLETE_MARKER, lock_run, run_state, unlock_run

pytestmark = pytest.mark.usefixtures("single_torch_thread")

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _tree(root: Path) -> dict[str, int]:
    """Every file under ``root`` with its modification time: what a refusal must leave as it was."""
    return {
        p.relative_to(root).as_posix(): p.stat().st_mtime_ns for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_mvtec(tmp_path_factory.mktemp("hostile") / "data")


@pytest.fixture
def finished_run(data, tmp_path):
    """A finished two-object run (bottle, screw) and its config."""
    config = write_config(tmp_path / "c.yaml", "mvtec", data, tmp_path / "out", evaluation={"heatmaps": 0})
    code, _, err = run_cli("train", "-c", config)
    assert code == 0, err
    return tmp_path / "out" / "tiny" / "run", config


# ----------------------------------------------------------------------------- rows 7, 19: Ray addresses


@pytest.mark.parametrize("command", ["train", "federated"])
@pytest.mark.parametrize("address", ["127.0.0.1:1", "localhost:notaport"])
def test_an_unusable_ray_address_fails_fast_in_one_line_and_leaves_no_run_folder(
    data, tmp_path, command, address
):
    """Catches: connecting inside Ray's own retry loop (minutes, SIGTERM ignored), or taking the run folder
    before connecting (row 19: a folder with `incomplete` left behind each time)."""
    pytest.importorskip("ray")
    config = write_config(tmp_path / "c.yaml", "mvtec", data, tmp_path / "out", evaluation={"heatmaps": 0})
    started = time.monotonic()
    code, out, err = run_cli(command, "-c", config, "--ray", address, "data.objects=[bottle]")
    elapsed = time.monotonic() - started
    assert code == 2 and out == ""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"patchcore {command}: error:") and "Ray" in lines[0]
    assert ("cannot reach" in lines[0]) if address.endswith(":1") else ("host:port" in lines[0])
    assert elapsed < 30
    assert not (tmp_path / "out").exists()


def test_ray_auto_without_a_cluster_on_this_machine_fails_in_one_line_and_leaves_no_run_folder(
    data, tmp_path, monkeypatch
):
    """Catches: `--ray auto` taking the run folder before finding out that no cluster runs (row 19)."""
    pytest.importorskip("ray")
    from ray._private.services import find_bootstrap_address, find_gcs_addresses

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    if find_gcs_addresses() or find_bootstrap_address(None):
        pytest.skip("a Ray cluster runs on this machine: `auto` would join it")
    config = write_config(tmp_path / "c.yaml", "mvtec", data, tmp_path / "out", evaluation={"heatmaps": 0})
    code, _, err = run_cli("train", "-c", config, "--ray", "auto")
    assert (
        code == 2 and "Could not find any running Ray instance" in err and len(err.strip().splitlines()) == 1
    )
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- row 7: SIGTERM


@pytest.mark.parametrize("command", ["train", "federated"])
def test_sigterm_ends_a_run_mid_way_and_the_run_stays_marked_incomplete(tmp_path, command):
    """Catches: a run (or federated, row 7) that ignores SIGTERM, or one that on SIGTERM removes its
    `incomplete` marker as if it had finished."""
    data = make_mvtec(tmp_path / "data", classes=("bottle", "cable", "capsule", "carpet", "grid", "hazelnut"))
    config = write_config(tmp_path / "c.yaml", "mvtec", data, tmp_path / "out", evaluation={"heatmaps": 0})
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    extra = ["federated.clients=2", "federated.compare_centralised=false"] if command == "federated" else []
    process = subprocess.Popen(
        [sys.executable, "-m", "patchcore.app.cli", command, "-c", str(config), "--no-progress", *extra],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    run_dir = tmp_path / "out" / "tiny" / "run"
    deadline = time.monotonic() + 120
    while (
        not (run_dir / INCOMPLETE_MARKER).exists() and process.poll() is None and time.monotonic() < deadline
    ):
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    try:
        _, err = process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        pytest.fail(f"{command} still running 30 s after SIGTERM")
    assert process.returncode == 128 + signal.SIGTERM, err
    assert "terminated (SIGTERM)" in err
    state = run_state(run_dir)
    assert not state.complete  # the marker stays: an interrupted run is never taken for a finished one
    assert any(status != "done" for status in state.objects.values())  # it ended mid-way
    assert not (run_dir / "tmp").exists()  # its temporary files went with it


# ----------------------------------------------------------------------------- row 7d: a live writer


def test_resume_of_a_run_another_live_process_writes_is_refused(finished_run):
    """Catches: two writers in one run folder (row 7d: the resume died on a file the other removed)."""
    run_dir, _ = finished_run
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, os, sys, time\n"
         f"fd = os.open({str(run_dir)!r}, os.O_RDONLY); fcntl.flock(fd, fcntl.LOCK_EX)\n"
         "print('locked', flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = _tree(run_dir)
        code, _, err = run_cli("train", "--resume", run_dir)
        assert code == 2 and "is being written by another process" in err
        assert _tree(run_dir) == before
    finally:
        holder.kill()
        holder.wait()
    code, _, err = run_cli("train", "--resume", run_dir)  # the writer is gone: the lock went with it
    assert code == 0, err


def test_a_running_commands_lock_is_held_until_it_returns(finished_run):
    """Catches: a lock taken but released at once (or never taken): while this process holds a run,
    another lock attempt on it fails; after release it succeeds."""
    run_dir, _ = finished_run
    fd = lock_run(run_dir)
    try:
        code, _, err = run_cli("train", "--resume", run_dir)
        assert code == 2 and "is being written by another process" in err
    finally:
        unlock_run(fd)
    unlock_run(lock_run(run_dir))


# ----------------------------------------------------------------------------- rows 8, 9: changed configs


def test_resume_with_a_changed_setting_is_refused_and_names_the_key(finished_run):
    """Catches: row 8 (both finished models deleted and retrained, config.yaml rewritten, no line says why)."""
    run_dir, _ = finished_run
    before = _tree(run_dir)
    code, _, err = run_cli("train", "--resume", run_dir, "model.percentage=0.2", "seed=3")
    assert code == 2
    assert "model.percentage: 0.1 -> 0.2" in err and "seed: 0 -> 3" in err and "--restart-changed" in err
    assert _tree(run_dir) == before  # nothing deleted, config.yaml kept


def test_resume_with_only_neutral_changes_keeps_every_finished_object(finished_run):
    """Catches: a comparison that counts logging / progress / worker settings as a change."""
    run_dir, _ = finished_run
    code, _, err = run_cli("train", "--resume", run_dir, "logging.level=DEBUG", "data.num_workers=1")
    assert code == 0, err
    log = (run_dir / "run.log").read_text()
    assert "bottle: finished before with this config, kept" in log and "screw: finished before" in log


def test_resume_with_another_data_root_is_refused_and_restart_changed_drops_the_old_objects(
    finished_run, tmp_path
):
    """Catches: row 9 (config.yaml replaced by another data root's; results.csv lists one object while the
    other's model stays in the folder)."""
    run_dir, _ = finished_run
    other_data = make_mvtec(tmp_path / "other", classes=("bottle",))
    other = write_config(
        tmp_path / "o.yaml", "mvtec", other_data, tmp_path / "out", evaluation={"heatmaps": 0}
    )
    code, _, err = run_cli("train", "--resume", run_dir, "-c", other)
    assert code == 2 and "data.root" in err and str(other_data) in err
    assert (run_dir / "models" / "patchcore_screw.pt").is_file()
    code, _, err = run_cli("train", "--resume", run_dir, "-c", other, "--restart-changed")
    assert code == 0, err
    log = (run_dir / "run.log").read_text()
    assert "--restart-changed: data.root:" in log
    assert "screw: not in this configuration's data: its model and records removed" in log
    assert [r["object"] for r in read_csv(run_dir / "results.csv")] == ["bottle", "mean"]
    assert sorted(p.name for p in (run_dir / "models").iterdir()) == [
        "patchcore_bottle.json",
        "patchcore_bottle.pt",
    ]
    assert not (run_dir / "completed" / "screw.json").exists()


def test_restart_changed_without_resume_is_refused(data, tmp_path):
    config = write_config(tmp_path / "c.yaml", "mvtec", data, tmp_path / "out")
    code, _, err = run_cli("train", "-c", config, "--restart-changed")
    assert code == 2 and "--restart-changed needs --resume" in err
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- row 10: fitted, not evaluated


def test_resume_evaluates_a_saved_verified_model_instead_of_refitting_it(tmp_path, monkeypatch):
    """Catches: row 10 (a run killed after its model was saved but before its evaluation refits it on
    resume). The resumed run must not fit at all, and must give the uninterrupted run's metrics."""
    data = make_mvtec(tmp_path / "data", classes=("bottle",))
    config = write_config(tmp_path / "c.yaml", "mvtec", data, tmp_path / "out", evaluation={"heatmaps": 0})

    def evaluation_dies(*args, **kwargs):
        raise RuntimeError("killed during the evaluation")

    monkeypatch.setattr(train_module, "evaluate_object", evaluation_dies)
    with pytest.raises(RuntimeError, match="killed during the evaluation"):
        run_cli("train", "-c", config)
    monkeypatch.undo()
    run_dir = tmp_path / "out" / "tiny" / "run"
    assert run_state(run_dir).objects == {"bottle": "fitted"}
    model_bytes = (run_dir / "models" / "patchcore_bottle.pt").read_bytes()

    def no_fit(*args, **kwargs):
        raise AssertionError("refitted a saved, verified model")

    monkeypatch.setattr(train_module, "fit_object", no_fit)
    code, _, err = run_cli("train", "--resume", run_dir)
    assert code == 0, err
    log = (run_dir / "run.log").read_text()
    assert "bottle: fitted before with this config (model file verified): evaluated, not refitted" in log
    monkeypatch.undo()
    assert run_state(run_dir).complete
    assert not (run_dir / "completed" / "bottle.fitted.json").exists()
    code, _, err = run_cli("train", "-c", config, "group=clean")
    assert code == 0, err

    def metrics(folder: Path) -> dict[str, str]:
        return {k: v for k, v in read_csv(folder / "results.csv")[0].items() if not k.endswith("seconds")}

    assert metrics(run_dir) == metrics(tmp_path / "out" / "tiny" / "clean")
    import torch

    resumed = torch.load(run_dir / "models" / "patchcore_bottle.pt", weights_only=True)["memory_bank"]
    interrupted = torch.load(__import__("io").BytesIO(model_bytes), weights_only=True)["memory_bank"]
    np.testing.assert_array_equal(resumed.numpy(), interrupted.numpy())


def test_resume_refits_a_saved_model_whose_file_changed(tmp_path, monkeypatch):
    """Catches: trusting a fitted model without checking its file against the recorded checksum."""
    data = make_mvtec(tmp_path / "data", classes=("bottle",))
    config = write_config(tmp_path / "c.yaml", "mvtec", data, tmp_path / "out", evaluation={"heatmaps": 0})
    monkeypatch.setattr(
        train_module, "evaluate_object", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("x"))
    )
    with pytest.raises(RuntimeError):
        run_cli("train", "-c", config)
    monkeypatch.undo()
    run_dir = tmp_path / "out" / "tiny" / "run"
    path = run_dir / "models" / "patchcore_bottle.pt"
    path.write_bytes(path.read_bytes() + b"\0")
    code, _, err = run_cli("train", "--resume", run_dir)
    assert code == 0, err
    log = (run_dir / "run.log").read_text()
    assert "bottle: fitting on 6 good images" in log and "evaluated, not refitted" not in log


# ----------------------------------------------------------------------------- row 14: not a run


def test_resume_of_a_folder_that_only_holds_a_config_is_refused_and_left_alone(data, tmp_path):
    """Catches: row 14 (a folder with a config.yaml taken for a run: `incomplete` and run.log written into it,
    training started)."""
    folder = tmp_path / "notes"
    folder.mkdir()
    write_config(folder / "config.yaml", "mvtec", data, tmp_path / "out")
    code, _, err = run_cli("train", "--resume", folder)
    assert code == 2 and "not a run folder" in err and "run.log" in err
    assert sorted(p.name for p in folder.iterdir()) == ["config.yaml"]


# ----------------------------------------------------------------------------- row 15: federated sites


@pytest.mark.parametrize("spelling", ["same", "trailing slash and dot", "symlink"])
def test_federated_site_given_twice_is_refused_by_resolved_path(data, tmp_path, spelling):
    """Catches: row 15 (`[sites/a, sites/a]` counted as 2 clients with each image twice). Compared by
    resolved path, so another spelling of the same folder is caught too. Verdict: refused, not de-duplicated
    (a site listed twice is a mistake in the config, and the user should see it)."""
    site = tmp_path / "sites" / "a"
    site.mkdir(parents=True)
    for image in sorted((data / "bottle" / "train" / "good").glob("*.png"))[:3]:
        (site / image.name).write_bytes(image.read_bytes())
    second = {
        "same": str(site),
        "trailing slash and dot": f"{site.parent}/./a/",
        "symlink": str(tmp_path / "link"),
    }
    if spelling == "symlink":
        (tmp_path / "link").symlink_to(site)
    config = write_config(tmp_path / "c.yaml", "mvtec", data, tmp_path / "out", evaluation={"heatmaps": 0})
    code, _, err = run_cli(
        "federated", "-c", config, "federated.partition=folders", f"federated.sites=[{site}, {second[spelling]}]",
        "data.objects=[bottle]",
    )  # fmt: skip
    assert code == 2 and "twice" in err and str(site) in err
    assert not (tmp_path / "out").exists()


def test_federated_sites_that_share_images_are_refused(data, tmp_path):
    """Catches: nested site folders (one inside the other), whose shared images would count twice."""
    outer = tmp_path / "sites"
    inner = outer / "inner"
    inner.mkdir(parents=True)
    images = sorted((data / "bottle" / "train" / "good").glob("*.png"))
    for image in images[:2]:
        (outer / image.name).write_bytes(image.read_bytes())
    for image in images[2:4]:
        (inner / image.name).write_bytes(image.read_bytes())
    config = write_config(tmp_path / "c.yaml", "mvtec", data, tmp_path / "out", evaluation={"heatmaps": 0})
    code, _, err = run_cli(
        "federated", "-c", config, "federated.partition=folders", f"federated.sites=[{outer}, {inner}]",
        "data.objects=[bottle]",
    )  # fmt: skip
    assert code == 2 and "share the image" in err
    assert not (tmp_path / "out").exists()


def test_results_printed_while_progress_bars_run_reach_a_piped_stdout(monkeypatch):
    # Issue 24 row 20 (probe): with the bars on a terminal (stderr) and stdout a pipe, predict's JSON lines
    # must go to stdout, not into the bars' console (rich redirects stdout into it by default).
    import io

    from rich.console import Console

    from patchcore.app import runs
    from patchcore.app.runs import Progress

    terminal = io.StringIO()
    monkeypatch.setattr(runs, "_CONSOLE", Console(file=terminal, force_terminal=True))  # the bars' stderr
    piped = io.StringIO()  # not a terminal
    monkeypatch.setattr(sys, "stdout", piped)
    with Progress(True) as bars:
        bars("score", 1, 2)
        print('{"image": "a.png"}')
        bars("score", 2, 2)
    assert piped.getvalue().splitlines() == ['{"image": "a.png"}']
    assert "a.png" not in terminal.getvalue()
