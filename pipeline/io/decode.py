"""Bytes and pixels: an image URI (or a tar shard's member) -> bytes, header facts, or RGB uint8
pixels with EXIF orientation applied; or an ``ImageError`` naming what went wrong.

Images travel between stages encoded (a full-HD JPEG is ~0.3 MB, its pixels 6.2 MB): the read
stage (stages/read.py) checks what the header tells (a known format, the size after EXIF
orientation, the pixel limit, animation) and each model actor decodes its own copy in a thread
pool (``ImageDecoder``) while the model works. Nothing here lets a bad image fail the job: every
failure is an ``ImageError`` (``error_class``, message), so the images table always gets exactly
one row per listed image; a file whose pixels turn out broken (truncated) becomes its error row
in the first actor that decodes it.
"""
from __future__ import annotations

import contextlib
import io
import struct
import sys
import tarfile
import time
import warnings
from typing import Iterator, Optional

import numpy as np
import pyarrow as pa
from fsspec.core import url_to_fs
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.errors import ImageError

EXIF_ORIENTATION = 0x0112
_TRANSPOSED = (5, 6, 7, 8)  # EXIF orientations that swap width and height
DEFAULT_MAX_PIXELS = Image.MAX_IMAGE_PIXELS  # Pillow's own decompression-bomb limit, 89,478,485
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def read_bytes(uri: str, storage_options: Optional[dict] = None) -> bytes:
    try:
        fs, path = url_to_fs(uri, **(storage_options or {}))
        return fs.cat_file(path)
    except FileNotFoundError:
        raise ImageError("not_found", "file disappeared or does not exist") from None
    except PermissionError as exc:
        raise ImageError("permission_denied", _short(exc, storage_options) or "permission denied") from None
    except Exception as exc:  # noqa: BLE001 - OSError, and what storage back-ends raise besides (botocore's NoCredentialsError)
        raise ImageError("read_error", f"{type(exc).__name__}: {_short(exc, storage_options)}") from None


def read_image_bytes(uri: str, storage_options: Optional[dict] = None) -> bytes:
    """The bytes behind an images-table ``uri``, including ``TAR_URI#member`` ones (the tar is
    streamed up to that member). For re-reading images after a run: reports, exports."""
    tar_uri, sep, member = uri.partition("#")
    if not sep or not tar_uri.lower().endswith(".tar"):
        return read_bytes(uri, storage_options)
    suffix = "." + member.rsplit(".", 1)[-1].lower() if "." in member else ""
    for found, payload in iter_tar_members(tar_uri, None, (suffix,), storage_options):
        if isinstance(payload, ImageError):
            raise payload
        if found == uri:
            return payload
    raise ImageError("not_found", f"{member} is not in {tar_uri}")


def open_image(data: bytes) -> Image.Image:
    """``PIL.Image.open`` as Pillow ships it.

    Importing ultralytics replaces ``PIL.Image.open`` with a wrapper that, on any unidentified
    file, tries to pip-install and import pi-heif (ModuleNotFoundError offline, a package install
    at run time online). A broken image must be a decode_error, so use the original opener.
    """
    patches = sys.modules.get("ultralytics.utils.patches")
    opener = getattr(patches, "_image_open", None) or Image.open
    return opener(io.BytesIO(data))


