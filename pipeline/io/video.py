"""Video files -> RGB frames by streaming decode with PyAV (FFmpeg), never holding the video.

Frames come out one at a time, exactly as the decoder gives them (``to_ndarray(format="rgb24")``,
no JPEG round trip), each with its 0-based index among all decoded frames (counted before the
stride) and its presentation time. The file is read through an fsspec file object, so any URL
fsspec opens works and only the bytes the demuxer asks for are fetched.

A video that cannot be read raises ``VideoError`` with a named ``error_class`` (the ``videos``
table's): ``truncated`` (the file ends before its container says it does), ``no_video`` (no video
stream: audio only), ``no_frames`` (a video stream without a single frame), ``unknown_codec``
(FFmpeg has no decoder for it), ``decode_error`` (not a video, or undecodable), ``too_large``
(frames over the pixel limit), and ``not_found`` / ``permission_denied`` / ``read_error`` as for
images. A truncated file is often only found at its end: the frames before it were good and
were yielded, and the error comes where the data stops.
"""
from __future__ import annotations

import contextlib
import io
import os
import struct
from dataclasses import dataclass
from fractions import Fraction
from typing import IO, Iterator, NamedTuple, Optional, Union

import numpy as np

from pipeline.errors import ImageError
from pipeline.io.decode import DEFAULT_MAX_PIXELS

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi")
# Top-level boxes an ISO BMFF file (MP4, MOV) may start with: the ones the truncation check knows.
_BMFF_FIRST = {b"ftyp", b"moov", b"mdat", b"wide", b"free", b"skip", b"pnot"}

Source = Union[str, "os.PathLike[str]", bytes, IO[bytes]]  # a path or URL, the bytes, or an open file


class VideoError(ImageError):
    """A video that cannot be (fully) read; ``error_class`` names why."""


class VideoFrame(NamedTuple):
    index: int  # 0-based among all decoded frames of the file, before any stride
    time_s: float  # presentation time from the start of the stream
    rgb: np.ndarray  # HxWx3 uint8, the decoder's frame converted by FFmpeg to rgb24


@dataclass(frozen=True)
class VideoInfo:
    width: int
    height: int
    fps: Optional[float]  # average frame rate, None if the container does not say
    frames: Optional[int]  # frame count (see ``frames_exact``), None if unknown
    duration_s: Optional[float]
    codec: str
    frames_exact: bool  # True: from the container's count or counted; False: duration x fps


def probe(source: Source, storage_options: Optional[dict] = None, max_pixels: Optional[int] = None,
          count: bool = False) -> VideoInfo:
    """Size, rate, frame count and duration from the container, without decoding a frame.

    ``count=True`` demuxes every packet of the video stream to count the frames exactly (reads
    the whole file, decodes nothing) when the container does not store the count."""
    with _opened(source, storage_options, max_pixels) as (container, stream, fh):
        info = _info(container, stream)
        cut = _cut_short(fh)
        if cut:
            raise VideoError("truncated", cut)
        if count and not info.frames_exact:
            try:
                counted = sum(1 for packet in container.demux(stream) if packet.size)
            except Exception as exc:  # noqa: BLE001 - FFmpeg and file-object errors alike: a bad stream
                raise _read_failure(exc, decoded=1) from None
            info = VideoInfo(info.width, info.height, info.fps, counted, info.duration_s, info.codec, True)
        if info.frames == 0 and info.frames_exact:
            raise VideoError("no_frames", "the video stream has no frames")
        return info


def kept_count(frames: int, stride: int = 1, max_frames: Optional[int] = None, start: int = 0,
               stop: Optional[int] = None) -> int:
    """How many frames ``iter_frames`` yields from a video of ``frames`` decoded frames."""
    end = frames if stop is None else min(stop, frames)
    kept = len(range(start, max(end, start), stride))
    return kept if max_frames is None else min(kept, max_frames)


