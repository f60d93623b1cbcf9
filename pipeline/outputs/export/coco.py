"""COCO instances JSON (``--format coco``), masks as RLE or polygons, streamed to the file."""
from __future__ import annotations

import json
import shutil
import tempfile
from typing import Optional

from pipeline.outputs.export.destination import Destination
from pipeline.outputs.export.labels import ImageLabels, close_quietly, mask_polygons, utc_now
from pipeline.outputs.rundata import RunData
from pipeline.sam import masks as mask_codec


def _score(value) -> Optional[float]:
    """A score as written to the exports; null stays null (manifest objects have no detector score)."""
    return None if value is None else round(float(value), 6)


def _local_name(uri: str) -> str:
    """COCO ``file_name``: a plain path for local files (joins with an image root), else the URI."""
    return uri[len("file://"):] if uri.startswith("file://") else uri


class CocoWriter:
    """COCO instances JSON, streamed: images go straight out, annotations via a local temp file."""

    def __init__(self, dest: Destination, run: RunData, categories: dict[int, str], segmentation: str):
        self.dest, self.segmentation = dest, segmentation
        self.out = dest.open("instances.json", "w")
        self.tmp = tempfile.TemporaryFile("w+", encoding="utf-8")
        self.image_id = self.annotation_id = 0
        info = {
            "description": f"autolabel export of {run.url()}",
            "date_created": utc_now(),
            "version": str((run.manifest.get("versions") or {}).get("autolabel")),
            "random_weights": bool(run.manifest.get("random_weights")),
        }
        cats = [{"id": cid + 1, "name": name, "supercategory": "object", "class_id": cid} for cid, name in sorted(categories.items())]
        self.out.write('{"info": ' + json.dumps(info) + ', "licenses": [], "categories": ' + json.dumps(cats) + ', "images": [')

    def add(self, image: ImageLabels) -> int:
        self.image_id += 1
        entry = {"id": self.image_id, "file_name": _local_name(image.uri), "width": image.width, "height": image.height,
                 "uri": image.uri, "autolabel_image_id": image.image_id}
        if image.video_uri is not None:  # a video frame: which video and frame (its annotations carry track_id)
            entry.update(video_uri=image.video_uri, frame_index=image.frame_index)
        self.out.write(("" if self.image_id == 1 else ", ") + json.dumps(entry))
        written = 0
        for obj in image.objects:
            if self.segmentation == "polygon":
                polys = mask_polygons(mask_codec.decode(obj["mask"]))
                segmentation = [[round(float(v), 2) for v in p.reshape(-1)] for p in polys]
            else:
                segmentation = {"size": [int(s) for s in obj["mask"]["size"]], "counts": obj["mask"]["counts"]}
            self.annotation_id += 1
            ann = {
                "id": self.annotation_id, "image_id": self.image_id, "category_id": int(obj["class_id"]) + 1,
                "segmentation": segmentation, "area": int(obj["area"]), "bbox": mask_codec.bbox_xywh(obj["mask"]), "iscrowd": 0,
                "score": _score(obj["det_score"]), "mask_score": _score(obj["mask_score"]),
                "object_id": int(obj["object_id"]),
                "det_box": [round(float(v), 2) for v in (obj["box"][0], obj["box"][1], obj["box"][2] - obj["box"][0], obj["box"][3] - obj["box"][1])],
                "source": obj.get("source"),
            }
            if obj.get("track_id") is not None:
                ann["track_id"] = int(obj["track_id"])
            for key in ("flags", "review"):  # QA reasons (runs that recorded them); review decision (after an import)
                if obj.get(key) is not None:
                    ann[key] = obj[key]
            self.tmp.write(("" if self.annotation_id == 1 else ", ") + json.dumps(ann))
            written += 1
        return written

    def abort(self) -> None:
        close_quietly(self.out, self.tmp)

    def close(self) -> list[str]:
        self.out.write('], "annotations": [')
        self.tmp.seek(0)
        shutil.copyfileobj(self.tmp, self.out, 1 << 20)
        self.out.write("]}\n")
        self.out.close()
        self.tmp.close()
        return [self.dest.full("instances.json")]
