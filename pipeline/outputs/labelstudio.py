"""Label Studio's formats, without Label Studio: brush RLE, tasks with predictions, labeling config.

**Brush RLE.** Label Studio stores a brush region (``type: brushlabels``, ``value.format: "rle"``)
as the RGBA bitmap of the image, ``[height, width, 4]`` bytes in row-major order, packed with
thi.ng's ``rle-pack`` bit stream: a 32-bit count of values, the word size minus one (5 bits, 8 for
bytes), four run-length field widths minus one (4 bits each: 3, 4, 8, 16), then per run a bit
(1 = a repeated value, 0 = literal values), a 2-bit index into the widths, the length minus one
in that many bits, and the value(s). The list of bytes goes into ``value.rle``. A mask pixel is
255 in all four channels, background 0 (as Label Studio's own ``mask2rle`` writes them); reading,
a pixel belongs to the mask when its alpha byte is at least 128.

``rle_encode`` writes exactly the bytes of Label Studio's converter (``label_studio_converter.brush
.encode_rle``, which the tests compare against, byte for byte), trailing padding included: a run
of one value is a literal, runs up to 8, 16 and 256 values use the 3-, 4- and 8-bit length
fields, longer runs are cut into pieces of 65,536 with the 16-bit field. It is vectorised with
numpy (one full-HD mask in milliseconds). ``rle_decode`` reads any valid stream (also literal
runs, which Label Studio's browser encoder writes).

**Tasks.** One task per image: ``data.image`` (a URL Label Studio can load, see ``ImageUrls``),
``data.autolabel`` (which run, image and objects the task holds: what ``autolabel review import``
reads back), ``data.autolabel_note`` / ``data.autolabel_flags`` (the QA reasons, shown above the
image and as Data Manager columns), and one prediction whose ``result`` has a ``brushlabels``
region per object, ``id`` = ``o<object_id>``.
"""
from __future__ import annotations

import os
from typing import Iterable, Optional
from urllib.parse import quote
from xml.sax.saxutils import quoteattr

import numpy as np

FROM_NAME = "label"  # the BrushLabels tag of the labeling config
TO_NAME = "image"  # the Image tag
RESULT_PREFIX = "o"  # result id of object k: "o<k>"
DATA_KEY = "autolabel"  # task data key with the run/image/object ids
NOTE_KEY = "autolabel_note"
FLAGS_KEY = "autolabel_flags"
LOCAL_FILES_URL = "/data/local-files/?d="  # Label Studio's local-files endpoint (LABEL_STUDIO_LOCAL_FILES_*)
TASK_FORMAT_VERSION = 1

_WORD_BITS = 8
_RLE_SIZES = (3, 4, 8, 16)
_MAX_PIECE = 1 << 16


class LabelStudioError(ValueError):
    """Input that is not what Label Studio writes (a malformed RLE, a task without our ids)."""


# ----------------------------------------------------------------------------------- brush RLE