def decode_rgb(data: bytes, max_pixels: Optional[int] = None) -> np.ndarray:
    """Bytes -> HxWx3 uint8 RGB with EXIF orientation applied."""
    return decode_image(data, max_pixels)[0]


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB. Alpha is dropped (the colour under it is kept); 16-bit and 32-bit
    integer greyscale is scaled to 8 bits instead of clipped; palette transparency goes via RGBA."""
    if img.mode in _SIXTEEN_BIT:
        values = np.asarray(img, dtype=np.int64)
        top = 65535 if img.mode.startswith("I;16") or values.max(initial=0) <= 65535 else max(int(values.max()), 1)
        grey = (np.clip(values, 0, top) * 255 // top).astype(np.uint8)
        return Image.fromarray(np.repeat(grey[..., None], 3, axis=2))
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img if img.mode == "RGB" else img.convert("RGB")


@contextlib.contextmanager
def _opened(data: bytes, max_pixels: Optional[int]) -> Iterator[Image.Image]:
    """The image opened lazily (header read, no pixels yet), checked against the pixel limit,
    with every way Pillow can fail on it turned into an ImageError of the right class."""
    if not data:
        raise ImageError("decode_error", "empty file (0 bytes)")
    limit = max_pixels or DEFAULT_MAX_PIXELS
    saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, limit  # Pillow's own guard at the same limit
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with open_image(data) as img:
                if img.width * img.height > limit:
                    raise ImageError("too_large", f"{img.width}x{img.height} = {img.width * img.height} pixels, over the limit of {limit} (input.max_pixels)")
                yield img
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError("too_large", f"{str(exc).split(',')[0]} (input.max_pixels)") from None
    except UnidentifiedImageError:
        raise ImageError("decode_error", "not a recognised image format") from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, TypeError, ZeroDivisionError) as exc:
        raise ImageError("decode_error", f"{type(exc).__name__}: {exc}"[:300]) from None
    except MemoryError:
        raise ImageError("too_large", "out of memory while decoding") from None
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def oriented_rgb(img: Image.Image) -> np.ndarray:
    """A Pillow image -> HxWx3 uint8 RGB with EXIF orientation applied (``exif_transpose``
    copies) and any mode converted by ``_to_rgb``: what every decoded image goes through."""
    return np.asarray(_to_rgb(ImageOps.exif_transpose(img)))


def _animation_note(img: Image.Image) -> Optional[str]:
    frames = getattr(img, "n_frames", 1)
    return f"animated: first of {frames} frames" if frames > 1 else None


def decode_image(data: bytes, max_pixels: Optional[int] = None) -> tuple[np.ndarray, Optional[str]]:
    """Bytes -> (HxWx3 uint8 RGB with EXIF orientation applied, note or None).

    Animated images (GIF, APNG, WebP, multi-page TIFF) give their first frame, with a note.
    More than ``max_pixels`` pixels (default: Pillow's limit) is ``too_large``, checked from the
    header before any pixel is decoded.
    """
    with _opened(data, max_pixels) as img:
        note = _animation_note(img)
        img.seek(0)
        return oriented_rgb(img), note


def inspect_image(data: bytes, max_pixels: Optional[int] = None) -> tuple[int, int, Optional[str]]:
    """What the header says, without decoding pixels: (width, height) after EXIF orientation,
    and a note for animations. Raises ImageError as ``decode_image`` would for an empty file, an
    unknown format or too many pixels (broken pixel data is found only by decoding)."""
    with _opened(data, max_pixels) as img:
        width, height = img.size
        if img.getexif().get(EXIF_ORIENTATION) in _TRANSPOSED:
            width, height = height, width
        return width, height, _animation_note(img)


def error_text(exc: ImageError) -> str:
    """The images table's ``error`` value: ``"<error_class>: <message>"``."""
    return f"{exc.error_class}: {exc}"


def with_errors(batch: pa.Table, errors: dict[int, ImageError]) -> pa.Table:
    """Turn rows ``i`` of a stage's batch into error rows (status, error_class, error; width and
    height null, as every error row has them)."""
    if not errors:
        return batch
    values = {name: batch.column(name).to_pylist() for name in ("status", "error_class", "error", "width", "height")}
    for i, exc in errors.items():
        values["status"][i], values["error_class"][i], values["error"][i] = "error", exc.error_class, error_text(exc)
        values["width"][i] = values["height"][i] = None
    for name, column in values.items():
        typ = pa.int32() if name in ("width", "height") else pa.string()
        batch = batch.set_column(batch.schema.get_field_index(name), name, pa.array(column, typ))
    return batch


class ImageDecoder:
    """Decodes a batch's images in threads next to the model that needs them (Pillow releases the
    GIL while it decodes), so the pixels are ready when the model is; same decoding, EXIF and
    mode handling and error classes as ``decode_image``. ``ahead`` bounds the pixels held."""

    def __init__(self, threads: int = 4, max_pixels: Optional[int] = None):
        import threading
        from concurrent.futures import ThreadPoolExecutor

        self.pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="decode")
        self.max_pixels = max_pixels
        self._lock = threading.Lock()
        self._seconds = 0.0

    def _decode(self, data: bytes) -> np.ndarray:
        started = time.perf_counter()
        try:
            return decode_image(data, self.max_pixels)[0]
        finally:
            with self._lock:
                self._seconds += time.perf_counter() - started

    def submit(self, data: bytes):
        """A future of the HxWx3 RGB array; ``.result()`` raises ImageError for broken pixels."""
        return self.pool.submit(self._decode, data)

    def decode_rows(self, batch: pa.Table, wanted: list[int]) -> dict:
        """Row index -> future, for the rows in ``wanted`` (ok rows that need pixels)."""
        data = batch.column("data")
        return {i: self.submit(data[i].as_py()) for i in wanted}

    def ahead(self, batch: pa.Table, groups: list[list[int]], pixels: dict[int, int], budget) -> "DecodeAhead":
        """The rows of ``groups`` decoded in that order, ahead of the model, within ``budget``
        pixels (a number, or a ``PixelBudget`` shared by batches); ``groups`` as ``fit_groups`` cuts them."""
        return DecodeAhead(self, batch.column("data"), groups, pixels, budget)

    def take_seconds(self) -> float:
        """Thread seconds spent decoding since the last call (for the stage timings)."""
        with self._lock:
            seconds, self._seconds = self._seconds, 0.0
        return seconds


