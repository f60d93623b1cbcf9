"""Label Studio tasks (``--format labelstudio``): one task per image with the masks as brush
predictions, and the project's labeling config; what ``autolabel review import`` reads back."""
from __future__ import annotations

import json
from typing import Optional

import pyarrow.compute as pc

from pipeline.outputs import labelstudio as ls
from pipeline.outputs.colors import class_color
from pipeline.outputs.columns import UNLABELED
from pipeline.outputs.export.destination import Destination
from pipeline.outputs.export.labels import ExportError, ExportResult, ImageLabels, close_quietly, package_version, utc_now
from pipeline.outputs.rundata import RunData
from pipeline.sam import masks as mask_codec


class LabelStudioWriter:
    """Label Studio: ``tasks.json`` (one task per image, the masks as ``brushlabels`` predictions) and
    ``labeling-config.xml`` (the project's labeling config: every class of the run as a brush label)."""

    def __init__(self, dest: Destination, run: RunData, classes: dict[int, str], urls: ls.ImageUrls, every_image: bool):
        import uuid

        self.dest, self.run, self.urls, self.every_image = dest, run, urls, every_image
        self.export_id = f"{utc_now()}-{uuid.uuid4().hex[:8]}"
        self.fingerprint = (run.manifest.get("fingerprint") or {}).get("sha256")  # which run: review import checks it
        models = run.manifest.get("models") or {}
        self.model_version = " ".join(filter(None, [
            f"autolabel {(run.manifest.get('versions') or {}).get('autolabel') or package_version() or ''}".strip(),
            f"SAM 2.1 {(models.get('sam') or {}).get('size')}" if (models.get("sam") or {}).get("size") else None,
            "(random weights)" if run.manifest.get("random_weights") else None,
        ]))
        names = list(dict.fromkeys(name for _, name in sorted(classes.items())))
        colors = {name: "#" + "".join(f"{int(round(c * 255)):02x}" for c in class_color(None if name == UNLABELED else cid))
                  for cid, name in classes.items()}
        self.config = ls.labeling_config(names, colors)
        self.out = dest.open("tasks.json", "w")
        self.out.write("[")
        self.tasks = 0
        self.video_frames = 0

    def skips(self, image: ImageLabels) -> bool:
        """With a filter, images left without objects make no task (nothing to review); without, every image
        does (a person may draw what the model missed). Video frames make none: Label Studio cannot show a
        frame inside a video file (``--format labelstudio-video`` exports the videos)."""
        if image.video_uri is not None:
            self.video_frames += 1
            return True
        return not image.objects and not self.every_image

    def add(self, image: ImageLabels) -> int:
        try:
            url = self.urls(image.uri)
        except ls.LabelStudioError as exc:
            raise ExportError(str(exc)) from None
        results = [ls.brush_result(obj["object_id"], mask_codec.decode(obj["mask"]), obj["class_name"], obj["mask_score"])
                   for obj in image.objects]
        note, reasons = ls.note_of(image.objects)
        task = {"data": {
            "image": url, ls.NOTE_KEY: note, ls.FLAGS_KEY: reasons,
            ls.DATA_KEY: {"format": ls.TASK_FORMAT_VERSION, "run": self.run.url(), "run_fingerprint": self.fingerprint, "export_id": self.export_id,
                          "image_id": image.image_id, "uri": image.uri, "width": image.width, "height": image.height,
                          "objects": {ls.result_id(o["object_id"]): int(o["object_id"]) for o in image.objects}},
        }, "predictions": []}
        if results:
            scores = [o["mask_score"] for o in image.objects if o["mask_score"] is not None]
            prediction = {"model_version": self.model_version, "result": results}
            if scores:
                prediction["score"] = round(float(min(scores)), 6)  # the least sure mask: sorting by it puts doubtful images first
            task["predictions"].append(prediction)
        self.out.write(("\n" if self.tasks == 0 else ",\n") + json.dumps(task, separators=(",", ":")))
        self.tasks += 1
        return len(results)

    def abort(self) -> None:
        close_quietly(self.out)

    def close(self) -> list[str]:
        self.out.write("\n]\n")
        self.out.close()
        return [self.dest.full("tasks.json"), self.dest.write("labeling-config.xml", self.config.encode())]


def labelstudio_urls(run: RunData, image_root: Optional[str], image_root_url: Optional[str], result: ExportResult,
                     uris: Optional[list[str]] = None) -> ls.ImageUrls:
    """How tasks point at the images (``ls.ImageUrls``); the default root is the folder holding every local image
    (every local file of ``uris``: the videos, for labelstudio-video)."""
    root = image_root
    if root is None:
        if uris is None:
            uris = run.dataset("images").to_table(columns=["uri"], filter=pc.field("status") == "ok").column("uri").to_pylist()
        root = ls.common_folder(uris)
    urls = ls.ImageUrls(root, image_root_url)
    if image_root_url is not None:
        result.notes.append(f"Label Studio: images under {root} are linked as {image_root_url}...")
    elif root is not None:
        result.notes.append(
            f"Label Studio: local images are linked as {ls.LOCAL_FILES_URL}<path under {root}>; start Label Studio with "
            f"LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT={root} and add a "
            f"'Local files' source storage with the absolute path {root} to the project (no need to sync it)")
    result.notes.append("Label Studio: create the project with labeling-config.xml as its labeling interface, then import tasks.json")
    return urls
