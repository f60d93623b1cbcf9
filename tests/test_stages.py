"""Stage functions on their own: listing, decoding, RLE, the sink's table split, SAM dtypes."""
from __future__ import annotations

import io

import fsspec
import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from conftest import SAM_IMAGE_SIZE
from pipeline import masks as mask_codec
from pipeline.config import IMAGE_EXTENSIONS, SamConfig
from pipeline.decode import ImageError, decode_batch, decode_rgb, pixels_of, read_bytes
from pipeline.sink import split_tables
from pipeline.sources import SourceError, WorkItem, image_id_for, iter_image_uris, write_shards


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


def test_decode_batch_keeps_one_row_per_input(tmp_path):
    good = tmp_path / "good.jpg"
    good.write_bytes(_jpeg(np.full((5, 7, 3), 128, np.uint8)))
    batch = pa.table({"shard_id": ["0", "0"], "uri": [f"file://{good}", f"file://{tmp_path}/gone.jpg"], "image_id": ["a", "b"], "data": [None, None]})
    out = decode_batch(batch)
    assert out.column("status").to_pylist() == ["ok", "error"]
    assert out.column("error_class").to_pylist() == [None, "not_found"]
    assert pixels_of(out.column("pixels")[0].as_py(), 7, 5).shape == (5, 7, 3)
    assert "data" not in out.column_names


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
    from pipeline.segment import OBJECT_TYPE

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

    from pipeline.segment import resolve_dtype

    assert resolve_dtype("auto", torch.device("cpu")) == "float32"
    assert resolve_dtype("auto", torch.device("cuda")) == "bfloat16"
    assert resolve_dtype("float32", torch.device("cuda")) == "float32"


def test_segmenter_bfloat16_path_runs_under_autocast(checkpoints):
    """The bf16 path for real: the mask decoder computes in bfloat16 (CPU autocast, small input)."""
    import torch

    from pipeline.prompts import Prompt
    from pipeline.segment import SamModel

    image = np.asarray(Image.open(__file__.rsplit("/tests/", 1)[0] + "/samples/images/bus.jpg").convert("RGB"))
    boxes = np.array([[50, 400, 250, 900], [0, 200, 800, 800]], np.float32)
    results = {}
    for dtype in ("float32", "bfloat16"):
        sam = SamModel(SamConfig(checkpoint=str(checkpoints["sam"]), image_size=SAM_IMAGE_SIZE, dtype=dtype))
        seen = []
        hook = sam.predictor.model.sam_mask_decoder.register_forward_hook(lambda m, i, o: seen.append(o[0].dtype))
        answers = sam.segment(image, [Prompt(box=b) for b in boxes])
        hook.remove()
        masks = np.stack([a.masks[0] for a in answers])
        assert masks.shape == (2, *image.shape[:2]) and masks.dtype == bool and answers[0].scores.dtype == np.float32
        assert seen == [torch.bfloat16 if dtype == "bfloat16" else torch.float32]
        results[dtype] = masks
    auto = SamModel(SamConfig(checkpoint=str(checkpoints["sam"]), image_size=SAM_IMAGE_SIZE))
    assert auto.dtype == "float32"
    # bf16 changes low bits, not the answer: the masks mostly agree with fp32
    assert np.mean([mask_codec.iou(a, b) for a, b in zip(results["float32"], results["bfloat16"])]) > 0.8
