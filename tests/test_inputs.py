"""Inputs at scale: folders, WebDataset tar shards and manifests, and every bad input accounted for.

A corpus of real bad files (tests/bad_inputs.py: truncated, zero bytes, wrong content, a
decompression bomb, a file that vanishes after listing, ...) mixed with real photos and awkward
but valid images is labeled three times, on the real local Ray with the real (random-weight)
models: as a folder, as tar shards and through a CSV manifest. Each time the images table must
have exactly one row per input with the right status and error class, and the good images must
get exactly the objects they get without the bad ones around.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bad_inputs import Expect, build_folder, corpus_files, write_tar
from conftest import REPO, model_overrides
from pipeline.config import ConfigError, load_config
from pipeline.errors import ImageError
from pipeline.io.decode import ImageDecoder, decode_image, iter_tar_members, pixels_or_error, with_errors
from pipeline.io.listing import SourceError, expand_braces, image_id_for, input_format
from pipeline.io.manifest import iter_manifest
from pipeline.run.job import run, work_items
from pipeline.sam import masks as mask_codec
from pipeline.stages.read import read_batch

PHOTOS = {"photos/coffee.png": "coffee.png", "photos/chelsea.jpg": "nested/chelsea.jpg"}  # corpus name -> photo_folder name
META = {"camera": ["cam-a", "cam-b"], "site": ["north", "south", "east"], "split": ["train", "val"]}


# ---------------------------------------------------------------- listing and detection, no Ray


def test_brace_patterns_expand_like_webdataset():
    assert expand_braces("s3://b/shard-{000000..000002}.tar") == [f"s3://b/shard-00000{i}.tar" for i in range(3)]
    assert expand_braces("d/{a,b}-{8..10}.tar") == ["d/a-8.tar", "d/a-9.tar", "d/a-10.tar", "d/b-8.tar", "d/b-9.tar", "d/b-10.tar"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    with pytest.raises(SourceError, match="two numbers"):
        expand_braces("x-{a..b}.tar")


@pytest.mark.parametrize(
    "uri, declared, fmt",
    [("s3://b/shard-{000..009}.tar", "auto", "tar"), ("data/x.TAR", "auto", "tar"), ("list.jsonl", "auto", "manifest"),
     ("gs://b/list.csv", "auto", "manifest"), ("a/b.parquet", "auto", "manifest"), ("photos/", "auto", "images"),
     ("photos/*.jpg", "auto", "images"), ("odd-name.bin", "tar", "tar")],
)
def test_input_format_is_detected_or_named(uri, declared, fmt):
    assert input_format(uri, declared) == fmt


def test_manifest_forms_give_the_same_items(tmp_path):
    """.jsonl, .csv and .parquet manifests: relative and absolute URIs, metadata carried as is."""
    rows = [{"uri": "a/x.jpg", "camera": "c1", "site": "north"}, {"uri": f"file://{tmp_path}/y.png", "camera": "c2", "site": None}]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    (tmp_path / "m.csv").write_text("uri,camera,site\na/x.jpg,c1,north\n" + f"file://{tmp_path}/y.png,c2,\n")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "m.parquet")
    seen = []
    for name in ("m.jsonl", "m.csv", "m.parquet"):
        cfg = load_config(None, [f"input.uri={tmp_path / name}"])
        items = list(work_items(cfg))
        seen.append([(i.uri, json.loads(i.meta), i.prompts) for i in items])
    assert seen[0] == seen[1] == seen[2]
    assert [u for u, _, _ in seen[0]] == [f"file://{tmp_path}/a/x.jpg", f"file://{tmp_path}/y.png"]
    assert seen[0][0][1] == {"camera": "c1", "site": "north"} and seen[0][1][2] is None
    (tmp_path / "bad.csv").write_text("path,camera\nx.jpg,c1\n")
    with pytest.raises(SourceError, match=r"input.uri line 2: needs a \"uri\" string"):
        list(iter_manifest(str(tmp_path / "bad.csv"), key="input.uri"))


def test_tar_input_lists_shards_without_opening_them(tmp_path):
    """The driver only names the shards (brace pattern or glob); it never reads a tar."""
    for i in range(3):
        (tmp_path / f"s-{i:03d}.tar").write_bytes(b"not even a tar: the driver must not look inside")
    by_brace = load_config(None, [f"input.uri={tmp_path}/s-{{000..002}}.tar"])
    by_glob = load_config(None, [f"input.uri={tmp_path}/s-*.tar"])
    expected = [f"file://{tmp_path}/s-{i:03d}.tar" for i in range(3)]
    assert [i.uri for i in work_items(by_brace)] == [i.uri for i in work_items(by_glob)] == expected


def test_decoder_names_every_failure_and_converts_every_mode(tmp_path):
    """Each corpus file through the real decode stage, in-process: right status, class, size, note."""
    files = corpus_files({"photos/tiny.png": _png(np.full((6, 9, 3), 200, np.uint8))})
    uris = []
    for name, (data, _) in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
        uris.append(f"file://{tmp_path / name}")
    # The read stage (bytes + header), then the decoding the model actors do, as the job runs them.
    # Pillow warns about the garbage TIFF's EXIF on its way to a decode_error row: expected here.
    with pytest.warns(UserWarning, match="Corrupt EXIF data"):
        out = read_batch(pa.table({"shard_id": ["0"] * len(uris), "uri": uris, "image_id": uris}), max_pixels=89_478_485)
        ok = [i for i, status in enumerate(out.column("status").to_pylist()) if status == "ok"]
        futures = ImageDecoder(2, 89_478_485).decode_rows(out, ok)
        rows = out.to_pylist()
        pixels = {i: pixels_or_error(futures[i], (rows[i]["height"], rows[i]["width"])) for i in ok}
    out = with_errors(out, {i: p for i, p in pixels.items() if isinstance(p, ImageError)})
    for i, (row, (name, (_, expect))) in enumerate(zip(out.to_pylist(), files.items())):
        _check_row(name, row, expect)
        if row["status"] == "ok":
            assert pixels[i].shape == (row["height"], row["width"], 3)
    assert len({e.error_class for _, e in files.values() if e.status == "error"}) >= 2
    assert sum(e.status == "error" for _, e in files.values()) >= 12


def test_pixel_modes_come_out_as_the_right_rgb():
    from bad_inputs import _exif_rotated_jpeg, _palette_transparent_png

    rotated, _ = decode_image(_exif_rotated_jpeg())
    assert rotated.shape == (40, 20, 3) and rotated[:5].mean() > 200 and rotated[-5:].mean() < 50
    from PIL import Image

    i16 = Image.fromarray(np.array([[0, 32768, 65535]], np.uint16))
    grey, _ = decode_image(_png(i16))
    assert grey[0, :, 0].tolist() == [0, 127, 255]  # scaled to 8 bits, not clipped to white
    palette, _ = decode_image(_palette_transparent_png())
    assert palette.shape == (48, 64, 3) and palette.dtype == np.uint8


def test_max_pixels_is_configurable_and_checked_before_decoding():
    data = _png(np.zeros((100, 100, 3), np.uint8))
    with pytest.raises(ImageError) as err:
        decode_image(data, max_pixels=9_999)
    assert err.value.error_class == "too_large" and "input.max_pixels" in str(err.value)
    assert decode_image(data, max_pixels=10_000)[0].shape == (100, 100, 3)
    with pytest.raises(ConfigError, match="input.max_pixels"):
        load_config(None, ["input.max_pixels=0"])


def test_tar_members_stream_and_breaks_are_reported(tmp_path):
    good = _png(np.full((4, 4, 3), 9, np.uint8))
    write_tar(tmp_path / "t.tar", {"k1.png": good, "k1.json": b"{}", "sub/k2.jpg": b"x" * 3000, "k3.png": good})
    whole = (tmp_path / "t.tar").read_bytes()
    (tmp_path / "cut-member.tar").write_bytes(whole[: 512 * 5 + 1000])  # inside sub/k2.jpg's data
    (tmp_path / "cut-header.tar").write_bytes(whole[: 512 * 5 + 3072 + 100])  # inside k3.png's header
    (tmp_path / "not-a-tar.tar").write_bytes(b"hello" * 100)

    def members(name):
        return [(u.split("#")[-1] if "#" in u else "<tar>", v if isinstance(v, bytes) else v.error_class)
                for u, v in iter_tar_members(f"file://{tmp_path}/{name}", None, (".png", ".jpg"))]

    assert members("t.tar") == [("k1.png", good), ("sub/k2.jpg", b"x" * 3000), ("k3.png", good)]
    assert members("cut-member.tar") == [("k1.png", good), ("sub/k2.jpg", "read_error")]
    assert members("cut-header.tar") == [("k1.png", good), ("sub/k2.jpg", b"x" * 3000), ("<tar>", "read_error")]
    assert members("not-a-tar.tar") == [("<tar>", "read_error")]
    assert members("missing.tar") == [("<tar>", "not_found")]


def test_a_mistyped_brace_pattern_stops_before_any_work(tmp_path):
    from pipeline.run.job import preflight

    (tmp_path / "s-000001.tar").write_bytes(b"")
    with pytest.raises(ConfigError, match="first tar shard .*s-000000.tar does not exist"):
        preflight(load_config(None, [f"input.uri={tmp_path}/s-{{000000..000001}}.tar"]))


def test_memory_tar_travels_in_the_shard_and_is_expanded_by_the_read_stage(tmp_path):
    """memory:// lives in the driver only: the tar's bytes go into its shard row for the workers."""
    import fsspec

    from pipeline.io.shards import write_shards
    from pipeline.stages.read import read_tar_batch

    fs = fsspec.filesystem("memory")
    tar = tmp_path / "m.tar"
    write_tar(tar, {"x/a.png": _png(np.zeros((5, 6, 3), np.uint8)), "x/b.jpg": b"broken", "x/a.cls": b"3"})
    fs.pipe_file("/tars/m-0.tar", tar.read_bytes())
    cfg = load_config(None, ["input.uri=memory://tars/m-{0..0}.tar", f"output.uri={tmp_path / 'out'}"])
    listing = write_shards(work_items(cfg), 1, fsspec.filesystem("file"), str(tmp_path / "out"))
    shard = pq.read_table(tmp_path / "out" / "_shards" / "shard-000000.parquet")
    assert shard.column("data")[0].as_py() == tar.read_bytes() and listing.num_shards == 1
    fs.rm("/tars/m-0.tar")  # what workers see: nothing in their own memory://
    rows = [r for t in read_tar_batch(shard, extensions=(".png", ".jpg")) for r in t.to_pylist()]
    assert [(r["uri"], r["status"], r["error_class"]) for r in rows] == [
        ("memory:///tars/m-0.tar#x/a.png", "ok", None), ("memory:///tars/m-0.tar#x/b.jpg", "error", "decode_error")]
    assert rows[0]["image_id"] == image_id_for("memory:///tars/m-0.tar#x/a.png") and rows[0]["shard_id"] == "000000"