MP_PER_IMAGE = 12  # the default budget's image: a 12-MP photo (4032x3024, what phone cameras take)


def decode_budget(decode_ahead_mp: Optional[float], images_per_call: int) -> float:
    """Pixels an actor may hold decoded (``detector.decode_ahead_mp``, ``sam.decode_ahead_mp``);
    null: ``images_per_call`` 12-MP photos, so one Ray batch of photos up to 12 MP decodes whole,
    as it did before there was a budget, while an 89-MP image cannot multiply that by seven."""
    mp = decode_ahead_mp if decode_ahead_mp is not None else MP_PER_IMAGE * images_per_call
    return mp * 1e6


def fit_groups(rows: list[int], pixels: dict[int, int], limit: int, budget: float) -> list[list[int]]:
    """``rows`` in order, cut into groups of at most ``limit`` whose pixels together fit
    ``budget``; an image larger than the budget is a group of its own (every image runs)."""
    groups: list[list[int]] = []
    held = 0
    for i in rows:
        if groups and len(groups[-1]) < limit and held + pixels[i] <= budget:
            groups[-1].append(i)
            held += pixels[i]
        else:
            groups.append([i])
            held = pixels[i]
    return groups


class PixelBudget:
    """Pixels an actor may hold decoded, shared by the batches in its hands at once (the segment
    actor's two calls: one on the device, the next decoding ahead): a row starts decoding when
    its pixels fit beside everything held, or when nothing is held (an image larger than the
    budget still runs, alone). Releases by one batch let the others' rows start."""

    def __init__(self, pixels: float):
        import threading

        self.pixels = pixels
        self.held = 0
        self.peak = 0  # the most pixels held at once (for tests)
        self.lock = threading.RLock()
        self.waiting: list["DecodeAhead"] = []  # batches with rows not started yet, oldest first

    def fits(self, pixels: int) -> bool:
        return not self.held or self.held + pixels <= self.pixels

    def release(self, pixels: int) -> None:
        with self.lock:
            self.held -= pixels
            for ahead in list(self.waiting):
                ahead._fill()


class DecodeAhead:
    """One batch's images decoded ahead of the model, bounded in pixels, not images.

    Rows are decoded in the order of their groups while the pixels held (decoding, decoded, or
    in the model's hands until ``release``) fit the budget (a number, or a ``PixelBudget`` shared
    with other batches); the next row always starts when nothing is held, so an image over the
    budget still runs, alone. ``pop(i)`` hands over row ``i``'s future; ``release(group)`` gives
    the group's pixels back once the model is done with them, and more rows start decoding. The
    groups come from ``fit_groups``, so each fits the budget once the groups before it are
    released.
    """

    def __init__(self, decoder: ImageDecoder, data: pa.ChunkedArray, groups: list[list[int]], pixels: dict[int, int],
                 budget):
        self.decoder, self.data, self.pixels = decoder, data, pixels
        self.budget = budget if isinstance(budget, PixelBudget) else PixelBudget(budget)
        self.order = [i for group in groups for i in group]
        self.groups = groups
        self.futures: dict = {}
        self.started = 0  # rows of ``order`` submitted so far
        self.held = 0  # this batch's pixels submitted and not yet released
        self.peak = 0  # the most pixels held at once (for tests)
        with self.budget.lock:
            self.budget.waiting.append(self)
            self._fill()

    def _fill(self) -> None:
        with self.budget.lock:
            if self.budget.waiting and self.budget.waiting[0] is not self:
                return  # first come, first served: an earlier batch's rows start first (it is on the device first)
            while self.started < len(self.order):
                i = self.order[self.started]
                if not self.budget.fits(self.pixels[i]):
                    return
                self.futures[i] = self.decoder.submit(self.data[i].as_py())
                self.budget.held += self.pixels[i]
                self.held += self.pixels[i]
                self.peak = max(self.peak, self.budget.held)
                self.budget.peak = max(self.budget.peak, self.budget.held)
                self.started += 1
            if self in self.budget.waiting:
                self.budget.waiting.remove(self)

    def pop(self, i: int):
        """Row ``i``'s future (``.result()``: pixels, or ImageError); its group must be next."""
        with self.budget.lock:
            if i not in self.futures:
                raise RuntimeError(f"row {i} is not decoding: a group before it was not released")
            return self.futures.pop(i)

    def release(self, group: list[int]) -> None:
        """The model is done with these rows' pixels: their budget goes to the rows after them
        (and to other batches sharing it)."""
        pixels = sum(self.pixels[i] for i in group)
        with self.budget.lock:
            self.held -= pixels
            self.budget.release(pixels)

    def close(self) -> None:
        """This batch is over (or failed): no more of its rows start, and what it still held goes
        back to the budget."""
        with self.budget.lock:
            self.started = len(self.order)
            if self in self.budget.waiting:
                self.budget.waiting.remove(self)
            held, self.held = self.held, 0
            self.budget.release(held)


