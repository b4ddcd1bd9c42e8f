"""Benchmark scripts that guard a path CI cannot otherwise run (the GPU check) stay runnable."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture
def gpu_check(monkeypatch):
    pytest.importorskip("elpv_dataset")
    pytest.importorskip("efficientnet_lite_pytorch")
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import gpu_check as module

    return module


def test_gpu_check_runs_its_whole_comparison_on_the_cpu_and_finds_the_same_bank_scores_equal(gpu_check, tmp_path):
    # --device cpu is the script's own code path with the CPU on both sides: it must fit twice, score the
    # same bank on both "devices" and find them equal (the CUDA run differs only in the device string).
    code = gpu_check.main(["--device", "cpu", "--train-limit", "6", "--test-limit", "5", "--imagesize", "64",
                           "--out", str(tmp_path)])  # fmt: skip
    assert code == 0
    (report_file,) = tmp_path.glob("gpu_check_cpu_*.json")
    report = json.loads(report_file.read_text())
    assert report["same_bank_agrees"] and report["same_bank_max_relative_score_difference"] == 0.0
    assert report["device_fit_same_rows"] and report["test_images"] == 5
    assert set(report["fit_seconds"]) == {"cpu"}


def test_gpu_check_says_so_and_measures_nothing_where_the_device_is_absent(gpu_check, tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--device", "cuda", "--out", str(tmp_path)]) == 3
    assert "not available" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
    assert "gpu_check" in sys.modules