def iter_frames(source: Source, stride: int = 1, max_frames: Optional[int] = None, start: int = 0,
                stop: Optional[int] = None, max_pixels: Optional[int] = None,
                storage_options: Optional[dict] = None) -> Iterator[VideoFrame]:
    """Decoded frames ``start, start + stride, ...`` before ``stop``, at most ``max_frames`` of
    them. Frames before ``start`` are decoded and dropped (exact indices, no seeking)."""
    if stride < 1 or start < 0 or (max_frames is not None and max_frames < 0):
        raise ValueError(f"stride must be >= 1 and start, max_frames >= 0 (got {stride}, {start}, {max_frames})")
    if max_frames == 0 or (stop is not None and stop <= start):
        return
    limit = max_pixels or DEFAULT_MAX_PIXELS
    with _opened(source, storage_options, limit) as (container, stream, fh):
        info = _info(container, stream)
        base = stream.start_time or 0
        index, kept = -1, 0
        frames = container.decode(stream)
        while True:
            try:
                frame = next(frames, None)
            except Exception as exc:  # noqa: BLE001 - FFmpeg and file-object errors alike
                raise _read_failure(exc, decoded=index + 1, expected=info) from None
            if frame is None:
                break
            index += 1
            if index < start or (index - start) % stride:
                continue
            if frame.width * frame.height > limit:
                raise VideoError("too_large", f"frame {index} is {frame.width}x{frame.height} = {frame.width * frame.height} pixels, over the limit of {limit} (input.max_pixels)")
            time_s = float((frame.pts - base) * frame.time_base) if frame.pts is not None and frame.time_base else (index / info.fps if info.fps else 0.0)
            yield VideoFrame(index, time_s, frame.to_ndarray(format="rgb24"))
            kept += 1
            if (max_frames is not None and kept >= max_frames) or (stop is not None and index + stride >= stop):
                return
        cut = _cut_short(fh)
        if cut:
            raise VideoError("truncated", f"{cut}; {index + 1} good frames before it")
        if index < 0:
            raise VideoError("no_frames", "the video stream has no frames")
        if _short(index + 1, info):
            raise VideoError("truncated", f"the file ends after {index + 1} frames; its container says {info.frames}")


def _short(decoded: int, info: VideoInfo) -> bool:
    """Fewer frames than the container promises (a duration x fps estimate gets 1% and a frame of slack)."""
    if not info.frames:
        return False
    slack = 0 if info.frames_exact else max(1, round(0.01 * info.frames))
    return decoded < info.frames - slack


def _read_failure(exc: BaseException, decoded: int, expected: Optional[VideoInfo] = None) -> VideoError:
    """An error while demuxing or decoding: ``truncated`` after good frames, ``decode_error`` before."""
    import av

    if isinstance(exc, OSError) and not isinstance(exc, av.error.FFmpegError):
        return VideoError("read_error", f"{type(exc).__name__}: {exc}"[:300])
    if decoded and (expected is None or expected.frames is None or _short(decoded, expected)):
        return VideoError("truncated", f"the data stops after {decoded} good frames ({type(exc).__name__}: {exc})"[:300])
    return VideoError("decode_error", f"{type(exc).__name__}: {exc}"[:300])


@contextlib.contextmanager
def _file(source: Source, storage_options: Optional[dict]) -> Iterator[IO[bytes]]:
    if isinstance(source, (bytes, bytearray)):
        yield io.BytesIO(source)
        return
    if not isinstance(source, str) and hasattr(source, "read"):
        yield source  # the caller's file object: the caller closes it
        return
    import fsspec

    try:
        opened = fsspec.open(str(source), "rb", **(storage_options or {})).open()
    except FileNotFoundError:
        raise VideoError("not_found", "file disappeared or does not exist") from None
    except PermissionError as exc:
        raise VideoError("permission_denied", str(exc)[:300] or "permission denied") from None
    except Exception as exc:  # noqa: BLE001 - OSError, and what storage back-ends raise besides
        raise VideoError("read_error", f"{type(exc).__name__}: {exc}"[:300]) from None
    try:
        yield opened
    finally:
        opened.close()


@contextlib.contextmanager
def _opened(source: Source, storage_options: Optional[dict], max_pixels: Optional[int]):
    """(container, its first video stream), checked: a video stream with a known codec, within the
    pixel limit; every way the open fails turned into a VideoError of the right class."""
    import av

    with _file(source, storage_options) as fh:
        with contextlib.suppress(OSError, ValueError):
            if fh.seek(0, 2) == 0:
                raise VideoError("decode_error", "empty file (0 bytes)")
            fh.seek(0)
        try:
            container = av.open(fh, mode="r")
        except EOFError:  # av.error.EOFError too: the demuxer ran out of data reading the header
            raise VideoError("truncated", "the file ends inside its header") from None
        except av.error.FFmpegError as exc:
            cut = _cut_short(fh)
            raise VideoError("truncated" if cut else "decode_error", cut or f"not a readable video ({exc.strerror or exc})"[:300]) from None
        except OSError as exc:
            raise VideoError("read_error", f"{type(exc).__name__}: {exc}"[:300]) from None
        try:
            if not container.streams.video:
                kinds = sorted({s.type for s in container.streams}) or ["none"]
                raise VideoError("no_video", f"no video stream (streams: {', '.join(kinds)})")
            stream = container.streams.video[0]
            if stream.codec_context is None:
                raise VideoError("unknown_codec", "FFmpeg knows no decoder for the codec of this video stream")
            limit = max_pixels or DEFAULT_MAX_PIXELS
            width, height = stream.codec_context.width, stream.codec_context.height
            if width * height > limit:
                raise VideoError("too_large", f"{width}x{height} = {width * height} pixels, over the limit of {limit} (input.max_pixels)")
            stream.thread_type = "AUTO"  # frame and slice threads: same frames, decoded faster
            yield container, stream, fh
        finally:
            container.close()