def pixels_or_error(future, expected: tuple[int, int]):
    """The decoded image, or the ImageError its row gets; pixels must have the header's size."""
    try:
        rgb = future.result()
    except ImageError as exc:
        return exc
    if rgb.shape[:2] != expected:
        return ImageError("decode_error", f"decoded {rgb.shape[1]}x{rgb.shape[0]}, the header said {expected[1]}x{expected[0]}")
    return rgb


class _BrokenTar(tarfile.ReadError):
    pass


class _StrictTarInfo(tarfile.TarInfo):
    """tarfile ends a stream quietly at a cut-off or garbled header after the first member; a
    shard that breaks off between members must be reported, not read as if it were complete."""

    @classmethod
    def frombuf(cls, buf, encoding, errors):
        try:
            return super().frombuf(buf, encoding, errors)
        except (tarfile.TruncatedHeaderError, tarfile.InvalidHeaderError) as exc:
            if bytes(buf).strip(b"\0"):
                raise _BrokenTar(f"bad header: {exc}") from None
            raise


def iter_tar_members(
    tar_uri: str, data: Optional[bytes], extensions: tuple[str, ...], storage_options: Optional[dict] = None,
) -> Iterator[tuple[str, "bytes | ImageError"]]:
    """Stream a tar (WebDataset style) and yield ``(TAR_URI#member/name.jpg, bytes)`` per image member.

    Nothing is unpacked to disk, and only one member's bytes are held at a time. Members whose
    name does not end in one of ``extensions`` (a WebDataset's .json/.cls/.txt siblings) and
    directories are skipped. A tar that cannot be opened yields one error for ``tar_uri``; a tar
    that breaks off mid-member yields an error for that member (and, if more is lost after it,
    one for the tar itself), so nothing is dropped silently.
    """
    wanted = tuple(e.lower() for e in extensions)
    try:
        if data is not None:
            fh = io.BytesIO(data)
        else:
            fs, path = url_to_fs(tar_uri, **(storage_options or {}))
            fh = fs.open(path, "rb")
    except FileNotFoundError:
        yield tar_uri, ImageError("not_found", "tar shard disappeared or does not exist")
        return
    except PermissionError as exc:
        yield tar_uri, ImageError("permission_denied", _short(exc, storage_options) or "permission denied")
        return
    except Exception as exc:  # noqa: BLE001 - as in read_bytes
        yield tar_uri, ImageError("read_error", f"{type(exc).__name__}: {_short(exc, storage_options)}")
        return
    current = None
    yielded = 0
    try:
        with fh, tarfile.open(fileobj=fh, mode="r|*", tarinfo=_StrictTarInfo) as tf:
            for member in tf:
                tf.members = []  # a stream keeps every TarInfo it has seen; keep memory flat for big shards
                name = member.name
                base = name.rsplit("/", 1)[-1]
                if not member.isfile() or base.startswith(".") or not name.lower().endswith(wanted):
                    continue
                current = f"{tar_uri}#{name}"
                payload = tf.extractfile(member).read()
                if len(payload) != member.size:
                    raise tarfile.ReadError("unexpected end of data")
                yield current, payload
                yielded += 1
                current = None
    except FileNotFoundError:
        yield tar_uri, ImageError("not_found", "tar shard disappeared or does not exist")
    except PermissionError as exc:
        yield tar_uri, ImageError("permission_denied", _short(exc, storage_options) or "permission denied")
    except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
        reason = f"{'ReadError' if isinstance(exc, tarfile.ReadError) else type(exc).__name__}: {_short(exc, storage_options)}"
        if current is not None:
            yield current, ImageError("read_error", f"tar member cut short ({reason})")
        else:
            where = "" if yielded == 0 else f" after {yielded} members"
            yield tar_uri, ImageError("read_error", f"tar shard unreadable{where} ({reason})")


def _short(exc: BaseException, storage_options: Optional[dict] = None) -> str:
    """An exception's text for an error row: the first 300 characters, without credentials (those
    inside URIs, and the values of the storage options the read used)."""
    from pipeline.io.credentials import redact, redact_text

    return redact(redact_text(str(exc)), storage_options)[:300]
