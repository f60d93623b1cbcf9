"""MOT Challenge text (``--format mot``): one ``NAME.txt`` per video with a line per track per frame,
``frame,id,bb_left,bb_top,bb_width,bb_height,conf,-1,-1,-1``, as trackers write their results for
TrackEval and py-motmetrics; ``sequences.json`` says which video each NAME is and the class of
each track id (MOT lines have no class).

- ``frame`` is 1-based, counted in decoded frames (the decoded frame index + 1), so it matches the
  video's own numbering whatever ``video.stride`` kept;
- the box is the mask's tight box in pixels, 0-based (the top-left pixel is 0,0), as ByteTrack
  and most trackers write it;
- ``conf`` is the mask's score (SAM 2's object score on that frame).
"""
from __future__ import annotations

import json

from pipeline.outputs.export.destination import Destination
from pipeline.outputs.export.videos import VideoFrames, track_class
from pipeline.outputs.rundata import RunData


def _num(value: float) -> str:
    """A number as MOT files write it: integers bare, others with up to 2 decimals."""
    value = float(value)
    return str(int(value)) if value.is_integer() else f"{value:.2f}".rstrip("0").rstrip(".")


class MotWriter(VideoFrames):
    """``NAME.txt`` per video (MOT results), ``sequences.json`` (the videos and their tracks' classes)."""

    def __init__(self, dest: Destination, run: RunData):
        super().__init__()
        self.dest, self.run = dest, run

    def abort(self) -> None:
        pass

    def close(self) -> list[str]:
        rows = self.run.video_rows()
        files, sequences = [], []
        for video in self.sorted_videos():
            lines = []
            for frame in video.frame_indices:
                for track_id in sorted(video.tracks):
                    obj = video.tracks[track_id].get(frame)
                    if obj is None:
                        continue
                    x0, y0, x1, y1 = (float(v) for v in obj["box"])
                    conf = 1.0 if obj["mask_score"] is None else float(obj["mask_score"])
                    lines.append(f"{frame + 1},{track_id},{_num(x0)},{_num(y0)},{_num(x1 - x0)},{_num(y1 - y0)},{conf:.6f},-1,-1,-1")
            files.append(self.dest.write(f"{video.name}.txt", ("\n".join(lines) + "\n" if lines else "").encode()))
            row = rows.get(video.uri) or {}
            sequences.append({
                "name": video.name, "uri": video.uri, "width": video.width, "height": video.height, "fps": row.get("fps"),
                "frames": row.get("frames"), "exported_frames": len(video.frames), "first_frame": video.frame_indices[0] + 1,
                "last_frame": video.frame_indices[-1] + 1,
                "tracks": {str(t): dict(zip(("class_id", "class_name"), track_class(video.tracks[t].values()))) for t in sorted(video.tracks)},
            })
        files.append(self.dest.write("sequences.json", json.dumps({"format": "MOT Challenge results (frame,id,bb_left,bb_top,"
                                                                          "bb_width,bb_height,conf,-1,-1,-1; frames 1-based)",
                                                                "run": self.run.url(), "sequences": sequences}, indent=1).encode()))
        return files
