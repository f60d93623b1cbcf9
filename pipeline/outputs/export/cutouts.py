"""Cut-outs (``--format cutouts``): each object as an RGBA crop of its photo, alpha = its mask."""
from __future__ import annotations

import csv
import re
from typing import Optional

import numpy as np

from pipeline.outputs.export.destination import Destination
from pipeline.outputs.export.labels import ExportError, ImageLabels, close_quietly, png_bytes
from pipeline.outputs.rundata import read_rgb
from pipeline.sam import masks as mask_codec


def _score_cell(value) -> str:
    """A score as a CSV cell: empty when null."""
    return "" if value is None else f"{value:.6f}"


class CutoutWriter:
    """NAME/OBJECTID_CLASS.png: RGBA crop of each object's mask bounding box, alpha = the mask."""

    def __init__(self, dest: Destination, image_storage_options: Optional[dict] = None):
        self.dest, self.image_storage_options = dest, image_storage_options
        self.index = dest.open("index.csv", "w", newline="")
        self.csv = csv.writer(self.index)
        self.csv.writerow(["image_id", "uri", "object_id", "class_id", "class_name", "det_score", "mask_score", "area", "path", "source", "review"])

    def add(self, image: ImageLabels) -> int:
        if not image.objects:
            return 0
        rgb = read_rgb(image.uri, self.image_storage_options)
        if rgb.shape[:2] != (image.height, image.width):
            raise ExportError(f"the file is now {rgb.shape[1]}x{rgb.shape[0]}, the run labeled it at {image.width}x{image.height}")
        for obj in image.objects:
            mask = mask_codec.decode(obj["mask"])
            ys, xs = np.nonzero(mask)
            y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
            rgba = np.dstack([rgb[y0:y1, x0:x1], mask[y0:y1, x0:x1].astype(np.uint8) * 255])
            safe_class = re.sub(r"[^A-Za-z0-9._-]+", "_", str(obj["class_name"]))
            rel = f"{image.name}/{int(obj['object_id']):04d}_{safe_class}.png"
            self.dest.write(rel, png_bytes(rgba))
            self.csv.writerow([image.image_id, image.uri, obj["object_id"], obj["class_id"], obj["class_name"],
                               _score_cell(obj["det_score"]), _score_cell(obj["mask_score"]), obj["area"], rel,
                               obj.get("source") or "", obj.get("review") or ""])
        return len(image.objects)

    def abort(self) -> None:
        close_quietly(self.index)

    def close(self) -> list[str]:
        self.index.close()
        return [self.dest.full("index.csv")]
