"""Synthetic, lossless video clips for the video tests: moving shapes written with PyAV.

Every frame is drawn here (``clip_frames``), so a test knows the exact RGB each decoded frame
must have, and where each shape is (``shape_boxes``). The bad inputs of the video reader are
made from good clips: cut short, stripped of their video, or with a codec FFmpeg does not know.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

# (colour, size (w, h), start (x, y), velocity (dx, dy) per frame); positions wrap in the frame.
SHAPES = (
    ((230, 40, 40), (0.30, 0.25), (0.10, 0.15), (0.020, 0.010)),
    ((40, 200, 60), (0.22, 0.30), (0.60, 0.55), (-0.015, -0.012)),
)


def shape_boxes(index: int, width: int, height: int) -> list[list[float]]:
    """Each shape's box (x0, y0, x1, y1, in pixels) on frame ``index``."""
    boxes = []
    for _, (sw, sh), (x, y), (dx, dy) in SHAPES:
        x0 = int(round(((x + dx * index) % (1 - sw)) * width))
        y0 = int(round(((y + dy * index) % (1 - sh)) * height))
        boxes.append([x0, y0, x0 + int(sw * width), y0 + int(sh * height)])
    return boxes


def clip_frames(n: int, width: int, height: int) -> np.ndarray:
    """(n, height, width, 3) uint8: a textured background (so the model sees edges everywhere)
    with the shapes drawn over it, moving a little each frame."""
    yy, xx = np.mgrid[0:height, 0:width]
    background = np.stack([(xx * 255 // max(width - 1, 1)), (yy * 255 // max(height - 1, 1)), ((xx // 8 + yy // 8) % 2) * 60 + 90], axis=-1)
    frames = np.empty((n, height, width, 3), np.uint8)
    for i in range(n):
        frame = background.astype(np.uint8).copy()
        for (colour, *_), (x0, y0, x1, y1) in zip(SHAPES, shape_boxes(i, width, height)):
            frame[int(y0):int(y1), int(x0):int(x1)] = colour
        frames[i] = frame
    return frames


def write_clip(path: Path, frames: np.ndarray, fps: int = 10, codec: Optional[str] = None, **container_options) -> Path:
    """Write ``frames`` losslessly: PNG frames for .mp4/.mov, FFV1 for .mkv."""
    import av

    path = Path(path)
    codec = codec or ("ffv1" if path.suffix == ".mkv" else "png")
    pix_fmt = {"png": "rgb24", "ffv1": "bgr0"}[codec]
    with av.open(str(path), "w", options=container_options or None) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = pix_fmt
        for rgb in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_audio_only(path: Path, with_empty_video: bool = False) -> Path:
    """Half a second of silence in Matroska; ``with_empty_video`` adds a video stream that never
    gets a frame (the ``no_frames`` case: the container plays, its video has nothing)."""
    import av

    with av.open(str(path), "w", format="matroska") as container:
        if with_empty_video:
            video = container.add_stream("ffv1", rate=10)
            video.width, video.height, video.pix_fmt = 64, 48, "bgr0"
        audio = container.add_stream("flac", rate=8000, layout="mono")
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 4000), np.int16), format="s16", layout="mono")
        frame.sample_rate, frame.pts = 8000, 0
        for packet in [*audio.encode(frame), *audio.encode()]:
            container.mux(packet)
    return Path(path)


def cut(path: Path, target: Path, share: float = 0.5) -> Path:
    data = Path(path).read_bytes()
    target.write_bytes(data[: int(len(data) * share)])
    return target


def unknown_codec(mkv: Path, target: Path) -> Path:
    """An FFV1 Matroska file whose codec id is renamed to one FFmpeg does not know."""
    data = Path(mkv).read_bytes()
    assert data.count(b"V_FFV1") == 1
    target.write_bytes(data.replace(b"V_FFV1", b"V_ZZZZ"))
    return target
