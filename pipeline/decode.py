"""Read and decode: image URI -> RGB uint8 pixels, or a named error that becomes an error row.

Nothing here raises for a bad image: every failure is turned into ``(error_class, message)``
so the images table always gets exactly one row per listed image.
"""
from __future__ import annotations

import io
import warnings
from typing import Optional

import numpy as np
import pyarrow as pa
from fsspec.core import url_to_fs
from PIL import Image, ImageOps, UnidentifiedImageError

# Decoded images travel between stages as raw RGB bytes plus width/height: plain Arrow, no
# tensor extension types, and an error row is simply empty bytes.
IMAGE_COLUMNS = [
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("status", pa.string()),
    ("error_class", pa.string()),
    ("error", pa.string()),
    ("pixels", pa.large_binary()),
]


class ImageError(Exception):
    def __init__(self, error_class: str, message: str):
        super().__init__(message)
        self.error_class = error_class


def read_bytes(uri: str, storage_options: Optional[dict] = None) -> bytes:
    try:
        fs, path = url_to_fs(uri, **(storage_options or {}))
        return fs.cat_file(path)
    except FileNotFoundError:
        raise ImageError("not_found", "file disappeared or does not exist") from None
    except PermissionError as exc:
        raise ImageError("permission_denied", str(exc) or "permission denied") from None
    except (OSError, ValueError) as exc:
        raise ImageError("read_error", f"{type(exc).__name__}: {exc}") from None


def decode_rgb(data: bytes) -> np.ndarray:
    """Bytes -> HxWx3 uint8 RGB with EXIF orientation applied."""
    if not data:
        raise ImageError("decode_error", "empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                img = ImageOps.exif_transpose(img)
                return np.asarray(img.convert("RGB"))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError("too_large", str(exc)) from None
    except UnidentifiedImageError:
        raise ImageError("decode_error", "not a recognised image format") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError("decode_error", f"{type(exc).__name__}: {exc}") from None


def pixels_of(row_pixels: bytes, width: int, height: int) -> np.ndarray:
    return np.frombuffer(row_pixels, dtype=np.uint8).reshape(height, width, 3)


def decode_batch(batch: pa.Table, storage_options: Optional[dict] = None) -> pa.Table:
    """Ray map_batches function: shard rows (uri, optional data) -> decoded image rows."""
    out = {name: [] for name, _ in IMAGE_COLUMNS}
    uris = batch.column("uri").to_pylist()
    carried = batch.column("data").to_pylist() if "data" in batch.column_names else [None] * len(uris)
    for uri, data in zip(uris, carried):
        try:
            rgb = decode_rgb(data if data is not None else read_bytes(uri, storage_options))
        except ImageError as exc:
            values = (None, None, "error", exc.error_class, f"{exc.error_class}: {exc}", b"")
        else:
            h, w = rgb.shape[:2]
            values = (w, h, "ok", None, None, rgb.tobytes())
        for (name, _), value in zip(IMAGE_COLUMNS, values):
            out[name].append(value)
    table = batch.drop_columns([c for c in ("data",) if c in batch.column_names])
    for name, typ in IMAGE_COLUMNS:
        table = table.append_column(pa.field(name, typ), pa.array(out[name], type=typ))
    return table
