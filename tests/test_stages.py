"""Stage functions on their own: listing, decoding, RLE, the sink's table split, SAM dtypes."""
from __future__ import annotations

import io

import fsspec
import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from conftest import SAM_IMAGE_SIZE
from pipeline.config import IMAGE_EXTENSIONS, SamConfig
from pipeline.errors import ImageError
from pipeline.io.decode import decode_rgb, read_bytes
from pipeline.io.listing import SourceError, WorkItem, image_id_for, iter_image_uris
from pipeline.io.shards import write_shards
from pipeline.run.sink import split_tables
from pipeline.sam import masks as mask_codec
from pipeline.stages.read import read_batch


def _jpeg(rgb: np.ndarray, **save) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", **save)
    return buf.getvalue()


def test_listing_recursive_glob_single_file(tmp_path):
    for rel in ("a.jpg", "b.PNG", "sub/c.jpeg", "sub/deeper/d.webp", "skip.txt", ".hidden.jpg"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    listed = list(iter_image_uris(str(tmp_path), list(IMAGE_EXTENSIONS)))
    assert [u.split(str(tmp_path))[1] for u in listed] == ["/a.jpg", "/b.PNG", "/sub/c.jpeg", "/sub/deeper/d.webp"]
    assert all(u.startswith("file://") for u in listed)
    assert list(iter_image_uris(f"file://{tmp_path}/sub/*.jpeg", [".jpeg"])) == [f"file://{tmp_path}/sub/c.jpeg"]
    assert list(iter_image_uris(str(tmp_path / "skip.txt"), [".jpg"])) == [f"file://{tmp_path}/skip.txt"]
    with pytest.raises(SourceError, match="nothing found"):
        list(iter_image_uris(str(tmp_path / "missing"), [".jpg"]))


def test_hidden_folders_are_not_listed(tmp_path):
    """Hidden files and everything under hidden folders (.git/, .thumbnails/) are skipped, in a
    walk and in a glob; a glob that names a hidden folder itself still lists it."""
    for rel in ("a.jpg", ".b.jpg", ".git/c.jpg", "sub/d.jpg", "sub/.thumbnails/e.jpg", ".cache/sub/f.jpg"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    def rel(uris):
        return [u.split(str(tmp_path))[1] for u in uris]

    assert rel(iter_image_uris(str(tmp_path), [".jpg"])) == ["/a.jpg", "/sub/d.jpg"]
    assert rel(iter_image_uris(f"{tmp_path}/**/*.jpg", [".jpg"])) == ["/a.jpg", "/sub/d.jpg"]
    assert rel(iter_image_uris(f"{tmp_path}/.cache/**/*.jpg", [".jpg"])) == ["/.cache/sub/f.jpg"]


def test_predictor_applies_exif_orientation_to_pil_images():
    """A PIL image given to the Python API is turned upright as a file would be."""
    from pipeline.predict import load_image

    rgb = np.zeros((20, 40, 3), np.uint8)
    rgb[:, :20] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    data = _jpeg(rgb, exif=exif.tobytes())
    from_pil = load_image(Image.open(io.BytesIO(data)))
    assert from_pil.shape == (40, 20, 3)
    np.testing.assert_array_equal(from_pil, decode_rgb(data))
    assert load_image(Image.open(io.BytesIO(_jpeg(rgb)))).shape == (20, 40, 3)  # no EXIF: as stored
    grey16 = Image.fromarray(np.full((4, 4), 65535, np.uint16))
    assert load_image(grey16).max() == 255  # 16-bit greyscale scaled, as the decoder does


def test_listing_is_a_generator_not_a_list(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"x")
    it = iter_image_uris(str(tmp_path), [".jpg"])
    assert iter(it) is it


def test_shards_hold_shard_size_images(tmp_path):
    for i in range(7):
        (tmp_path / "in" / f"{i}.jpg").parent.mkdir(exist_ok=True)
        (tmp_path / "in" / f"{i}.jpg").write_bytes(b"x")
    fs = fsspec.filesystem("file")
    items = (WorkItem(u) for u in iter_image_uris(str(tmp_path / "in"), [".jpg"]))
    listing = write_shards(items, 3, fs, str(tmp_path / "run"))
    assert (listing.num_shards, listing.num_images) == (3, 7)
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "run" / "_shards")
    assert sorted(table.column("shard_id").to_pylist()) == ["000000"] * 3 + ["000001"] * 3 + ["000002"]
    assert table.column("image_id").to_pylist() == [image_id_for(u) for u in table.column("uri").to_pylist()]


def test_image_id_is_stable():
    assert image_id_for("s3://b/x.jpg") == image_id_for("s3://b/x.jpg") != image_id_for("s3://b/y.jpg")
    assert len(image_id_for("s3://b/x.jpg")) == 16


def test_decode_applies_exif_orientation():
    rgb = np.zeros((20, 40, 3), np.uint8)
    rgb[:, :20] = 255  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    decoded = decode_rgb(_jpeg(rgb, exif=exif.tobytes()))
    assert decoded.shape == (40, 20, 3)
    assert decoded[:5].mean() > 200 and decoded[-5:].mean() < 50  # white half now on top


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "1"])
def test_decode_turns_any_mode_into_rgb(mode):
    img = Image.new("RGB", (8, 6), (10, 200, 30)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format="TIFF")
    out = decode_rgb(buf.getvalue())
    assert out.shape == (6, 8, 3) and out.dtype == np.uint8