# ---------------------------------------------------------------- the corpus through the whole job


@pytest.fixture(scope="module")
def corpus(ray_local, checkpoints, photo_folder, tmp_path_factory):
    """The corpus labeled three ways: folder, tar shards (brace pattern), CSV manifest."""
    root = tmp_path_factory.mktemp("corpus")
    files = corpus_files({name: (photo_folder / src).read_bytes() for name, src in PHOTOS.items()})
    folder = root / "folder"
    expected_folder = build_folder(folder, files)

    # Tar shards: the corpus split over two tars (WebDataset-style .json siblings are skipped),
    # a third cut off inside a member, and a fourth that the brace pattern names but is missing.
    names = list(files)
    shards = root / "shards"
    shards.mkdir()
    write_tar(shards / "corpus-000000.tar", {n: files[n][0] for n in names[: len(names) // 2]})
    write_tar(shards / "corpus-000001.tar", {**{n: files[n][0] for n in names[len(names) // 2:]}, "photos/coffee.json": b'{"cls": 1}'})
    cut = files["modes/plain.bmp"][0]
    write_tar(shards / "whole.tar", {"cut/first.bmp": cut, "cut/second.bmp": cut})
    padded = -(-len(cut) // 512) * 512  # tar: 512-byte header, then the data padded to 512
    (shards / "corpus-000002.tar").write_bytes((shards / "whole.tar").read_bytes()[: 512 + padded + 512 + 100])
    (shards / "whole.tar").unlink()
    expected_tar = {f"corpus-000000.tar#{n}": files[n][1] for n in names[: len(names) // 2]}
    expected_tar.update({f"corpus-000001.tar#{n}": files[n][1] for n in names[len(names) // 2:]})
    expected_tar["corpus-000002.tar#cut/first.bmp"] = Expect("ok", size=(64, 48))
    expected_tar["corpus-000002.tar#cut/second.bmp"] = Expect("error", "read_error")
    expected_tar["corpus-000003.tar"] = Expect("error", "not_found")

    # CSV manifest in the corpus folder (relative URIs), with metadata columns, plus a line for a
    # file that does not exist and one for a folder that has an image's name.
    (folder / "folder_not_file.jpg").mkdir()
    lines = ["uri,camera,site,split"]
    expected_manifest, meta = {}, {}
    for i, (name, expect) in enumerate(sorted(expected_folder.items()) + [("never_existed.jpg", Expect("error", "not_found")),
                                                                          ("folder_not_file.jpg", Expect("error", "read_error"))]):
        values = {k: v[i % len(v)] for k, v in META.items()}
        lines.append(f"{name},{values['camera']},{values['site']},{values['split']}")
        expected_manifest[name] = expect
        meta[name] = values
    (folder / "images.csv").write_text("\n".join(lines) + "\n")

    runs = {}
    common = [*model_overrides(checkpoints), "report.enabled=false", "input.shard_size=8"]
    for kind, uri in (("folder", str(folder)), ("tar", f"{shards}/corpus-{{000000..000003}}.tar"), ("manifest", str(folder / "images.csv"))):
        out = root / f"out-{kind}"
        manifest = run(load_config(None, [f"input.uri={uri}", f"output.uri={out}", *common]))
        runs[kind] = {
            "manifest": manifest, "out": out, "run_json": json.loads((out / "run.json").read_text()),
            "images": pq.read_table(out / "images").to_pandas(), "objects": pq.read_table(out / "objects").to_pandas(),
        }
    prefix = {"folder": f"file://{folder}/", "tar": f"file://{shards}/", "manifest": f"file://{folder}/"}
    for kind, r in runs.items():
        r["images"]["name"] = r["images"]["uri"].str.slice(len(prefix[kind]))
    return {"runs": runs, "expected": {"folder": expected_folder, "tar": expected_tar, "manifest": expected_manifest}, "meta": meta}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["folder", "tar", "manifest"])
def test_every_input_has_exactly_one_row_with_the_right_class(corpus, kind):
    r, expected = corpus["runs"][kind], corpus["expected"][kind]
    images = r["images"]
    assert sorted(images["name"]) == sorted(expected), "one row per listed input, no more, no less"
    assert images["image_id"].is_unique and (images["image_id"] == images["uri"].map(image_id_for)).all()
    for row in images.to_dict("records"):
        _check_row(row["name"], row, expected[row["name"]])
    errors = {}
    for e in expected.values():
        if e.status == "error":
            errors[e.error_class] = errors.get(e.error_class, 0) + 1
    totals = r["run_json"]["totals"]
    assert r["run_json"]["status"] == "finished"
    assert totals["images"] == len(expected) and totals["ok"] == sum(e.status == "ok" for e in expected.values())
    assert totals["errors_by_class"] == errors
    assert r["run_json"]["input"]["num_images"] == len(expected)
    if kind == "tar":
        assert r["run_json"]["input"]["num_shards"] == 4 and r["run_json"]["input"]["format"] == "tar"
        assert images.groupby("shard_id").size().to_dict() == {"000000": 13, "000001": 13, "000002": 2, "000003": 1}


@pytest.mark.slow
def test_the_corpus_covers_at_least_fifteen_kinds_of_bad_input(corpus):
    exp = corpus["expected"]
    in_folder = {n for n, e in exp["folder"].items() if e.status == "error"}
    tar_only = {n for n, e in exp["tar"].items() if e.status == "error" and n.split("#")[-1] not in exp["folder"]}
    manifest_only = {n for n, e in exp["manifest"].items() if e.status == "error" and n not in exp["folder"]}
    assert len(in_folder) >= 13 and len(tar_only) == 2 and len(manifest_only) == 2
    assert len(in_folder | tar_only | manifest_only) >= 17
    classes = {e.error_class for kind in exp.values() for e in kind.values() if e.status == "error"}
    assert classes == {"decode_error", "too_large", "not_found", "read_error"}  # permission_denied: tests/test_s3.py


@pytest.mark.slow
def test_manifest_metadata_reaches_the_images_table(corpus):
    images = corpus["runs"]["manifest"]["images"].set_index("name")
    for name, values in corpus["meta"].items():
        assert {k: images.loc[name, k] for k in META} == values
    assert corpus["runs"]["manifest"]["run_json"]["input"]["metadata_columns"] == list(META)
    schema = pq.read_schema(next((corpus["runs"]["manifest"]["out"] / "images").glob("*.parquet")))
    assert all(schema.field(k).type == pa.string() for k in META)


def _objects_by_name(r: dict) -> dict[str, list[tuple]]:
    names = dict(zip(r["images"]["image_id"], r["images"]["name"].str.split("#").str[-1]))
    out: dict[str, list[tuple]] = {}
    for obj in r["objects"].sort_values(["image_id", "object_id"]).to_dict("records"):
        out.setdefault(names[obj["image_id"]], []).append(obj)
    return out


def _same_objects(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert (x["class_id"], x["object_id"]) == (y["class_id"], y["object_id"])
        assert x["det_score"] == pytest.approx(y["det_score"], abs=1e-5)
        assert np.allclose(x["box"], y["box"], atol=1e-3)
        assert x["mask_score"] == pytest.approx(y["mask_score"], abs=1e-4)
        assert mask_codec.iou(mask_codec.decode(x["mask"]), mask_codec.decode(y["mask"])) >= 0.99


@pytest.mark.slow
def test_tar_shards_and_manifest_give_the_same_objects_as_the_folder(corpus):
    runs = corpus["runs"]
    folder, tar, manifest = (_objects_by_name(runs[k]) for k in ("folder", "tar", "manifest"))
    assert sum(len(v) for v in folder.values()) > 0, "the calibrated random detector finds boxes on the photos"
    assert set(folder) == set(manifest)
    assert set(tar) - {"cut/first.bmp"} == set(folder)
    for name in folder:
        _same_objects(folder[name], tar[name])
        _same_objects(folder[name], manifest[name])
    for kind in runs:
        images = runs[kind]["images"]
        assert runs[kind]["images"].loc[images["status"] == "error", "num_objects"].eq(0).all()


@pytest.mark.slow
def test_good_images_are_labeled_as_if_the_bad_ones_were_not_there(corpus, labeled):
    """The photos amid 17 broken files get exactly the objects of the clean photo-folder run."""
    clean = labeled["images"].assign(name=labeled["images"]["uri"].str.rsplit("/", n=1).str[-1])
    clean_objects = _objects_by_name({"images": clean, "objects": labeled["objects"]})
    mixed = _objects_by_name(corpus["runs"]["folder"])
    compared = 0
    for name, src in PHOTOS.items():
        assert len(mixed.get(name, [])) > 0
        _same_objects(mixed[name], clean_objects[src.rsplit("/", 1)[-1]])
        compared += 1
    assert compared == 2


# ---------------------------------------------------------------- driver memory at scale


@pytest.mark.slow
def test_driver_memory_does_not_grow_with_the_number_of_images(tmp_path):
    """20,000 vs 2,000 images listed, sharded, decoded and written (models replaced by the
    benchmark's test-only no-models stub): the driver's peak RSS may not grow with the count."""
    out = tmp_path / "mem.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "listing_memory.py"), "--images", "2000", "20000",
         "--workdir", str(tmp_path), "--json", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    small, large = json.loads(out.read_text())["runs"]
    assert (small["rows"], large["rows"]) == (2000, 20000) and large["ok"] == 20000
    assert large["shards"] == 40
    growth = large["stream_peak_rss_mb"] - small["stream_peak_rss_mb"]
    # 18,000 more images: keeping one list entry per image (a URI, an id, a summary row) would add
    # tens of MB; the bound leaves room for allocator noise only.
    assert growth < 50, f"driver peak RSS grew by {growth:.1f} MB from 2k to 20k images: {small} {large}"
    assert large["listing_peak_rss_mb"] - large["rss_before_mb"] < 30


# ---------------------------------------------------------------- helpers


def _png(img) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    (img if isinstance(img, Image.Image) else Image.fromarray(img)).save(buf, format="PNG")
    return buf.getvalue()


def _null(value):
    return None if value is None or (isinstance(value, float) and value != value) else value  # pandas: NaN


def _check_row(name: str, row: dict, expect: Expect) -> None:
    row = {k: _null(v) for k, v in row.items() if not isinstance(v, (list, np.ndarray, dict))}
    assert row["status"] == expect.status, f"{name}: {row['status']} ({row['error']}), expected {expect}"
    assert row["error_class"] == expect.error_class, f"{name}: {row['error']}"
    if expect.status == "error":
        assert row["error"].startswith(f"{expect.error_class}: ") and len(row["error"]) < 400, name
        assert row["width"] is None and row["height"] is None, name
    else:
        assert row["error"] is None, name
        assert (row["width"], row["height"]) == expect.size, name
        assert row["note"] == expect.note, name


def test_a_tar_member_uri_reads_back_its_bytes(tmp_path):
    """Reports and exports re-read images by their images-table uri, tar members included."""
    from pipeline.io.decode import read_image_bytes

    write_tar(tmp_path / "s.tar", {"a/one.png": b"first", "a/two.jpg": b"second", "a/two.json": b"{}"})
    assert read_image_bytes(f"file://{tmp_path}/s.tar#a/two.jpg") == b"second"
    with pytest.raises(ImageError) as err:
        read_image_bytes(f"file://{tmp_path}/s.tar#a/three.jpg")
    assert err.value.error_class == "not_found"


@pytest.mark.slow
def test_cutouts_export_from_a_tar_run_equals_the_folder_run(corpus, tmp_path):
    """`autolabel export --format cutouts` re-reads tar members: same pixels as from the folder."""
    import csv

    from PIL import Image

    cutouts = {}
    for kind in ("folder", "tar"):
        out = tmp_path / kind
        proc = subprocess.run([sys.executable, "-m", "pipeline", "export", str(corpus["runs"][kind]["out"]), "--format", "cutouts",
                               "--out", str(out), "--quiet"], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        with open(out / "index.csv") as fh:
            rows = list(csv.DictReader(fh))
        cutouts[kind] = {(r["uri"].rsplit("/", 1)[-1], r["object_id"]): np.asarray(Image.open(out / r["path"]))
                         for r in rows if "photos/" in r["uri"]}
    assert cutouts["tar"] and cutouts["tar"].keys() == cutouts["folder"].keys()
    for key, pixels in cutouts["folder"].items():
        assert (cutouts["tar"][key] == pixels).all()
