"""The training-set audit in a run's reports: ``audit/<object>.json`` (written after each fit, see
``app/cmd_audit.py``) becomes a section of summary.md, a key of summary.json and a section of report.html."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

from ..fileio import safe_name

__all__ = ["audit_html", "audit_markdown", "read_audits"]

SHOWN = 8  # images listed per object in the summaries


def read_audits(run_dir: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """The audit records of the objects that have one (a fit without an audit has none)."""
    out = {}
    for name in names:
        path = Path(run_dir) / "audit" / f"{safe_name(name)}.json"
        if path.is_file():
            try:
                out[name] = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
    return out


def audit_markdown(audits: dict[str, dict[str, Any]]) -> list[str]:
    """summary.md lines: per object, the rule, the suspects and the most suspicious training images."""
    if not audits:
        return []
    lines = [
        "",
        "## Training-set audit",
        "",
        "Each training image's leave-one-image-out score: how far its most unusual patch is from every patch of "
        "the other training images. A high score means no other training image looks like it there: check it "
        "for a defect (`model.denoise: true` fits a memory bank that leaves such patches out).",
        "",
    ]
    for name, record in audits.items():
        suspects = record.get("suspects", [])
        lines.append(
            f"- **{name}**: {len(suspects)} of {record.get('n_images')} training images stand out (score > "
            f"{record.get('threshold', float('nan')):.4g}: {record.get('rule', '')})"
        )
        lines.append("")
        lines.append("| rank | training image | score | stands out | map |")
        lines.append("|---:|---|---:|---|---|")
        for row in record.get("ranking", [])[:SHOWN]:
            picture = f"[map]({row['map']})" if row.get("map") else ""
            lines.append(
                f"| {row['rank']} | {row['image']} | {row['score']:.4g} | {'yes' if row['suspect'] else ''} | "
                f"{picture} |"
            )
        lines.append("")
    return lines


def audit_html(run_dir: Path, audits: dict[str, dict[str, Any]]) -> str:
    """report.html section: per object, the most suspicious training images with their maps (inlined)."""
    if not audits:
        return ""
    parts = [
        "<h2 id='training-audit'>Training-set audit</h2><p class='note'>Each training image's "
        "leave-one-image-out score: the distance of its most unusual patch to the nearest patch of the other "
        "training images. Left: image, right: the per-patch score over it (one colour range per object).</p>"
    ]
    for name, record in audits.items():
        suspects = record.get("suspects", [])
        parts.append(
            f"<h3>{html.escape(name)}: {len(suspects)} of {record.get('n_images')} training images stand out"
            f"</h3><p class='note'>threshold {record.get('threshold', float('nan')):.4g} "
            f"({html.escape(str(record.get('rule', '')))})</p><div class='gallery'>"
        )
        for row in record.get("ranking", [])[:SHOWN]:
            caption = html.escape(
                f"#{row['rank']} {row['image']}, score {row['score']:.4g}"
                + (" (stands out)" if row["suspect"] else "")
            )
            picture = Path(run_dir) / row["map"] if row.get("map") else None
            if picture is not None and picture.is_file():
                uri = "data:image/png;base64," + base64.b64encode(picture.read_bytes()).decode("ascii")
                parts.append(
                    f'<figure><img alt="{caption}" src="{uri}"><figcaption>{caption}</figcaption></figure>'
                )
            else:
                parts.append(f"<figure><figcaption>{caption}</figcaption></figure>")
        parts.append("</div>")
    return "\n".join(parts)
