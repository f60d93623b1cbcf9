"""YouTube-VIS JSON (``--format ytvis``): video instance segmentation, one annotation per track with
a COCO RLE, box and area per frame (null where the track has no mask), as the YouTube-VIS
datasets and their ``ytvos`` API (a pycocotools fork) read them.

``videos[].file_names`` are the frames' URIs (``VIDEO#frame=N``, as in the images table): the
frames are not extracted as image files. Each video's kept frames (``video.stride``) are its
``length`` frames, in order; ``frame_indices`` says which decoded frames they are.
"""
from __future__ import annotations

import json
from typing import Optional

from pipeline.outputs.export.destination import Destination
from pipeline.outputs.export.labels import utc_now
from pipeline.outputs.export.videos import VideoFrames, track_class
from pipeline.outputs.rundata import RunData
from pipeline.sam import masks as mask_codec


def _score(value) -> Optional[float]:
    return None if value is None else round(float(value), 6)


class YtvisWriter(VideoFrames):
    """``instances.json``: info, categories (class id + 1, as the COCO export), videos, annotations."""

    def __init__(self, dest: Destination, run: RunData, categories: dict[int, str]):
        super().__init__()
        self.dest, self.run, self.categories = dest, run, categories

    def abort(self) -> None:
        pass

    def close(self) -> list[str]:
        info = {"description": f"autolabel export of {self.run.url()} (YouTube-VIS)", "date_created": utc_now(),
                "version": str((self.run.manifest.get("versions") or {}).get("autolabel")),
                "random_weights": bool(self.run.manifest.get("random_weights"))}
        cats = [{"id": cid + 1, "name": name, "supercategory": "object", "class_id": cid} for cid, name in sorted(self.categories.items())]
        rows = self.run.video_rows()
        out = self.dest.open("instances.json", "w")
        try:
            out.write('{"info": ' + json.dumps(info) + ', "licenses": [], "categories": ' + json.dumps(cats) + ', "videos": [')
            annotations = []
            for video_id, video in enumerate(self.sorted_videos(), start=1):
                frames = video.frame_indices
                position = {f: i for i, f in enumerate(frames)}
                row = rows.get(video.uri) or {}
                entry = {"id": video_id, "width": video.width, "height": video.height, "length": len(frames),
                         "file_names": [video.frames[f] for f in frames], "frame_indices": frames, "uri": video.uri,
                         "fps": row.get("fps")}
                out.write(("" if video_id == 1 else ", ") + json.dumps(entry))
                for track_id in sorted(video.tracks):
                    by_frame = video.tracks[track_id]
                    segmentations, bboxes, areas = [None] * len(frames), [None] * len(frames), [None] * len(frames)
                    for frame, obj in by_frame.items():
                        i = position[frame]
                        segmentations[i] = {"size": [int(s) for s in obj["mask"]["size"]], "counts": obj["mask"]["counts"]}
                        bboxes[i] = mask_codec.bbox_xywh(obj["mask"])
                        areas[i] = int(obj["area"])
                    class_id, _ = track_class(by_frame.values())
                    scores = [o["mask_score"] for o in by_frame.values() if o["mask_score"] is not None]
                    annotations.append({
                        "video_id": video_id, "category_id": int(class_id) + 1, "segmentations": segmentations, "bboxes": bboxes,
                        "areas": areas, "iscrowd": 0, "length": 1, "width": video.width, "height": video.height,
                        "track_id": track_id, "score": _score(sum(scores) / len(scores)) if scores else None,
                    })
            out.write('], "annotations": [')
            for i, ann in enumerate(annotations, start=1):
                out.write(("" if i == 1 else ", ") + json.dumps({"id": i, **ann}))
            out.write("]}\n")
        finally:
            out.close()
        return [self.dest.full("instances.json")]

