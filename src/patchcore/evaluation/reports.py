"""Run reports: results.csv (one row per object and a mean row), summary.md, summary.json and report.html.

Metrics whose ground truth is absent are None: "n/a" in the CSV and the table, null in JSON, and left out
of the mean (a mean over the objects that have the metric, with how many that was).
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

from ..fileio import atomic_write_json, atomic_write_text
from .audit_report import audit_markdown, read_audits
from .html_report import write_html_report
from .results import METRIC_LEGEND, ObjectResult, legend_applies, mean_metrics
from .results import metric_columns as _metric_columns

__all__ = ["ObjectResult", "mean_metrics", "write_reports"]

STAT_COLUMNS = (
    "n_train_images",
    "n_test_images",
    "n_patches",
    "memory_size",
    "feature_dim",
    "extract_seconds",
    "coreset_seconds",
    "index_seconds",
    "predict_seconds",
)


def _fmt(value: Any, percent: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{100 * value:.2f}" if percent else f"{value:.4g}"
    return str(value)


def write_reports(run_dir: Path, results: list[ObjectResult], header: dict[str, Any]) -> dict[str, Path]:
    """Write results.csv, summary.md, summary.json and report.html into ``run_dir`` (atomically)."""
    run_dir = Path(run_dir)
    metric_keys = _metric_columns(results)
    means = mean_metrics(results)

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["object", *metric_keys, *STAT_COLUMNS])
    for r in results:
        writer.writerow(
            [
                r.name,
                *(_csv(r.metrics.get(k)) for k in metric_keys),
                *(_csv(r.stats.get(k)) for k in STAT_COLUMNS),
            ]
        )
    writer.writerow(["mean", *(_csv(means[k]) for k in metric_keys), *([""] * len(STAT_COLUMNS))])
    paths = {
        "csv": run_dir / "results.csv",
        "markdown": run_dir / "summary.md",
        "json": run_dir / "summary.json",
    }
    atomic_write_text(paths["csv"], buffer.getvalue())

    lines = [f"# PatchCore results: {header.get('project', '')} / {header.get('group', '')}", ""]
    for key in ("data", "backbone", "layers", "sampler", "created"):
        if key in header:
            lines.append(f"- {key}: {header[key]}")
    lines += ["", "Metrics in percent; n/a = no ground truth for that metric.", ""]
    lines += [f"- {key}: {text}" for key, text in METRIC_LEGEND.items() if legend_applies(metric_keys, key)]
    partial = [
        f"{r.name}: {r.stats['pixel_metric_defect_images']} of {r.stats['defect_images']}"
        for r in results
        if r.stats.get("pixel_metric_defect_images", 0) < r.stats.get("defect_images", 0)
    ]
    if partial:
        lines.append(
            "- pixel metrics over the defect images with a usable mask only (" + "; ".join(partial) + ")"
        )
    lines.append("")
    columns = ["object", *metric_keys, "memory", "train s", "test s"]
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|" + "|".join(["---"] + ["---:"] * (len(columns) - 1)) + "|")
    for r in results:
        train_seconds = sum(
            r.stats.get(k) or 0 for k in ("extract_seconds", "coreset_seconds", "index_seconds")
        )
        cells = [r.name, *(_fmt(r.metrics.get(k), True) for k in metric_keys)]
        cells += [
            f"{r.stats.get('memory_size', 'n/a')} / {r.stats.get('n_patches', 'n/a')}",
            f"{train_seconds:.1f}",
            _fmt(r.stats.get("predict_seconds")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("| **mean** | " + " | ".join(_fmt(means[k], True) for k in metric_keys) + " | | | |")
    audits = read_audits(run_dir, [r.name for r in results])  # the training-set audit (issue 21)
    lines += audit_markdown(audits)
    atomic_write_text(paths["markdown"], "\n".join(lines) + "\n")

    atomic_write_json(
        paths["json"],
        {
            **header,
            "objects": [
                {"object": r.name, "metrics": r.metrics, "stats": r.stats, "model": r.model_path}
                for r in results
            ],
            "mean": means,
            "training_audit": audits,
        },
    )
    paths["html"] = write_html_report(run_dir, results, header)
    return paths


def _csv(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.6f}"
    return str(value)
