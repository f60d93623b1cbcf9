"""Colours shared by every output, so a class looks the same in the report's charts and gallery
and in the Label Studio labeling config an export writes."""
from __future__ import annotations

from typing import Optional


def class_color(class_id: Optional[int]) -> tuple[float, float, float]:
    """Stable colour per class (matplotlib's tab20), the same in charts and gallery; grey if unlabeled."""
    from matplotlib import colormaps

    if class_id is None:
        return (0.55, 0.55, 0.55)
    return tuple(colormaps["tab20"](int(class_id) % 20)[:3])