@pytest.mark.parametrize(
    "data, error_class",
    [(b"", "decode_error"), (b"GIF89a garbage", "decode_error"), (b"plain text", "decode_error")],
)
def test_decode_failures_are_named(data, error_class):
    import ultralytics.utils.patches  # noqa: F401  (it patches PIL.Image.open; decoding must not care)

    with pytest.raises(ImageError) as err:
        decode_rgb(data)
    assert err.value.error_class == error_class


def test_truncated_jpeg_is_a_decode_error():
    data = _jpeg(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    with pytest.raises(ImageError) as err:
        decode_rgb(data[: len(data) // 2])
    assert err.value.error_class == "decode_error"


def test_read_errors_are_named(tmp_path):
    with pytest.raises(ImageError) as err:
        read_bytes(f"file://{tmp_path}/gone.jpg")
    assert err.value.error_class == "not_found"


def test_read_batch_keeps_one_row_per_input_and_carries_bytes_not_pixels(tmp_path):
    """The read stage passes the encoded file and its header's facts; pixels are decoded next to
    the model. A file broken past its header is found there, with the decoder's error class."""
    from pipeline.io.decode import ImageDecoder, pixels_or_error
    from pipeline.stages.read import read_batch

    good, truncated = tmp_path / "good.jpg", tmp_path / "truncated.jpg"
    good.write_bytes(_jpeg(np.full((5, 7, 3), 128, np.uint8)))
    full = _jpeg(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    truncated.write_bytes(full[: len(full) // 2])
    uris = [f"file://{good}", f"file://{tmp_path}/gone.jpg", f"file://{truncated}"]
    batch = pa.table({"shard_id": ["0"] * 3, "uri": uris, "image_id": ["a", "b", "c"], "data": [None] * 3})
    out = read_batch(batch)
    assert out.column("status").to_pylist() == ["ok", "error", "ok"]
    assert out.column("error_class").to_pylist() == [None, "not_found", None]
    assert out.column("data")[0].as_py() == good.read_bytes() and out.column("data")[1].as_py() == b""
    assert (out.column("width")[0].as_py(), out.column("height")[0].as_py()) == (7, 5)
    futures = ImageDecoder(2).decode_rows(out, [0, 2])
    assert pixels_or_error(futures[0], (5, 7)).shape == (5, 7, 3)
    broken = pixels_or_error(futures[2], (64, 64))
    assert isinstance(broken, ImageError) and broken.error_class == "decode_error"
    assert "pixels" not in out.column_names


def test_rle_round_trip_matches_pycocotools():
    rng = np.random.default_rng(1)
    masks = rng.random((3, 17, 23)) > 0.5
    rles = mask_codec.encode(masks)
    assert all(r["size"] == [17, 23] and isinstance(r["counts"], str) for r in rles)
    for m, r in zip(masks, rles):
        assert (mask_codec.decode(r) == m).all()
        assert mask_codec.area(r) == m.sum()
    assert mask_codec.encode(np.zeros((0, 4, 4), bool)) == []


def test_split_tables_counts_per_class():
    from pipeline.stages.segment import OBJECT_TYPE

    def obj(i, c, n, status="ok", candidate=0):
        return {"object_id": i, "object_key": None, "source": "detector", "prompt": "box", "candidate": candidate,
                "status": status, "error": None if status == "ok" else "bad prompt", "class_id": c, "class_name": n,
                "det_score": 0.5, "mask_score": 0.9, "box": [0, 0, 1, 1], "area": 1, "mask": {"size": [2, 2], "counts": "04"}}

    batch = pa.table(
        {
            "image_id": ["a", "b"], "uri": ["u1", "u2"], "width": [2, None], "height": [2, None],
            "status": ["ok", "error"], "error_class": [None, "decode_error"], "error": [None, "decode_error: x"], "shard_id": ["0", "0"],
            "objects": pa.array(
                [[obj(0, 0, "person"), obj(1, 2, "car"), obj(1, 2, "car", candidate=1), obj(2, 0, "person"), obj(3, 0, "person", "error")], []],
                type=pa.list_(OBJECT_TYPE),
            ),
            "meta": ['{"site": "north", "camera": 3}', None],
        }
    )
    images, objects = split_tables(batch, ["site", "camera"])
    assert images.column("num_objects").to_pylist() == [3, 0]  # not the 2nd candidate, not the error row
    assert images.column("num_prompt_errors").to_pylist() == [1, 0]
    assert images.column("site").to_pylist() == ["north", None] and images.column("camera").to_pylist() == ["3", None]
    assert images.column("class_counts").to_pylist()[0] == [
        {"class_id": 0, "class_name": "person", "count": 2},
        {"class_id": 2, "class_name": "car", "count": 1},
    ]
    assert objects.num_rows == 5 and set(objects.column("image_id").to_pylist()) == {"a"}


def test_dtype_auto_is_float32_on_cpu_and_bfloat16_on_cuda():
    import torch

    from pipeline.sam.model import resolve_dtype

    assert resolve_dtype("auto", torch.device("cpu")) == "float32"
    assert resolve_dtype("auto", torch.device("cuda")) == "bfloat16"
    assert resolve_dtype("float32", torch.device("cuda")) == "float32"


def test_segmenter_bfloat16_path_runs_under_autocast(checkpoints):
    """The bf16 path for real: the mask decoder computes in bfloat16 (CPU autocast, small input)."""
    import torch

    from pipeline.sam.model import SamModel
    from pipeline.sam.prompts import Prompt

    image = np.asarray(Image.open(__file__.rsplit("/tests/", 1)[0] + "/samples/images/bus.jpg").convert("RGB"))
    boxes = np.array([[50, 400, 250, 900], [0, 200, 800, 800]], np.float32)
    results = {}
    for dtype in ("float32", "bfloat16"):
        sam = SamModel(SamConfig(checkpoint=str(checkpoints["sam"]), image_size=SAM_IMAGE_SIZE, dtype=dtype))
        seen = []
        hook = sam.model.sam_mask_decoder.register_forward_hook(lambda m, i, o: seen.append(o[0].dtype))
        answers = sam.segment(image, [Prompt(box=b) for b in boxes])
        hook.remove()
        masks = np.stack([a.masks[0] for a in answers])
        assert masks.shape == (2, *image.shape[:2]) and masks.dtype == bool and answers[0].scores.dtype == np.float32
        assert seen == [torch.bfloat16 if dtype == "bfloat16" else torch.float32]
        results[dtype] = masks
    auto = SamModel(SamConfig(checkpoint=str(checkpoints["sam"]), image_size=SAM_IMAGE_SIZE))
    assert auto.dtype == "float32"


BF16_MIN_IOU = 0.98  # bf16 vs fp32 for the same prompt; masks of other boxes must stay below it


def test_bfloat16_masks_equal_float32_masks_per_object(checkpoints):
    """bf16 changes low bits, not the answer: each object's bf16 mask matches its fp32 mask
    (IoU >= BF16_MIN_IOU, score within 0.01). The control shows the bound can fail: on these
    random weights every mask is a large blob, and a bf16 mask compared with the fp32 mask of
    any *other* box must fall below the bound, or the check would not tell a wrong box apart."""
    from pipeline.sam.model import SamModel
    from pipeline.sam.prompts import Prompt

    image = np.asarray(Image.open(__file__.rsplit("/tests/", 1)[0] + "/samples/images/bus.jpg").convert("RGB"))
    h, w = image.shape[:2]
    rng = np.random.default_rng(0)
    corners = rng.uniform(0, 0.6, size=(8, 2)) * [w, h]
    sizes = rng.uniform(0.1, 0.4, size=(8, 2)) * [w, h]
    boxes = np.hstack([corners, np.minimum(corners + sizes, [w, h])]).astype(np.float32)
    answers = {}
    for dtype in ("float32", "bfloat16"):
        sam = SamModel(SamConfig(checkpoint=str(checkpoints["sam"]), image_size=SAM_IMAGE_SIZE, dtype=dtype))
        answers[dtype] = sam.segment(image, [Prompt(box=b) for b in boxes])
    fp32, bf16 = answers["float32"], answers["bfloat16"]
    for i in range(len(boxes)):
        assert mask_codec.iou(bf16[i].masks[0], fp32[i].masks[0]) >= BF16_MIN_IOU, i
        assert abs(float(bf16[i].scores[0]) - float(fp32[i].scores[0])) <= 0.01, i
        other = max(mask_codec.iou(bf16[i].masks[0], fp32[j].masks[0]) for j in range(len(boxes)) if j != i)
        assert other < BF16_MIN_IOU, f"control: box {i}'s bf16 mask matches another box's fp32 mask ({other:.4f})"


def test_detector_batches_of_same_shape_images_equal_per_image_predict(checkpoints, tmp_path):
    """Same-shape images go through YOLO together (one call for ``detector.batch_size``), and each
    image's boxes equal a per-image ``YOLO.predict`` of its file."""
    from ultralytics import YOLO

    from conftest import real_photos
    from pipeline.config import DetectorConfig
    from pipeline.stages.detect import Detector

    crops = [rgb[:360, :480] for rgb in real_photos().values()]  # five real photos, one shape
    paths = []
    for i, crop in enumerate(crops):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(crop).save(paths[-1])
    cfg = DetectorConfig(weights=str(checkpoints["yolo"]), conf=0.04, max_det=6, imgsz=320, batch_size=4)
    detector = Detector(cfg)
    calls = []
    predict = detector.model.predict
    detector.model.predict = lambda images, **kw: calls.append(len(images)) or predict(images, **kw)
    batch = read_batch(pa.table({"uri": [f"file://{p}" for p in paths]}))
    out = detector(batch).to_pylist()
    assert calls == [4, 1]  # batched, not one by one
    yolo = YOLO(str(checkpoints["yolo"]))
    compared = 0
    for path, row in zip(paths, out):
        alone = yolo.predict(str(path), conf=cfg.conf, iou=cfg.iou, max_det=cfg.max_det, imgsz=cfg.imgsz, verbose=False)[0]
        assert len(row["det_boxes"]) == len(alone.boxes), path
        if len(alone.boxes):
            np.testing.assert_allclose(np.array(row["det_boxes"]), alone.boxes.xyxy.numpy(), atol=0.05)
            np.testing.assert_allclose(row["det_scores"], alone.boxes.conf.numpy(), atol=1e-4)
            assert row["det_class_ids"] == alone.boxes.cls.int().tolist()
            compared += len(alone.boxes)
    assert compared >= 10, "the calibrated random detector must find boxes on these crops"
    assert out[0]["det_boxes"] != out[1]["det_boxes"]  # control: different photos, different boxes
