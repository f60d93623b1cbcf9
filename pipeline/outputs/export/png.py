"""Instance and class PNGs (``--format png``): one label image per photo, and an index."""
from __future__ import annotations

import csv

import numpy as np

from pipeline.outputs.export.destination import Destination
from pipeline.outputs.export.labels import ImageLabels, close_quietly, png_bytes
from pipeline.sam import masks as mask_codec


class PngWriter:
    """instances/NAME.png (uint16: object_id + 1, 0 = background) and optionally classes/NAME.png."""

    def __init__(self, dest: Destination, categories: dict[int, str], class_png: bool):
        self.dest, self.class_png = dest, class_png
        self.class_dtype = np.uint8 if (max(categories, default=0) + 1) <= 255 else np.uint16
        self.index = dest.open("index.csv", "w", newline="")
        self.csv = csv.writer(self.index)
        self.csv.writerow(["image_id", "uri", "instances_png", "classes_png", "objects"])

    def add(self, image: ImageLabels) -> int:
        instances = np.zeros((image.height, image.width), np.uint16)
        classes = np.zeros((image.height, image.width), self.class_dtype) if self.class_png else None
        # Overlaps: the best-scoring object (lowest object_id) is painted last and wins.
        for obj in sorted(image.objects, key=lambda o: -o["object_id"]):
            mask = mask_codec.decode(obj["mask"])
            instances[mask] = int(obj["object_id"]) + 1
            if classes is not None:
                classes[mask] = int(obj["class_id"]) + 1
        inst_rel = f"instances/{image.name}.png"
        self.dest.write(inst_rel, png_bytes(instances))
        cls_rel = ""
        if classes is not None:
            cls_rel = f"classes/{image.name}.png"
            self.dest.write(cls_rel, png_bytes(classes))
        self.csv.writerow([image.image_id, image.uri, inst_rel, cls_rel, len(image.objects)])
        return len(image.objects)

    def abort(self) -> None:
        close_quietly(self.index)

    def close(self) -> list[str]:
        self.index.close()
        return [self.dest.full("index.csv")]