def _info(container, stream) -> VideoInfo:
    ctx = stream.codec_context
    rate = stream.average_rate or stream.guessed_rate
    fps = float(rate) if rate else None
    if stream.duration is not None and stream.time_base:
        duration = float(stream.duration * stream.time_base)
    else:
        duration = container.duration / 1e6 if container.duration else None
    frames, exact = (stream.frames, True) if stream.frames else (None, False)
    if frames is None and duration and fps:
        frames = round(float(Fraction(duration).limit_denominator(1 << 20) * Fraction(rate)))
    return VideoInfo(ctx.width, ctx.height, fps, frames, duration, ctx.name, exact)


def _cut_short(fh) -> Optional[str]:
    """Why the file is cut short, from its container's own sizes (MP4/MOV boxes, the Matroska
    segment), or None when it is not (or its format is neither)."""
    try:
        was = fh.tell()  # the demuxer may still read from here: leave the position as found
    except (OSError, ValueError):
        return None
    try:
        size = fh.seek(0, 2)
        fh.seek(0)
        head = fh.read(64)
        if head[:4] == b"\x1a\x45\xdf\xa3":
            return _ebml_cut(head, size)
        return _bmff_cut(fh, size)
    except (OSError, ValueError):
        return None
    finally:
        with contextlib.suppress(OSError, ValueError):
            fh.seek(was)


def _ebml_cut(head: bytes, size: int) -> Optional[str]:
    """A Matroska/WebM file whose Segment (declared size, right after the EBML header) runs past the end."""
    try:
        header_len, pos = _vint(head, 4)
        pos += header_len
        if head[pos:pos + 4] != b"\x18\x53\x80\x67":
            return None
        segment_len, data_at = _vint(head, pos + 4)
    except IndexError:
        return None
    if segment_len is not None and data_at + segment_len > size:
        return f"the file ends inside its Matroska segment ({size} of {data_at + segment_len} bytes)"
    return None


def _vint(buf: bytes, pos: int) -> tuple[Optional[int], int]:
    """An EBML variable-length size at ``pos``: (value, or None for "unknown"; position after it)."""
    first = buf[pos]
    length = 9 - first.bit_length()
    if not 1 <= length <= 8:
        raise IndexError("not an EBML size")
    value = first & (0xFF >> length)
    for byte in buf[pos + 1:pos + length]:
        value = (value << 8) | byte
    if len(buf) < pos + length:
        raise IndexError("short EBML size")
    return (None if value == (1 << (7 * length)) - 1 else value), pos + length


def _bmff_cut(fh, size: int) -> Optional[str]:
    """Why an MP4/MOV is cut short (a top-level box runs past the end of the file, or the end
    comes before any ``moov``), or None when it is not an ISO BMFF file cut short."""
    try:
        pos, seen = 0, set()
        while pos + 8 <= size:
            fh.seek(pos)
            head = fh.read(16)
            box_size, kind = struct.unpack(">I4s", head[:8])
            if not seen and kind not in _BMFF_FIRST:
                return None
            if box_size == 1 and len(head) == 16:
                box_size = struct.unpack(">Q", head[8:16])[0]
            if box_size == 0:
                break  # the last box runs to the end of the file by definition
            if box_size < 8:
                return None
            seen.add(kind)
            if pos + box_size > size:
                return f"the file ends inside its '{kind.decode(errors='replace')}' box ({size} of {pos + box_size} bytes)"
            pos += box_size
        if seen and b"moov" not in seen:
            return f"the file ends ({size} bytes) before its 'moov' index"
    except (OSError, ValueError, struct.error):
        return None
    return None
