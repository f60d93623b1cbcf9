"""A corpus of bad (and awkward but good) image files, built by the tests, with the row each must give.

``build_corpus(folder)`` writes the files and returns ``{relative name: Expect}``. Every failure
mode the decoder names is here for real: nothing is mocked. The good files cover the Pillow modes
and formats that need care (EXIF rotation, palette transparency, CMYK, 16-bit, 1-bit, animation).
"""
from __future__ import annotations

import io
import os
import struct
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class Expect:
    status: str  # ok | error
    error_class: Optional[str] = None
    note: Optional[str] = None
    size: Optional[tuple[int, int]] = None  # (width, height) for ok rows


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _gradient(w: int = 64, h: int = 48) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // w, y * 255 // h, (x + y) * 255 // (w + h)], axis=2).astype(np.uint8)


def _exif_rotated_jpeg() -> bytes:
    rgb = np.zeros((20, 40, 3), np.uint8)
    rgb[:, :20] = 255  # left half white; orientation 6 = rotate 90° clockwise to display
    exif = Image.Exif()
    exif[0x0112] = 6
    return _encode(Image.fromarray(rgb), "JPEG", exif=exif.tobytes())


def _animated_gif() -> bytes:
    frames = [Image.fromarray(np.full((24, 32, 3), v, np.uint8)) for v in (30, 120, 220)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buf.getvalue()


def _palette_transparent_png() -> bytes:
    img = Image.fromarray(_gradient()).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return _encode(img, "PNG", transparency=0)


def _png_with_corrupt_pixels() -> bytes:
    """Valid signature, header and checksums; the compressed pixel stream inside is garbage."""
    data = bytearray(_encode(Image.fromarray(_gradient()), "PNG"))
    idat = data.index(b"IDAT")
    length = struct.unpack(">I", data[idat - 4: idat])[0]
    body = b"\x78\x9c" + bytes((7 * i + 3) % 256 for i in range(length - 2))
    crc = struct.pack(">I", zlib.crc32(b"IDAT" + body) & 0xFFFFFFFF)
    return bytes(data[: idat + 4]) + body + crc + bytes(data[idat + 8 + length:])


def _png_bomb(width: int = 10_000, height: int = 10_000) -> bytes:
    """A real PNG of 100 M pixels (over Pillow's 89.5 M limit) that is only ~12 KB on disk."""
    raw = zlib.compress(b"\x00" * ((width + 7) // 8 + 1) * height, 9)  # 1-bit, filter byte 0 per row

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


def corpus_files(photos: dict[str, bytes]) -> dict[str, tuple[bytes, Expect]]:
    """name -> (bytes, expected row). ``photos`` are real photographs' files (labeled, and compared)."""
    grad = _gradient()
    jpeg = _encode(Image.fromarray(grad), "JPEG", quality=90)
    png = _encode(Image.fromarray(grad), "PNG")
    files: dict[str, tuple[bytes, Expect]] = {}
    for name, data in photos.items():
        with Image.open(io.BytesIO(data)) as img:
            files[name] = (data, Expect("ok", size=img.size))
    i16 = Image.fromarray((np.arange(48 * 64, dtype=np.uint16).reshape(48, 64) * 21).astype(np.uint16))
    good = {
        "modes/exif_rotated.jpg": (_exif_rotated_jpeg(), Expect("ok", size=(20, 40))),
        "modes/grey_L.png": (_encode(Image.fromarray(grad).convert("L"), "PNG"), Expect("ok", size=(64, 48))),
        "modes/grey_alpha_LA.png": (_encode(Image.fromarray(grad).convert("LA"), "PNG"), Expect("ok", size=(64, 48))),
        "modes/palette_transparent_P.png": (_palette_transparent_png(), Expect("ok", size=(64, 48))),
        "modes/rgba.png": (_encode(Image.fromarray(grad).convert("RGBA"), "PNG"), Expect("ok", size=(64, 48))),
        "modes/cmyk.jpg": (_encode(Image.fromarray(grad).convert("CMYK"), "JPEG"), Expect("ok", size=(64, 48))),
        "modes/sixteen_bit_I16.png": (_encode(i16, "PNG"), Expect("ok", size=(64, 48))),
        "modes/one_bit.png": (_encode(Image.fromarray(grad).convert("1"), "PNG"), Expect("ok", size=(64, 48))),
        "modes/animated.gif": (_animated_gif(), Expect("ok", note="animated: first of 3 frames", size=(32, 24))),
        "modes/plain.bmp": (_encode(Image.fromarray(grad), "BMP"), Expect("ok", size=(64, 48))),
        "modes/plain.tif": (_encode(Image.fromarray(grad), "TIFF"), Expect("ok", size=(64, 48))),
        "modes/plain.webp": (_encode(Image.fromarray(grad), "WEBP"), Expect("ok", size=(64, 48))),
    }
    bad = {
        "bad/zero_bytes.jpg": (b"", Expect("error", "decode_error")),
        "bad/truncated.jpg": (jpeg[: len(jpeg) // 2], Expect("error", "decode_error")),
        "bad/truncated.png": (png[: len(png) // 2], Expect("error", "decode_error")),
        "bad/text_named.jpg": (b"this is a text file, not a JPEG\n" * 20, Expect("error", "decode_error")),
        "bad/html_named.png": (b"<!doctype html><html><body>404 Not Found</body></html>", Expect("error", "decode_error")),
        "bad/random_bytes.webp": (np.random.default_rng(0).bytes(4096), Expect("error", "decode_error")),
        "bad/jpeg_header_only.jpg": (jpeg[:20], Expect("error", "decode_error")),
        "bad/png_corrupt_pixels.png": (_png_with_corrupt_pixels(), Expect("error", "decode_error")),
        "bad/gif_header_only.gif": (b"GIF89a\x10\x00\x10\x00", Expect("error", "decode_error")),
        "bad/bmp_garbage.bmp": (b"BM" + b"\x00" * 12 + b"\xff" * 40, Expect("error", "decode_error")),
        "bad/tiff_garbage.tif": (b"II*\x00\x08\x00\x00\x00" + b"\xff" * 32, Expect("error", "decode_error")),
        "bad/decompression_bomb.png": (_png_bomb(), Expect("error", "too_large")),
    }
    files.update(good)
    files.update(bad)
    return files


def build_folder(folder: Path, files: dict[str, tuple[bytes, Expect]]) -> dict[str, Expect]:
    """Write the corpus, plus a dangling symlink: listed like any file, gone when read (not_found)."""
    expected = {}
    for name, (data, expect) in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
        expected[name] = expect
    os.symlink(folder / "bad" / "deleted_after_listing.jpg", folder / "bad" / "vanished.jpg")
    expected["bad/vanished.jpg"] = Expect("error", "not_found")
    (folder / "bad" / "readme.txt").write_text("not listed: suffix not in input.extensions")
    return expected


def write_tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
