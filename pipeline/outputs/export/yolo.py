"""YOLO segmentation (``--format yolo``): images, polygon label files and data.yaml, as ultralytics
trains on them."""
from __future__ import annotations

from typing import Optional

import numpy as np

from pipeline.outputs.export.destination import Destination
from pipeline.outputs.export.labels import ExportError, ImageLabels, mask_polygons, png_bytes
from pipeline.outputs.rundata import read_image, read_rgb
from pipeline.sam import masks as mask_codec

# Image suffixes ultralytics' loader accepts; anything else is re-encoded as PNG for YOLO.
YOLO_IMAGE_SUFFIXES = {".bmp", ".dng", ".jpeg", ".jpg", ".mpo", ".png", ".tif", ".tiff", ".webp", ".pfm"}
EXIF_ORIENTATION = 0x0112


class YoloWriter:
    """YOLO-seg: images/{train,val}/NAME.ext, labels/{train,val}/NAME.txt, data.yaml."""

    def __init__(self, dest: Destination, categories: dict[int, str], val_fraction: float, image_storage_options: Optional[dict] = None):
        from ultralytics.data.converter import merge_multi_segment  # YOLO's own joining of multi-part masks

        self.merge = merge_multi_segment
        self.dest, self.categories, self.val_fraction = dest, categories, val_fraction
        self.image_storage_options = image_storage_options
        self.splits: set[str] = set()

    def split_of(self, image_id: str) -> str:
        """Repeatable split from the image id (the same image always lands in the same split)."""
        return "val" if int(image_id[:8], 16) / 2**32 < self.val_fraction else "train"

    def _image_bytes(self, image: ImageLabels) -> tuple[bytes, str]:
        """The original file's bytes, unless its EXIF rotates it or YOLO cannot read its format: then a PNG of the pixels."""
        from pipeline.io.decode import open_image

        if image.video_uri is not None:  # a video frame has no file of its own: its decoded pixels as PNG
            return png_bytes(read_rgb(image.uri, self.image_storage_options)), ".png"
        data = read_image(image.uri, self.image_storage_options)
        with open_image(data) as img:
            size = img.size
            rotated = img.getexif().get(EXIF_ORIENTATION, 1) not in (1, None)
        if not rotated and image.suffix in YOLO_IMAGE_SUFFIXES and size == (image.width, image.height):
            return data, image.suffix
        rgb = read_rgb(image.uri, self.image_storage_options)
        if rgb.shape[:2] != (image.height, image.width):
            raise ExportError(f"the file is now {rgb.shape[1]}x{rgb.shape[0]}, the run labeled it at {image.width}x{image.height}")
        return png_bytes(rgb), ".png"

    def add(self, image: ImageLabels) -> int:
        data, suffix = self._image_bytes(image)
        split = self.split_of(image.image_id)
        self.splits.add(split)
        lines = []
        for obj in image.objects:
            polys = mask_polygons(mask_codec.decode(obj["mask"]))
            if len(polys) > 1:
                poly = np.concatenate(self.merge([p.reshape(-1).tolist() for p in polys]), axis=0)
            else:
                poly = polys[0]
            norm = np.clip(poly / np.array([image.width, image.height], np.float64), 0.0, 1.0)
            lines.append(f"{int(obj['class_id'])} " + " ".join(f"{v:.6f}" for v in norm.reshape(-1)))
        self.dest.write(f"images/{split}/{image.name}{suffix}", data)
        self.dest.write(f"labels/{split}/{image.name}.txt", ("\n".join(lines) + "\n" if lines else "").encode())
        return len(lines)

    def abort(self) -> None:
        pass

    def close(self) -> list[str]:
        import yaml

        n = max(self.categories) + 1 if self.categories else 0
        names = {i: self.categories.get(i, f"class_{i}") for i in range(n)}
        val = "images/val" if "val" in self.splits else "images/train"
        root = self.dest.path if self.dest.url.startswith("file://") else self.dest.url
        text = "# written by autolabel export --format yolo; class ids are the detector's\n" + yaml.safe_dump(
            {"path": root, "train": "images/train", "val": val, "names": names}, sort_keys=False
        )
        return [self.dest.write("data.yaml", text.encode())]
