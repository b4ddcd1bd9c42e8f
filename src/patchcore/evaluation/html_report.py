"""``report.html``: one self-contained page per run that a person reads (no external scripts, fonts or files).

The summary table, then per object: the ROC curve of the image scores, the PRO / sPRO curve up to the FPR
limits, histograms of the good and the defective images' scores with the decision threshold, and a gallery
of the most and least anomalous test images (heatmap overlay, ground truth drawn as a red contour). Plots are
matplotlib figures (Agg canvas, no pyplot state) inlined as base64 PNG. An object's section is rendered once
from its ``report_data/<object>.npz`` and kept beside it, so rewriting the page after each object is cheap.
"""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..fileio import atomic_write_text, safe_name
from ..heatmaps import colorize
from .audit_report import audit_html, read_audits
from .plot_data import GALLERY_SIZE, read_plot_data
from .results import METRIC_LEGEND, ObjectResult, legend_applies, mean_metrics

__all__ = ["write_html_report"]

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px;color:#1d2330;max-width:1200px}
h1{font-size:22px}h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ccd}h3{font-size:15px}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccd;padding:3px 7px;text-align:right}
th{background:#eef}td:first-child,th:first-child{text-align:left}.note{color:#556;font-size:13px}
.plots img{width:32%;min-width:300px;margin:2px}.gallery{display:flex;flex-wrap:wrap;gap:8px}
figure{margin:0;font-size:12px;width:384px}figure img{display:block;width:100%;image-rendering:pixelated}
.wide{overflow-x:auto}
"""


def _png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _figure_png(figure: Any) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    buffer = io.BytesIO()
    FigureCanvasAgg(figure).print_png(buffer)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _new_figure() -> tuple[Any, Any]:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(4.2, 3.2), dpi=90, layout="constrained")
    return figure, figure.add_subplot()


def _roc_plot(labels: np.ndarray, scores: np.ndarray) -> str | None:
    if labels.min() == labels.max():
        return None
    from sklearn.metrics import roc_auc_score, roc_curve

    fpr, tpr, _ = roc_curve(labels, scores)
    figure, axes = _new_figure()
    axes.plot(fpr, tpr, color="#2060c0", label=f"AUROC {100 * roc_auc_score(labels, scores):.2f}")
    axes.plot([0, 1], [0, 1], color="#aaa", linestyle=":")
    axes.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC (image score, pooled)")
    axes.legend(loc="lower right")
    return _figure_png(figure)


def _curve_plot(data: dict[str, Any]) -> str | None:
    titles = [str(t) for t in data["curve_titles"]]
    if not titles:
        return None
    figure, axes = _new_figure()
    for k, title in enumerate(titles):
        fpr, y = data[f"curve_{k}"]
        axes.plot(fpr, y, label=title)
    limits = [float(v) for v in data["fpr_limits"]]
    for limit in limits:
        axes.axvline(limit, color="#999", linewidth=0.7, linestyle="--")
    if max(limits) / min(limits) > 20:
        axes.set_xscale("symlog", linthresh=min(limits))
    axes.set_xlim(0, max(limits))
    kind = "sPRO" if titles[0].startswith("sPRO") else "PRO"
    axes.set(
        xlabel="false positive rate (pixels)", ylabel=kind, title=f"{kind} curve up to FPR {max(limits):g}"
    )
    axes.set_ylim(0, 1.02)
    axes.legend(loc="lower right", fontsize=8)
    return _figure_png(figure)


def _histogram_plot(labels: np.ndarray, scores: np.ndarray, threshold: float, decision: float) -> str:
    figure, axes = _new_figure()
    bins = np.histogram_bin_edges(scores, bins=min(40, max(5, scores.size // 3)))
    axes.hist(scores[labels == 0], bins=bins, alpha=0.6, color="#2a9d55", label="good")
    if labels.any():
        axes.hist(scores[labels == 1], bins=bins, alpha=0.6, color="#d0453a", label="defective")
    if math.isfinite(decision):
        axes.axvline(
            decision, color="black", linestyle="-", label=f"decision threshold {decision:.4g} (calibrated)"
        )
    if math.isfinite(threshold):
        axes.axvline(
            threshold, color="black", linestyle="--", label=f"threshold {threshold:.4g} (best F1 on test)"
        )
    axes.set(xlabel="image score", ylabel="images", title="Image scores")
    axes.legend(fontsize=8)
    return _figure_png(figure)


def _contour(truth: np.ndarray) -> np.ndarray:
    """Border pixels of the ground-truth regions (inside, 4-neighbour), for drawing an outline."""
    inner = truth.copy()
    inner[1:, :] &= truth[:-1, :]
    inner[:-1, :] &= truth[1:, :]
    inner[:, 1:] &= truth[:, :-1]
    inner[:, :-1] &= truth[:, 1:]
    return truth & ~inner


def _gallery_picture(picture: np.ndarray, heat: np.ndarray, truth: np.ndarray) -> str:
    blended = (0.5 * picture + 0.5 * colorize(heat)).astype(np.uint8)
    left = picture.copy()
    left[_contour(truth)] = (255, 30, 30)
    blended[_contour(truth)] = (255, 30, 30)
    return _png(Image.fromarray(np.concatenate([left, blended], axis=1)))


def _per_class_table(per_class: dict[str, Any]) -> str:
    """Per defect folder (AutoVI / LOCO): image AUROC of the map maximum and AUC-sPRO at each limit."""
    if not per_class:
        return ""
    limits = sorted({k for v in per_class.values() for k in v.get("au_spro", {})}, key=float)
    head = "<tr><th>defect folder</th><th>image AUROC (map max)</th>"
    head += "".join(f"<th>AUC-sPRO@{html.escape(k)}</th>" for k in limits) + "</tr>"
    rows = [
        f"<tr><td>{html.escape(label)}</td><td>{_cell(v.get('image_auroc_map_max'))}</td>"
        + "".join(f"<td>{_cell(v.get('au_spro', {}).get(k))}</td>" for k in limits)
        + "</tr>"
        for label, v in per_class.items()
    ]
    return (
        "<h3>Per defect folder (against all good images)</h3>"
        f"<div class='wide'><table>{head}{''.join(rows)}</table></div>"
    )


def _object_section(data: dict[str, Any]) -> str:
    labels, scores = data["labels"], data["scores"]
    name = html.escape(data["object"])
    parts = [f'<h2 id="obj-{safe_name(data["object"])}">{name}</h2>', '<div class="plots">']
    for title, uri in (
        ("ROC curve", _roc_plot(labels, scores)),
        ("PRO / sPRO curve", _curve_plot(data)),
        ("score histograms", _histogram_plot(labels, scores, data["threshold"], data["decision_threshold"])),
    ):
        if uri is not None:
            parts.append(f'<img alt="{name}: {title}" src="{uri}">')
    parts.append("</div>")
    parts.append(_per_class_table(data["per_class"]))
    gallery, has_truth = data["gallery"], data["gallery_has_truth"]
    if gallery.size:
        parts.append(
            "<h3>Most anomalous test images</h3><p class='note'>Left: image, right: anomaly map "
            "(one colour scale for the whole test set) over the image; red outline: ground truth.</p>"
        )
        parts.append('<div class="gallery">')
        for rank, index in enumerate(gallery):
            if rank == min(GALLERY_SIZE, gallery.size) and rank < gallery.size:
                parts.append("</div><h3>Least anomalous</h3><div class='gallery'>")
            uri = _gallery_picture(
                data[f"gallery_{rank}_image"], data[f"gallery_{rank}_map"], data[f"gallery_{rank}_truth"]
            )
            label = "defective" if labels[index] else "good"
            caption = f"{html.escape(str(data['names'][index]))} ({label}), score {scores[index]:.4g}" + (
                "" if has_truth[rank] or not labels[index] else ", no mask"
            )
            parts.append(
                f'<figure><img alt="{caption}" src="{uri}"><figcaption>{caption}</figcaption></figure>'
            )
        parts.append("</div>")
    return "\n".join(parts)


def _section_for(run_dir: Path, name: str) -> str:
    source = run_dir / "report_data" / f"{safe_name(name)}.npz"
    if not source.is_file():
        return f"<h2>{html.escape(name)}</h2><p class='note'>No evaluation data (evaluation disabled).</p>"
    cached = source.with_suffix(".html")
    if cached.is_file() and cached.stat().st_mtime_ns >= source.stat().st_mtime_ns:
        return cached.read_text(encoding="utf-8")
    section = _object_section(read_plot_data(source))
    atomic_write_text(cached, section)
    return section


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{100 * value:.2f}" if isinstance(value, float) else html.escape(str(value))


def write_html_report(run_dir: Path, results: list[ObjectResult], header: dict[str, Any]) -> Path:
    """Write ``run_dir/report.html`` (atomically) from the results and each object's plot data."""
    run_dir = Path(run_dir)
    keys = [k for k in dict.fromkeys(k for r in results for k in r.metrics)]
    means = mean_metrics(results)
    rows = [
        "<tr><th>object</th>" + "".join(f"<th>{html.escape(k)}</th>" for k in keys) + "</tr>",
        *(
            f"<tr><td><a href='#obj-{safe_name(r.name)}'>{html.escape(r.name)}</a></td>"
            + "".join(f"<td>{_cell(r.metrics.get(k))}</td>" for k in keys)
            + "</tr>"
            for r in results
        ),
        "<tr><th>mean</th>" + "".join(f"<th>{_cell(means.get(k))}</th>" for k in keys) + "</tr>",
    ]
    facts = "".join(
        f"<li>{html.escape(k)}: {html.escape(str(header[k]))}</li>"
        for k in ("data", "backbone", "layers", "sampler", "created")
        if k in header
    )
    legend = "".join(
        f"<li><b>{html.escape(k)}</b>: {html.escape(v)}</li>"
        for k, v in METRIC_LEGEND.items()
        if legend_applies(keys, k)
    )
    partial = [
        f"{html.escape(r.name)}: {r.stats['pixel_metric_defect_images']} of {r.stats['defect_images']}"
        for r in results
        if r.stats.get("pixel_metric_defect_images", 0) < r.stats.get("defect_images", 0)
    ]
    if partial:
        legend += f"<li>pixel metrics over the defect images with a mask only ({'; '.join(partial)})</li>"
    title = html.escape(f"PatchCore results: {header.get('project', '')} / {header.get('group', '')}")
    body = [
        f"<h1>{title}</h1><ul class='note'>{facts}</ul>",
        "<p class='note'>Metrics in percent; n/a = no ground truth for that metric.</p>",
        f"<div class='wide'><table>{''.join(rows)}</table></div><ul class='note'>{legend}</ul>",
        *(_section_for(run_dir, r.name) for r in results),
        audit_html(run_dir, read_audits(run_dir, [r.name for r in results])),
    ]
    page = (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{title}</title><style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )
    path = run_dir / "report.html"
    atomic_write_text(path, page)
    return path
