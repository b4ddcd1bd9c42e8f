"""Run reports (results.csv, summary.md, summary.json) and atomic writes."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest

from patchcore import fileio
from patchcore.evaluation.reports import ObjectResult, mean_metrics, write_reports
from patchcore.fileio import atomic_write, atomic_write_text

STATS = {
    "n_train_images": 6,
    "n_test_images": 6,
    "n_patches": 216,
    "memory_size": 21,
    "feature_dim": 1024,
    "extract_seconds": 0.5,
    "coreset_seconds": 0.25,
    "index_seconds": 0.125,
    "predict_seconds": 0.75,
}


def _results() -> list[ObjectResult]:
    return [
        ObjectResult("bottle", {"image_auroc": 0.9, "pixel_auroc": 0.8, "au_pro": 0.7}, STATS, "m/bottle.pt"),
        ObjectResult("mono", {"image_auroc": 0.7, "pixel_auroc": None, "au_pro": float("nan")}, STATS, None),
    ]


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_csv_has_one_row_per_object_and_a_mean_row(tmp_path):
    paths = write_reports(tmp_path, _results(), {"project": "p", "group": "g"})
    rows = _rows(paths["csv"])
    assert [r["object"] for r in rows] == ["bottle", "mono", "mean"]
    assert float(rows[0]["image_auroc"]) == pytest.approx(0.9)
    assert float(rows[2]["image_auroc"]) == pytest.approx(0.8)
    assert rows[0]["memory_size"] == "21"
    assert float(rows[0]["predict_seconds"]) == pytest.approx(0.75)
    assert rows[2]["memory_size"] == ""  # stats are per object only


def test_missing_metrics_are_na_in_csv_and_left_out_of_the_mean(tmp_path):
    paths = write_reports(tmp_path, _results(), {})
    rows = _rows(paths["csv"])
    assert rows[1]["pixel_auroc"] == "n/a"
    assert rows[1]["au_pro"] == "n/a"  # NaN is no number either
    # The mean is over the objects that have the metric, never a 0 for the missing one.
    assert float(rows[2]["pixel_auroc"]) == pytest.approx(0.8)
    assert float(rows[2]["au_pro"]) == pytest.approx(0.7)


def test_metric_absent_for_every_object_is_na_in_the_mean(tmp_path):
    results = [ObjectResult("mono", {"image_auroc": 0.6, "pixel_auroc": None}, STATS)]
    paths = write_reports(tmp_path, results, {})
    rows = _rows(paths["csv"])
    assert rows[-1]["pixel_auroc"] == "n/a"
    assert json.loads(paths["json"].read_text())["mean"]["pixel_auroc"] is None
    assert mean_metrics(results) == {"image_auroc": pytest.approx(0.6), "pixel_auroc": None}


def test_metric_columns_follow_the_preferred_order_then_the_rest_sorted(tmp_path):
    results = [ObjectResult("x", {"zeta": 0.1, "au_pro": 0.2, "image_auroc": 0.3, "alpha": 0.4}, {})]
    header = _rows(write_reports(tmp_path, results, {})["csv"])[0].keys()
    assert list(header)[:5] == ["object", "image_auroc", "au_pro", "alpha", "zeta"]


def test_markdown_table_shows_percent_and_na(tmp_path):
    header = {"project": "p", "group": "g", "data": "mvtec (/d)", "backbone": "resnet18"}
    text = write_reports(tmp_path, _results(), header)["markdown"].read_text()
    assert text.startswith("# PatchCore results: p / g")
    assert "- backbone: resnet18" in text
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert table[0].split("|")[1:4] == [" object ", " image_auroc ", " pixel_auroc "]
    bottle = next(line for line in table if line.startswith("| bottle"))
    mono = next(line for line in table if line.startswith("| mono"))
    mean = next(line for line in table if line.startswith("| **mean**"))
    assert "| 90.00 | 80.00 | 70.00 |" in bottle
    assert "| 21 / 216 |" in bottle
    assert "| 70.00 | n/a | n/a |" in mono
    assert "| 80.00 | 80.00 | 70.00 |" in mean


def test_json_has_header_objects_with_stats_and_nulls(tmp_path):
    header = {"project": "p", "group": "g", "config": {"seed": 0}}
    data = json.loads(write_reports(tmp_path, _results(), header)["json"].read_text())
    assert data["project"] == "p" and data["config"] == {"seed": 0}
    assert [o["object"] for o in data["objects"]] == ["bottle", "mono"]
    bottle, mono = data["objects"]
    assert bottle["stats"]["n_patches"] == 216
    assert bottle["stats"]["memory_size"] == 21
    assert bottle["stats"]["feature_dim"] == 1024
    assert bottle["model"] == "m/bottle.pt"
    assert mono["metrics"]["pixel_auroc"] is None
    assert data["mean"]["image_auroc"] == pytest.approx(0.8)


def test_reports_are_rewritten_in_place(tmp_path):
    write_reports(tmp_path, _results()[:1], {})
    write_reports(tmp_path, _results(), {})
    assert [r["object"] for r in _rows(tmp_path / "results.csv")] == ["bottle", "mono", "mean"]


def test_failed_report_write_keeps_the_previous_reports_and_leaves_no_temp_files(tmp_path, monkeypatch):
    write_reports(tmp_path, _results()[:1], {"project": "p"})
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(fileio.os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        write_reports(tmp_path, _results(), {"project": "p"})
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert after == before


def test_atomic_write_replaces_the_whole_file_or_nothing(tmp_path):
    target = tmp_path / "sub" / "model.bin"
    atomic_write(target, lambda handle: handle.write(b"old contents"))
    assert target.read_bytes() == b"old contents"

    def half_then_fail(handle):
        handle.write(b"new")
        raise RuntimeError("crash mid-write")

    with pytest.raises(RuntimeError):
        atomic_write(target, half_then_fail)
    assert target.read_bytes() == b"old contents"
    assert os.listdir(target.parent) == ["model.bin"]

    atomic_write_text(target, "new contents")
    assert target.read_text() == "new contents"
