"""The report's charts: matplotlib figures made without pyplot (no global figure registry, no
backend switch; Agg renders), saved as SVG data: URIs, so the page needs no network and no scripts.
"""
from __future__ import annotations

import base64
import io
from typing import Optional

import numpy as np

from pipeline.outputs.colors import class_color

TOP_GROUPS_SHOWN = 40
TOP_CLASSES_CHARTED = 30
REASON_COLORS = {"low_score": "#e45756", "unstable": "#f58518", "leaks_box": "#b279a2", "fragmented": "#4c78a8",
                 "tiny": "#72b7b2", "duplicate": "#9d755d"}
METRIC_TITLES = {
    "stability": ("Stability (IoU of the mask at logit +1 and -1)", "stability"),
    "box_iou": ("Mask box vs prompt box (IoU)", "box_iou"),
    "outside_box": ("Share of the mask outside the prompt box", "outside_box"),
    "largest_region": ("Share of the area in the largest region", "largest_region"),
}

# Applied with matplotlib.rc_context while the report draws, so a caller's own settings are left alone.
STYLE = {"svg.fonttype": "path", "font.size": 9, "axes.spines.top": False, "axes.spines.right": False, "svg.hashsalt": "autolabel"}


def _svg(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    return "data:image/svg+xml;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def figure(width=6.4, height=3.2):
    """A figure without pyplot: no global figure registry, no backend switch (Agg renders the pixels)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    return fig, fig.subplots()


def chart_classes(classes: list[dict]) -> Optional[str]:
    if not classes:
        return None
    shown = classes[:TOP_CLASSES_CHARTED]
    fig, ax = figure(6.4, max(1.6, 0.24 * len(shown) + 0.8))
    names = [c["class_name"] for c in shown][::-1]
    counts = [c["count"] for c in shown][::-1]
    bars = ax.barh(names, counts, color=[class_color(c["class_id"]) for c in shown][::-1])
    ax.bar_label(bars, labels=[f"{c:,}" for c in counts], padding=3, fontsize=8)
    ax.set_xlabel("objects")
    title = "Objects per class" + (f" (top {TOP_CLASSES_CHARTED} of {len(classes)})" if len(classes) > len(shown) else "")
    ax.set_title(title, loc="left")
    ax.margins(x=0.12)
    return _svg(fig)


def chart_hist(edges, counts, title: str, xlabel: str, log_x: bool = False) -> Optional[str]:
    if not len(counts) or not sum(counts):
        return None
    fig, ax = figure(4.6, 2.8)
    ax.stairs(counts, edges, fill=True, color="#4c78a8", alpha=0.85)
    if log_x:
        ax.set_xscale("log")
    ax.set_title(title, loc="left")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("objects")
    return _svg(fig)


def chart_objects_per_image(values, images) -> Optional[str]:
    if not values:
        return None
    fig, ax = figure(4.6, 2.8)
    from matplotlib.ticker import MaxNLocator

    ax.bar(values, images, width=0.9 if len(values) < 60 else 1.0, color="#f58518")
    ax.set_xlim(-0.6, max(values) + 0.6)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title("Objects per image (ok images)", loc="left")
    ax.set_xlabel("objects in the image")
    ax.set_ylabel("images")
    return _svg(fig)


def chart_groups(groups: list[dict], classes: list[dict], label: str, num_groups: int) -> Optional[str]:
    shown = [g for g in groups[:TOP_GROUPS_SHOWN]]
    if not shown or not any(g["objects"] for g in shown):
        return None
    top = [c for c in classes[:8]]
    fig, ax = figure(6.4, max(1.8, 0.26 * len(shown) + 1.0))
    names = [_short(str(g["group"]), 48) for g in shown][::-1]
    left = np.zeros(len(shown))
    for c in top:
        vals = np.array([g["by_class"].get(c["class_name"], {}).get("count", 0) for g in shown][::-1], float)
        ax.barh(names, vals, left=left, color=class_color(c["class_id"]), label=c["class_name"])
        left += vals
    other = np.array([g["objects"] for g in shown][::-1], float) - left
    if other.any():
        ax.barh(names, other, left=left, color="#bbbbbb", label="other classes")
    ax.set_xlabel("objects")
    ax.set_title(f"Objects by {label}" + (f" (top {len(shown)} of {num_groups:,})" if num_groups > len(shown) else ""), loc="left")
    ax.legend(fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _svg(fig)


def _short(text: str, n: int) -> str:
    return text if len(text) <= n else "…" + text[-(n - 1):]


def chart_reasons(by_reason: dict) -> Optional[str]:
    if not by_reason:
        return None
    names = list(by_reason)[::-1]
    fig, ax = figure(4.6, max(1.4, 0.3 * len(names) + 0.8))
    bars = ax.barh(names, [by_reason[n] for n in names], color=[REASON_COLORS.get(n, "#888888") for n in names])
    ax.bar_label(bars, labels=[f"{by_reason[n]:,}" for n in names], padding=3, fontsize=8)
    ax.set_xlabel("flagged objects (an object may have several reasons)")
    ax.set_title("Flagged objects by reason", loc="left")
    ax.margins(x=0.15)
    return _svg(fig)


def chart_flagged_classes(by_class: list[dict]) -> Optional[str]:
    shown = [c for c in by_class if c["objects"]][:TOP_CLASSES_CHARTED]
    if not shown or not any(c["flagged"] for c in shown):
        return None
    fig, ax = figure(6.4, max(1.6, 0.26 * len(shown) + 0.9))
    names = [c["class_name"] for c in shown][::-1]
    flagged = np.array([c["flagged"] for c in shown][::-1], float)
    fine = np.array([c["objects"] - c["flagged"] for c in shown][::-1], float)
    ax.barh(names, flagged, color="#e45756", label="flagged")
    ax.barh(names, fine, left=flagged, color="#c9d3df", label="not flagged")
    for y, (f, total) in enumerate(zip(flagged, flagged + fine)):
        ax.text(total, y, f"  {100 * f / total:.0f} %", va="center", fontsize=8)
    ax.set_xlabel("objects")
    ax.set_title("Flagged objects by class", loc="left")
    ax.legend(fontsize=7, frameon=False, loc="lower right")
    ax.margins(x=0.12)
    return _svg(fig)


def chart_counts(values: list[int], counts: list[int], title: str, xlabel: str, last_is_at_least: Optional[int] = None) -> Optional[str]:
    if not values or not sum(counts):
        return None
    fig, ax = figure(4.6, 2.8)
    ax.bar(values, counts, width=0.8, color="#4c78a8")
    ax.set_xticks(values, [f"{v}+" if last_is_at_least is not None and v >= last_is_at_least else str(v) for v in values])
    ax.set_title(title, loc="left")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("objects")
    return _svg(fig)
