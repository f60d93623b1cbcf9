"""The report's pictures, as JPEG data: URIs: gallery images with their masks in class colours,
boxes and labels, and flagged objects in their surroundings. An image that cannot be read as the
run saw it is drawn on a blank canvas, with the reason.
"""
from __future__ import annotations

import base64
import io
from typing import Optional

import numpy as np

from pipeline.io.credentials import redact
from pipeline.outputs.colors import class_color
from pipeline.outputs.report.charts import figure
from pipeline.outputs.report.stats import RunStats
from pipeline.outputs.rundata import read_rgb

GALLERY_MAX_SIDE = 640
LABELS_PER_IMAGE = 40
FLAGGED_MAX_SIDE = 260


def _score(value) -> str:
    """A score for a label; manifest objects have no detector score (null): shown as a dash."""
    return "–" if value is None else f"{value:.2f}"


def render_gallery_image(pick: dict, objects: list[dict], image_storage_options: Optional[dict] = None) -> tuple[str, Optional[str]]:
    """JPEG data URI of the image with masks in class colours, boxes and labels; and a note (the
    reason) when the image could not be drawn on its own pixels (unreadable, or changed size)."""
    from PIL import Image

    from pipeline.errors import ImageError
    from pipeline.sam import masks as mask_codec

    h, w = int(pick["height"]), int(pick["width"])
    note = None
    try:
        rgb = read_rgb(pick["uri"], image_storage_options)
        if rgb.shape[:2] != (h, w):
            note = f"the file is now {rgb.shape[1]}x{rgb.shape[0]}, the run saw {w}x{h}: drawn on a blank canvas"
            rgb = None
    except Exception as exc:  # noqa: BLE001 - a missing picture must not stop the report; it is reported instead
        why = f"{exc.error_class}: {exc}" if isinstance(exc, ImageError) else f"{type(exc).__name__}: {exc}"
        note = f"image not readable now ({redact(why, image_storage_options)}): masks drawn on a blank canvas"
        rgb = None
    # Every picture is drawn GALLERY_MAX_SIDE wide or high: big photos shrink, tiny ones are
    # enlarged (pixelated, not blurred) so the labels stay readable.
    scale = GALLERY_MAX_SIDE / max(h, w)
    sh, sw = max(1, round(h * scale)), max(1, round(w * scale))
    base = np.full((h, w, 3), 235, np.uint8) if rgb is None else rgb
    resample = Image.BILINEAR if scale < 1 else Image.NEAREST
    canvas = np.asarray(Image.fromarray(base).resize((sw, sh), resample), dtype=np.float32) / 255.0
    for obj in sorted(objects, key=lambda o: -o["object_id"]):  # best-scoring object painted last, on top
        mask = mask_codec.decode(obj["mask"])
        small = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((sw, sh), Image.NEAREST)) > 127
        canvas[small] = canvas[small] * 0.5 + np.array(class_color(obj["class_id"])) * 0.5
    fig, ax = figure(sw / 100, sh / 100)
    fig.subplots_adjust(0, 0, 1, 1)
    ax.imshow(canvas, interpolation="nearest")
    ax.set_axis_off()
    from matplotlib.patches import Rectangle

    for obj in objects[:LABELS_PER_IMAGE]:
        x0, y0, x1, y1 = (v * scale for v in obj["box"])
        color = class_color(obj["class_id"])
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=color, linewidth=1.2))
        inside = y0 < 16  # no room above the box (it touches the top): put the label just inside it
        ax.text(x0 + (1 if inside else 0), y0 + (1 if inside else 0), f"{obj['class_name']} {_score(obj['det_score'])}·{_score(obj['mask_score'])}", fontsize=9, color="white",
                va="top" if inside else "bottom", ha="left", bbox=dict(facecolor=color, edgecolor="none", pad=1.0, alpha=0.9), clip_on=True)
    buf = io.BytesIO()
    fig.savefig(buf, format="jpeg", dpi=100, pil_kwargs={"quality": 85})
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii"), note


