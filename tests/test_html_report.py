"""report.html in a real browser, and folder data sets whose defect images are only partly annotated.

Headless Chromium (Debian's chromium + chromedriver through selenium) opens the page from the file, takes a
screenshot, and the test fails on any image that did not decode (naturalWidth 0) or any console error.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from test_official_eval import make_object

from patchcore.app import cli

pytestmark = pytest.mark.usefixtures("single_torch_thread")

CHROMEDRIVER = Path("/usr/bin/chromedriver")
CHROMIUM = Path("/usr/bin/chromium")


def _texture(seed: int, size: int = 40) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size]
    base = 128 + 40 * np.sin(x / 3.0) * np.cos(y / 4.0) + rng.normal(0, 3, (size, size))
    return np.clip(np.stack([base, base, base], -1), 0, 255).astype(np.uint8)


def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def make_partly_annotated_folder(root: Path) -> Path:
    """Own-folder layout: 4 defect images, masks for 2 of them only."""
    for i in range(5):
        _save(root / "train" / "good" / f"{i:03d}.png", _texture(i))
    for i in range(2):
        _save(root / "test" / "good" / f"{i:03d}.png", _texture(10 + i))
    for i in range(4):
        image = _texture(20 + i)
        image[10:20, 12:24] = 255
        _save(root / "test" / "scratch" / f"{i:03d}.png", image)
        if i < 2:
            mask = np.zeros((40, 40), dtype=np.uint8)
            mask[10:20, 12:24] = 255
            _save(root / "ground_truth" / "scratch" / f"{i:03d}_mask.png", mask)
    return root


def _train(
    tmp: Path, kind: str, data: Path, objects: list[str] | None, resize: int, save_maps: bool = False
) -> Path:
    config = {
        "project": "report",
        "group": kind,
        "seed": 0,
        "output_dir": str(tmp / "out"),
        "data": {"kind": kind, "root": str(data), "objects": objects, "num_workers": 0},
        "model": {
            "backbone": "resnet18",
            "weights": "random",
            "batch_size": 4,
            "resize": resize,
            "imagesize": None,
            "audit": True,  # the report's training-set audit section is checked too
        },
        "evaluation": {"heatmaps": 0, "save_autovi_maps": save_maps},
        "logging": {"progress": False},
    }
    path = tmp / f"{kind}.yaml"
    path.write_text(yaml.safe_dump(config))
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        assert cli.main(["train", "--config", str(path)]) == 0, err.getvalue()
    return tmp / "out" / "report" / kind


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    loco = _train(tmp, "mvtec_loco", make_object(tmp / "loco", loco=True), ["toy"], 36)
    folder = _train(tmp, "folder", make_partly_annotated_folder(tmp / "cells"), None, 40, save_maps=True)
    return {"loco": loco, "folder": folder, "cells": tmp / "cells"}


def test_folder_data_with_masks_for_some_defects_reports_pixel_metrics_over_those(runs):
    """Pixel AUROC and AUROC on defect images equal sklearn's over the good images and the annotated defect
    images only, from the saved maps and the mask PNGs. Catches an unannotated defect image counted as all
    good pixels (its detected square then reads as false positives: the figure drops, checked below)."""
    from sklearn.metrics import roc_auc_score

    summary = json.loads((runs["folder"] / "summary.json").read_text())["objects"][0]
    maps_dir = runs["folder"] / "anomaly_maps" / "cells" / "test"

    def saved_map(label: str, i: int) -> np.ndarray:
        with Image.open(maps_dir / label / f"{i:03d}.png") as image:
            return np.asarray(image, dtype=np.float64)

    def mask(i: int) -> np.ndarray:
        return np.asarray(Image.open(runs["cells"] / "ground_truth" / "scratch" / f"{i:03d}_mask.png")) > 0

    good = [(saved_map("good", i), np.zeros((40, 40), bool)) for i in range(2)]
    annotated = [(saved_map("scratch", i), mask(i)) for i in range(2)]
    unannotated = [(saved_map("scratch", i), np.zeros((40, 40), bool)) for i in (2, 3)]

    def auroc(pairs: list[tuple[np.ndarray, np.ndarray]]) -> float:
        return roc_auc_score(
            np.concatenate([m.ravel() for _, m in pairs]), np.concatenate([a.ravel() for a, _ in pairs])
        )

    metrics = summary["metrics"]
    assert metrics["pixel_auroc"] == pytest.approx(auroc(good + annotated), abs=1e-3)
    assert metrics["pixel_auroc_anomalous"] == pytest.approx(auroc(annotated), abs=1e-3)
    assert auroc(good + annotated) - auroc(good + annotated + unannotated) > 0.01  # the wrong one is far off
    assert metrics["au_pro"] is not None
    assert summary["stats"]["pixel_metric_images"] == 4  # 2 good + the 2 annotated defect images
    assert (summary["stats"]["pixel_metric_defect_images"], summary["stats"]["defect_images"]) == (2, 4)
    assert (
        "pixel metrics over the defect images with a usable mask only (cells: 2 of 4)"
        in (runs["folder"] / "summary.md").read_text()
    )


def test_report_is_self_contained(runs):
    page = (runs["loco"] / "report.html").read_text()
    assert "<script" not in page.lower() and "@font-face" not in page and "@import" not in page
    sources = re.findall(r"src=\"([^\"]*)\"", page)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "image_auroc_class_mean" in page and "au_spro@0.05" in page


@pytest.mark.skipif(
    not (CHROMEDRIVER.exists() and CHROMIUM.exists()), reason="needs Debian chromium + chromedriver"
)
@pytest.mark.parametrize("run", ["loco", "folder"])
def test_report_renders_in_headless_chromium_without_broken_images_or_console_errors(runs, run, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1280,2400", f"--user-data-dir={tmp_path / 'profile'}"):  # fmt: skip
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        driver.set_page_load_timeout(60)
        driver.get((runs[run] / "report.html").resolve().as_uri())
        images = driver.execute_script(
            "return Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth]);"
        )
        screenshot = tmp_path / f"report_{run}.png"
        assert driver.save_screenshot(str(screenshot))
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    finally:
        driver.quit()
    expected = 3 + (
        8 if run == "loco" else 6
    )  # 3 plots + the 4 most and 4 least anomalous (of 6 test images)
    audit = [i for i in images if i[0].startswith("#")]  # the training-set audit's maps ("#rank name, ...")
    assert 1 <= len(audit) <= 8
    assert len(images) - len(audit) == expected, images
    broken = [alt for alt, complete, width in images if not complete or width == 0]
    assert not broken, broken
    assert not errors, errors
    with Image.open(screenshot) as shot:
        assert shot.size[0] >= 1000 and np.asarray(shot.convert("L")).std() > 10  # not a blank page


def test_empty_ground_truth_is_a_warning_naming_the_file_never_silent_negatives(tmp_path):
    data = make_partly_annotated_folder(tmp_path / "cells")
    tiny = np.zeros((40, 40), dtype=np.uint8)
    tiny[5, 5] = 255  # one pixel: gone after the nearest resize to 10 px
    _save(data / "ground_truth" / "scratch" / "000_mask.png", tiny)
    run = _train(tmp_path, "folder", data, None, 10)
    text = (run / "run.log").read_text()
    assert "defect image" in text and str(data / "test" / "scratch" / "000.png") in text
    stats = json.loads((run / "summary.json").read_text())["objects"][0]["stats"]
    assert (stats["pixel_metric_defect_images"], stats["defect_images"]) == (1, 4)

    obj = make_object(tmp_path / "autovi", loco=False) / "toy"
    empty = obj / "ground_truth" / "hole" / "000" / "009.png"
    _save(empty, np.zeros((36, 48, 3), dtype=np.uint8))
    run = _train(tmp_path, "autovi", obj.parent, ["toy"], 36, save_maps=True)
    assert f"ground-truth file {empty}" in (run / "run.log").read_text()
    # sPRO leaves the all-zero file out and keeps the image's other defects: the official script's numbers on
    # the same saved maps with that file removed (a wrong one counting it as a defect never found, or
    # dropping the whole image, differs).
    from official_spro import LIMITS, official_numbers

    empty.unlink()
    official = official_numbers(run / "anomaly_maps" / "toy" / "test", obj, loco=False)
    metrics = json.loads((run / "summary.json").read_text())["objects"][0]["metrics"]
    for limit in LIMITS:
        assert metrics[f"au_spro@{limit:g}"] == pytest.approx(official["au_spro"][limit], abs=2e-3), limit


def test_histograms_get_the_calibrated_decision_threshold_when_the_run_has_one(runs):
    from patchcore.evaluation.plot_data import read_plot_data

    loco = read_plot_data(runs["loco"] / "report_data" / "toy.npz")  # LOCO's validation goods calibrate it
    folder = read_plot_data(runs["folder"] / "report_data" / "cells.npz")  # no calibration asked
    assert np.isfinite(loco["decision_threshold"]) and np.isnan(folder["decision_threshold"])
    assert np.isfinite(loco["threshold"]) and np.isfinite(folder["threshold"])  # best F1 on the test set