def rle_encode(mask: np.ndarray) -> list[int]:
    """(h, w) bool mask -> Label Studio brush RLE bytes (``value.rle``), as Label Studio's converter writes them."""
    flat = np.asarray(mask, dtype=bool).reshape(-1)
    if flat.size == 0:
        raise ValueError("an empty image has no brush RLE")
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    starts = np.concatenate([[0], change])
    lengths = np.diff(np.concatenate([starts, [flat.size]])).astype(np.int64) * 4  # 4 equal bytes (RGBA) per pixel
    values = flat[starts].astype(np.int64) * 255
    # A run of more than 256 values is written as pieces of 65,536 and a rest, all with the 16-bit field.
    long_run = lengths > 256
    full = np.where(long_run, (lengths - 1) // _MAX_PIECE, 0)
    pieces = full + 1
    run_of_piece = np.repeat(np.arange(len(lengths)), pieces)
    first_piece = np.cumsum(pieces) - pieces
    nth = np.arange(len(run_of_piece)) - first_piece[run_of_piece]
    piece_len = np.where(nth < full[run_of_piece], _MAX_PIECE, lengths[run_of_piece] - full[run_of_piece] * _MAX_PIECE)
    run_len = lengths[run_of_piece]
    index = np.select([run_len <= 8, run_len <= 16, run_len <= 256], [0, 1, 2], 3)
    width = np.array(_RLE_SIZES)[index]
    repeated = (run_len > 1).astype(np.int64)  # a single value is a literal run of one
    field_values = np.stack([repeated, index, piece_len - 1, values[run_of_piece]], 1).reshape(-1)
    field_widths = np.stack([np.ones_like(width), np.full_like(width, 2), width, np.full_like(width, _WORD_BITS)], 1).reshape(-1)
    header_values = [flat.size * 4, _WORD_BITS - 1, *(s - 1 for s in _RLE_SIZES)]
    header_widths = [32, 5, 4, 4, 4, 4]
    field_values = np.concatenate([np.array(header_values, np.int64), field_values])
    field_widths = np.concatenate([np.array(header_widths, np.int64), field_widths])
    bits = _to_bits(field_values, field_widths)
    pad = 8 - len(bits) % 8  # as the converter does: 1 to 8 zero bits (a whole zero byte when already aligned)
    bits = np.concatenate([bits, np.zeros(pad, np.uint8)])
    return np.packbits(bits).tolist()


def _to_bits(values: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """Each value written MSB first in its width, concatenated: a uint8 array of 0/1."""
    total = int(widths.sum())
    field_of_bit = np.repeat(np.arange(len(widths)), widths)
    offset = np.arange(total) - np.repeat(np.cumsum(widths) - widths, widths)
    shift = widths[field_of_bit] - 1 - offset
    return ((values[field_of_bit] >> shift) & 1).astype(np.uint8)


def rle_decode_values(rle: Iterable[int]) -> np.ndarray:
    """Label Studio brush RLE bytes -> the decoded values (uint8/16/32, length as the header says)."""
    data = np.asarray(list(rle), dtype=np.int64)
    if data.size < 6 or data.min() < 0 or data.max() > 255:
        raise LabelStudioError("not a Label Studio brush RLE (it must be a list of byte values with a 6-byte header)")
    bits = np.unpackbits(data.astype(np.uint8))
    n_bits = len(bits)
    pos = 0

    def read(n: int) -> int:
        nonlocal pos
        if pos + n > n_bits:
            raise LabelStudioError("brush RLE ends in the middle of a run")
        chunk = bits[pos:pos + n]
        pos += n
        return int(chunk.dot(1 << np.arange(n - 1, -1, -1, dtype=np.int64))) if n else 0

    num = read(32)
    word = read(5) + 1
    sizes = [read(4) + 1 for _ in range(4)]
    dtype = np.uint8 if word < 9 else np.uint16 if word < 17 else np.uint32
    values, lengths = [], []
    i = 0
    weights = 1 << np.arange(word - 1, -1, -1, dtype=np.int64)
    while i < num:
        repeated = read(1)
        count = 1 + read(sizes[read(2)])
        count = min(count, num - i)
        if repeated:
            values.append(np.array([read(word)], np.int64))
            lengths.append(np.array([count], np.int64))
        else:
            if pos + count * word > n_bits:
                raise LabelStudioError("brush RLE ends in the middle of a run")
            block = bits[pos:pos + count * word].reshape(count, word).astype(np.int64).dot(weights)
            pos += count * word
            values.append(block)
            lengths.append(np.ones(count, np.int64))
        i += count
    if not values:
        return np.zeros(0, dtype)
    return np.repeat(np.concatenate(values), np.concatenate(lengths)).astype(dtype)


def rle_decode(rle: Iterable[int], height: int, width: int) -> np.ndarray:
    """Label Studio brush RLE -> (height, width) bool mask: the pixels whose alpha byte is >= 128."""
    values = rle_decode_values(rle)
    if values.size != height * width * 4:
        raise LabelStudioError(f"brush RLE holds {values.size} values, an RGBA image of {width}x{height} needs {height * width * 4}")
    return values.reshape(height, width, 4)[:, :, 3] >= 128


# ----------------------------------------------------------------------------------- image URLs


class ImageUrls:
    """``data.image`` for an images-table URI.

    - ``root_url`` given: URIs under ``root`` become ``root_url`` + their path below it (URL-quoted),
      e.g. ``--image-root /data/photos --image-root-url http://files:8081/photos``.
    - otherwise local files become ``/data/local-files/?d=<path below root>``: Label Studio serves them
      when started with ``LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true`` and
      ``LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT=<root>`` and a Local Files storage under ``root`` is
      added to the project; ``root`` defaults to the deepest folder holding all the run's local images.
    - other URIs stay as they are: ``http(s)://`` loads directly, ``s3://``, ``gs://`` and
      ``azure-blob://`` once the project has a cloud storage for that bucket (Label Studio presigns them).
    Members of tar shards (``TAR#member``) cannot be loaded by Label Studio; they are counted.
    """

    def __init__(self, root: Optional[str], root_url: Optional[str]):
        self.root = None if root is None else _strip_file(root).rstrip("/") or "/"
        self.root_url = root_url
        self.tar_members = 0
        self.as_is: dict[str, int] = {}  # URI schemes passed on unchanged -> how many tasks (s3, gs, http, ...)

    def __call__(self, uri: str) -> str:
        if "#" in uri:
            self.tar_members += 1
            return uri
        if self.root_url is not None:
            path = _strip_file(uri)
            if self.root is None or not (path == self.root or path.startswith(self.root.rstrip("/") + "/")):
                raise LabelStudioError(f"{uri} is not under --image-root {self.root}; choose an --image-root that holds every image")
            return _join_url(self.root_url, path[len(self.root.rstrip("/")):].lstrip("/"))
        if not _is_local(uri):
            scheme = uri.split("://", 1)[0]
            self.as_is[scheme] = self.as_is.get(scheme, 0) + 1
            return uri
        path = _strip_file(uri)
        root = self.root or "/"
        if not (path.startswith(root.rstrip("/") + "/")):
            raise LabelStudioError(f"{uri} is not under --image-root {root}; choose an --image-root that holds every image")
        return LOCAL_FILES_URL + quote(os.path.relpath(path, root), safe="/")


def _is_local(uri: str) -> bool:
    return uri.startswith("file://") or "://" not in uri


def _strip_file(uri: str) -> str:
    return uri[len("file://"):] if uri.startswith("file://") else uri


def _join_url(base: str, rest: str) -> str:
    rest = quote(rest, safe="/")
    return base + rest if base.endswith(("/", "=")) else f"{base}/{rest}"


def common_folder(uris: Iterable[str]) -> Optional[str]:
    """The deepest folder holding every local file among ``uris`` (None when there is none)."""
    folders = {os.path.dirname(_strip_file(u)) for u in uris if _is_local(u) and "#" not in u}
    if not folders:
        return None
    return os.path.commonpath(sorted(folders))


# ----------------------------------------------------------------------------------- tasks


def result_id(object_id: int) -> str:
    return f"{RESULT_PREFIX}{int(object_id)}"


def labeling_config(class_names: Iterable[str], colors: Optional[dict[str, str]] = None) -> str:
    """The labeling config (XML) the tasks are made for: the image, one BrushLabels label per class,
    and the QA note above it."""
    labels = "\n".join(
        f"    <Label value={quoteattr(name)}" + (f" background={quoteattr(colors[name])}" if colors and name in colors else "") + "/>"
        for name in class_names
    )
    return (
        "<View>\n"
        f"  <Header value=\"${NOTE_KEY}\"/>\n"
        f"  <Image name=\"{TO_NAME}\" value=\"$image\" zoom=\"true\" zoomControl=\"true\"/>\n"
        f"  <BrushLabels name=\"{FROM_NAME}\" toName=\"{TO_NAME}\">\n{labels}\n  </BrushLabels>\n"
        "</View>\n"
    )


def brush_result(object_id: int, mask: np.ndarray, label: str, score: Optional[float]) -> dict:
    """One ``brushlabels`` region of a prediction."""
    h, w = mask.shape
    result = {
        "id": result_id(object_id), "from_name": FROM_NAME, "to_name": TO_NAME, "type": "brushlabels",
        "original_width": int(w), "original_height": int(h), "image_rotation": 0,
        "value": {"format": "rle", "rle": rle_encode(mask), "brushlabels": [label]},
    }
    if score is not None:
        result["score"] = round(float(score), 6)
    return result


def note_of(objects: list[dict]) -> tuple[str, str]:
    """(note shown above the image, sorted distinct reasons) for a task's objects."""
    parts, reasons = [], set()
    for obj in objects:
        flags = obj.get("flags") or []
        if flags:
            reasons.update(flags)
            parts.append(f"{result_id(obj['object_id'])} {obj['class_name']}: {', '.join(flags)}")
    if not parts:
        return (f"{len(objects)} objects, none flagged" if objects else "no objects: draw any the model missed"), ""
    return f"flagged: {'; '.join(parts)}", ",".join(sorted(reasons))