def render_flagged_object(obj: dict, rgb: Optional[np.ndarray], size: tuple[int, int]) -> str:
    """JPEG data URI: the object's surroundings (its mask and prompt box, padded), the mask tinted in its
    class colour with its outline, the prompt box in yellow."""
    from PIL import Image, ImageDraw

    from pipeline.sam import masks as mask_codec

    h, w = size
    mask = mask_codec.decode(obj["mask"])
    ys, xs = np.nonzero(mask)
    x0, y0, x1, y1 = (float(v) for v in obj["box"]) if obj.get("box") is not None else (0.0, 0.0, float(w), float(h))
    if len(xs):
        x0, y0, x1, y1 = min(x0, xs.min()), min(y0, ys.min()), max(x1, xs.max() + 1), max(y1, ys.max() + 1)
    pad = max(8.0, 0.2 * max(x1 - x0, y1 - y0))
    cx0, cy0 = int(max(0, np.floor(x0 - pad))), int(max(0, np.floor(y0 - pad)))
    cx1, cy1 = int(min(w, np.ceil(x1 + pad))), int(min(h, np.ceil(y1 + pad)))
    base = np.full((h, w, 3), 235, np.uint8) if rgb is None else rgb
    crop = base[cy0:cy1, cx0:cx1].astype(np.float32) / 255.0
    m = mask[cy0:cy1, cx0:cx1]
    color = np.array(class_color(obj.get("class_id")))
    crop[m] = crop[m] * 0.45 + color * 0.55
    edge = m & ~(np.pad(m, 1)[2:, 1:-1] & np.pad(m, 1)[:-2, 1:-1] & np.pad(m, 1)[1:-1, 2:] & np.pad(m, 1)[1:-1, :-2])
    crop[edge] = color * 0.6
    scale = FLAGGED_MAX_SIDE / max(crop.shape[0], crop.shape[1])
    out_w, out_h = max(1, round(crop.shape[1] * scale)), max(1, round(crop.shape[0] * scale))
    picture = Image.fromarray((crop * 255).round().astype(np.uint8)).resize((out_w, out_h), Image.NEAREST if scale >= 1 else Image.BILINEAR)
    if obj.get("box") is not None:
        bx0, by0, bx1, by1 = ((float(v) - o) * scale for v, o in zip(obj["box"], (cx0, cy0, cx0, cy0)))
        ImageDraw.Draw(picture).rectangle([bx0, by0, max(bx0, bx1 - 1), max(by0, by1 - 1)], outline=(255, 204, 0), width=2)
    buf = io.BytesIO()
    picture.save(buf, format="JPEG", quality=88)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def draw_flagged(stats: "RunStats", picks: list[tuple[str, int]], image_storage_options: Optional[dict]) -> list[dict]:
    """The quality gallery: each picked flagged object drawn on its own image (read once per image)."""
    from pipeline.errors import ImageError

    if not picks:
        return []
    image_ids = sorted({i for i, _ in picks})
    info = stats.image_rows(image_ids)
    objects = stats.objects_of(image_ids)
    by_key = {(o["image_id"], o["object_id"]): o for rows in objects.values() for o in rows}
    out, pixels = [], {}
    for image_id, object_id in picks:
        obj = by_key.get((image_id, object_id))
        if obj is None:
            continue
        _, uri, width, height = info[image_id]
        if image_id not in pixels:
            try:
                rgb = read_rgb(uri, image_storage_options)
                pixels[image_id] = (rgb, None) if rgb.shape[:2] == (height, width) else (
                    None, f"the file is now {rgb.shape[1]}x{rgb.shape[0]}, the run saw {width}x{height}: drawn on a blank canvas")
            except Exception as exc:  # noqa: BLE001 - reported on the page, never fatal
                why = f"{exc.error_class}: {exc}" if isinstance(exc, ImageError) else f"{type(exc).__name__}: {exc}"
                pixels[image_id] = (None, f"image not readable now ({redact(why, image_storage_options)}): drawn on a blank canvas")
        rgb, note = pixels[image_id]
        out.append({
            "image_id": image_id, "object_id": object_id, "uri": uri, "class_name": obj["class_name"], "flags": list(obj.get("flags") or []),
            "mask_score": obj.get("mask_score"), "stability": obj.get("stability"), "box_iou": obj.get("box_iou"),
            "regions": obj.get("regions"), "area": obj.get("area"), "note": note,
            "src": render_flagged_object(obj, rgb, (int(height), int(width))),
        })
    return out
