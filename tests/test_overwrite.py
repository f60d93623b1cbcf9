"""``--overwrite`` replaces autolabel's own output and nothing else.

`autolabel export --overwrite` replaces only an earlier export (a folder holding nothing but an
export and its ``.autolabel-export.json`` marker), never the run folder or a folder holding it, and a
failed export removes only what it wrote. `autolabel run --overwrite` clears only a folder that holds
an autolabel run (a run.json that is a run manifest), and then only the run's own files. Every check
compares whole folder trees, byte for byte, before and after.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Optional

import pyarrow.parquet as pq
import pytest

from conftest import autolabel_cli, model_overrides
from synthetic_run import write_synthetic_run

from pipeline.cli import main
from pipeline.outputs.export import ExportError, export

MARKER = ".autolabel-export.json"  # the documented name of the marker every export writes first


def tree(folder: Path) -> dict[str, str]:
    """Every file and folder under ``folder`` -> sha256 of its bytes ('dir' for folders)."""
    return {
        str(p.relative_to(folder)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
    }


@pytest.fixture
def home(tmp_path) -> Path:
    """``home/run`` (a synthetic run with real PNGs), ``home/notes.txt`` beside it (someone's file)."""
    write_synthetic_run(str(tmp_path / "home" / "run"), num_images=12, image_folder=tmp_path / "img", seed=7)
    (tmp_path / "home" / "notes.txt").write_text("not autolabel's")
    return tmp_path / "home"


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("where", ["run folder", "its parent", "folder with a file"])
def test_export_overwrite_refuses_anything_but_an_earlier_export(home, tmp_path, capsys, where):
    """Today's code removed each of these recursively (the run and notes.txt with it)."""
    if where == "run folder":
        dest, expected = home / "run", "is the run folder itself"
    elif where == "its parent":
        dest, expected = home, f"contains the run folder file://{home / 'run'}"
    else:
        dest = tmp_path / "mine"
        dest.mkdir()
        (dest / "keep.txt").write_text("someone's file")
        expected = f"is not empty and is not an earlier autolabel export (it has no {MARKER}); it holds keep.txt"
    before = tree(dest)
    code, out, err = _cli(capsys, "export", str(home / "run"), "--format", "png", "--out", str(dest), "--overwrite", "--quiet")
    assert code == 2, err
    assert expected in err and "choose" in err
    assert tree(dest) == before, "nothing may be touched"


def test_export_refuses_a_non_empty_folder_without_overwrite(home, tmp_path, capsys):
    dest = tmp_path / "taken"
    dest.mkdir()
    (dest / "keep.txt").write_text("someone's file")
    code, _, err = _cli(capsys, "export", str(home / "run"), "--format", "coco", "--out", str(dest))
    assert code == 2 and "is not empty and is not an earlier autolabel export" in err
    assert tree(dest) == {"keep.txt": hashlib.sha256(b"someone's file").hexdigest()}


def test_overwrite_replaces_an_earlier_export_and_only_that(home, tmp_path, capsys):
    dest = tmp_path / "exp"
    code, _, err = _cli(capsys, "export", str(home / "run"), "--format", "coco", "--out", str(dest), "--quiet")
    assert code == 0, err
    marker = json.loads((dest / MARKER).read_text())
    assert marker["format"] == "coco" and marker["status"] == "complete" and marker["run"] == f"file://{home / 'run'}"
    assert sorted(p.name for p in dest.iterdir()) == sorted([MARKER, "instances.json"])

    code, _, err = _cli(capsys, "export", str(home / "run"), "--format", "png", "--out", str(dest), "--quiet")
    assert code == 2 and "already holds an autolabel coco export" in err and "pass --overwrite to replace it" in err

    code, _, err = _cli(capsys, "export", str(home / "run"), "--format", "png", "--out", str(dest), "--overwrite", "--quiet")
    assert code == 0, err
    assert sorted(p.name for p in dest.iterdir()) == sorted([MARKER, "instances", "index.csv"])  # the COCO file is gone
    assert json.loads((dest / MARKER).read_text())["format"] == "png"

    # Something that is not part of the export in its folder: --overwrite refuses, touches nothing.
    (dest / "my-notes.txt").write_text("added by hand")
    before = tree(dest)
    code, _, err = _cli(capsys, "export", str(home / "run"), "--format", "png", "--out", str(dest), "--overwrite", "--quiet")
    assert code == 2 and "but also my-notes.txt, which are not part of it" in err
    assert tree(dest) == before


def test_default_destination_inside_the_run_is_fine_and_replaceable(home, capsys):
    run = home / "run"
    for _ in range(2):
        code, out, err = _cli(capsys, "export", str(run), "--format", "coco", "--overwrite", "--quiet")
        assert code == 0, err
    assert (run / "exports" / "coco" / "instances.json").exists() and (run / "run.json").exists()
    shutil.rmtree(run / "exports")


def _damaged_copy(home: Path, tmp_path: Path) -> Path:
    run = tmp_path / "damaged"
    shutil.copytree(home / "run", run)
    part = sorted((run / "objects").glob("*.parquet"))[0]
    table = pq.read_table(part)
    pq.write_table(table.slice(0, table.num_rows - 1), part)  # one mask lost: the export fails part-way
    return run


def test_a_failed_export_removes_only_what_it_wrote(home, tmp_path, capsys):
    run = _damaged_copy(home, tmp_path)
    # 1. A non-empty folder that is not an export: refused before anything is written (today: wiped, then failed).
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("someone's file")
    before = tree(mine)
    code, _, err = _cli(capsys, "export", str(run), "--format", "png", "--out", str(mine), "--overwrite", "--quiet")
    assert code == 2 and tree(mine) == before
    # 2. New folders (two levels) in a folder with other files: both levels go, the rest stays.
    parent = tmp_path / "parent"
    parent.mkdir()
    (parent / "other.txt").write_text("stays")
    with pytest.raises(ExportError, match="the run is damaged"):
        export(str(run), "png", str(parent / "new" / "exp"), progress=False)
    assert tree(parent) == {"other.txt": hashlib.sha256(b"stays").hexdigest()}
    # 3. An existing empty folder: left as it was, empty.
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ExportError, match="the run is damaged"):
        export(str(run), "cutouts", str(empty), progress=False)
    assert empty.is_dir() and tree(empty) == {}
    # 4. Replacing an earlier export that then fails: the folder is left empty, never removed.
    earlier = tmp_path / "earlier"
    export(str(home / "run"), "coco", str(earlier), progress=False)
    with pytest.raises(ExportError, match="the run is damaged"):
        export(str(run), "png", str(earlier), overwrite=True, progress=False)
    assert earlier.is_dir() and tree(earlier) == {}


# ------------------------------------------------------------------------------ autolabel run


def _run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*autolabel_cli(), "run", "sam.checkpoint=random", "detector.weights=yolov8n.yaml", "sam.image_size=256",
                           f"input.uri={cwd / 'single'}", "ray.num_cpus=2", *args], capture_output=True, text=True, timeout=300, cwd=cwd)


def test_run_overwrite_refuses_a_folder_that_holds_no_run(photo_folder, tmp_path):
    """Today `--overwrite` cleared images/, objects/, report/, exports/... of any folder: here someone's photos."""
    single = tmp_path / "single"
    single.mkdir()
    shutil.copy(photo_folder / "zidane.jpg", single / "zidane.jpg")
    folder = tmp_path / "dataset"
    (folder / "images").mkdir(parents=True)
    (folder / "images" / "cat.jpg").write_bytes(b"someone's photo")
    (folder / "exports").mkdir()
    (folder / "exports" / "labels.json").write_text("{}")
    (folder / "README").write_text("my dataset")
    before = tree(folder)
    for flag in (["--overwrite"], ["output.overwrite=true"]):
        proc = _run_cli(*flag, f"output.uri={folder}", cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr
        assert "has no run.json, so it is not an autolabel run" in proc.stderr and "--overwrite never clears other files" in proc.stderr
        assert tree(folder) == before
    # A run.json that is not an autolabel run manifest is no licence either.
    (folder / "run.json").write_text(json.dumps({"status": "done", "epochs": 10}))
    before = tree(folder)
    proc = _run_cli("--overwrite", f"output.uri={folder}", cwd=tmp_path)
    assert proc.returncode == 2 and "holds a run.json that is not an autolabel run manifest" in proc.stderr
    assert tree(folder) == before


def test_run_overwrite_clears_only_the_runs_own_files(ray_local, checkpoints, photo_folder, tmp_path):
    """A real run over an earlier run's folder: the run's files are replaced; what else is there stays."""
    from pipeline.config import load_config
    from pipeline.run.job import run

    out = tmp_path / "out"
    write_synthetic_run(str(out), num_images=6, image_folder=tmp_path / "img", seed=8)
    export(str(out), "coco", progress=False)  # out/exports/coco, with its marker: the run's
    (out / "exports" / "coco" / "my-notes.txt").write_text("someone's notes in the export folder")
    (out / "exports" / "mine").mkdir()
    (out / "exports" / "mine" / "hand-made.json").write_text("{}")
    (out / "report").mkdir()
    (out / "report" / "report.html").write_text("old report")
    (out / "report" / "my-notes.md").write_text("notes")
    (out / "README.md").write_text("about this run")
    (out / "_staging" / "shard-000000").mkdir(parents=True)
    (out / "_staging" / "shard-000000" / "images-0123456789abcdef.parquet").write_bytes(b"left by a crash")
    keep = {k: v for k, v in tree(out).items()
            if k in ("README.md", "exports/mine", "exports/mine/hand-made.json", "report/my-notes.md", "exports/coco/my-notes.txt")}

    single = tmp_path / "single"
    single.mkdir()
    shutil.copy(photo_folder / "zidane.jpg", single / "zidane.jpg")
    cfg = load_config(None, [f"input.uri={single}", f"output.uri={out}", "report.gallery=1", *model_overrides(checkpoints)])
    with pytest.raises(Exception, match="different configuration|without a resume fingerprint"):
        run(cfg)  # without --overwrite an earlier run is never replaced
    manifest = run(cfg, overwrite=True)
    assert manifest["status"] == "finished" and manifest["totals"]["images"] == 1
    after = tree(out)
    assert {k: after.get(k) for k in keep} == keep  # not the run's: kept, byte for byte
    assert sorted(p.name for p in (out / "exports" / "coco").iterdir()) == ["my-notes.txt"]  # the export itself is gone
    assert not (out / "_staging").exists()
    assert pq.read_table(out / "images").num_rows == 1  # the earlier run's 6 rows are gone
    assert (out / "report" / "report.html").read_text() != "old report"


# ------------------------------------------------------------------------------ only what we wrote (issue 16)


@pytest.fixture(scope="module")
def real_run(ray_local, checkpoints, photo_folder, tmp_path_factory) -> dict:
    """One real run (one photo), never changed by the tests that use it: its run.json is copied around."""
    from pipeline.config import load_config
    from pipeline.run.job import run

    root = tmp_path_factory.mktemp("real")
    (root / "single").mkdir()
    shutil.copy(photo_folder / "zidane.jpg", root / "single" / "zidane.jpg")
    overrides = [f"input.uri={root / 'single'}", f"output.uri={root / 'out'}", *model_overrides(checkpoints)]
    manifest = run(load_config(None, overrides))
    assert manifest["status"] == "finished"
    return {"root": root, "out": root / "out", "overrides": overrides, "manifest": manifest}


def _dataset(folder: Path) -> Path:
    """A hand-made dataset with folders named like a run's."""
    (folder / "images").mkdir(parents=True)
    (folder / "images" / "cat.jpg").write_bytes(b"someone's photo")
    (folder / "objects").mkdir()
    (folder / "objects" / "labels.txt").write_text("cat 0 0 10 10")
    return folder


def _legacy(manifest: dict) -> dict:
    """run.json as the version before run ids wrote it."""
    return {k: v for k, v in manifest.items() if k not in ("run_id", "location")}


@pytest.mark.parametrize("made_by", ["this version", "the previous version"])
def test_run_overwrite_refuses_a_dataset_with_a_copied_run_json(real_run, tmp_path, made_by):
    """Today `--overwrite` trusted any run.json with a status and a fingerprint and removed images/ and
    objects/; with output.uri=DATASET/images/.. it removed images/ and then crashed (FileNotFoundError)."""
    manifest = json.loads((real_run["out"] / "run.json").read_text())
    folder = _dataset(tmp_path / "dataset")
    (folder / "run.json").write_text(json.dumps(manifest if made_by == "this version" else _legacy(manifest)))
    before = tree(folder)
    for uri in (folder, f"{folder}/images/..", f"file://{folder}/./"):
        proc = _run_cli("--overwrite", f"output.uri={uri}", cwd=real_run["root"])
        assert tree(folder) == before, "nothing may be touched"
        assert proc.returncode == 2, proc.stderr[-3000:]
        if made_by == "this version":
            assert f"holds a run.json written for file://{real_run['out']}, not for file://{folder}" in proc.stderr
        else:  # no location: the run's files are recognised by their names, and these are not the run's
            assert "but also images/cat.jpg, objects/labels.txt, which the run did not write" in proc.stderr
        assert "nothing was touched" in proc.stderr
    assert manifest["location"] == f"file://{real_run['out']}" and len(manifest["run_id"]) == 32


def _put(fs, path: str, data: bytes) -> None:
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    fs.pipe_file(path, data)


def _bound_run(fs, root: str, storage_options: Optional[dict] = None) -> dict:
    """A synthetic run written where ``root`` is, with run.json bound there as a run writes it
    (``run_id``, ``location``) and its bookkeeping files (listing, done markers)."""
    location = fs.unstrip_protocol(root)
    write_synthetic_run(location, num_images=6, images_per_part=4, storage_options=storage_options, summaries=True)
    manifest = json.loads(fs.cat_file(f"{root}/run.json"))
    manifest.update(run_id="0" * 31 + "1", location=location)
    _put(fs, f"{root}/run.json", json.dumps(manifest).encode())
    for shard in range(manifest["input"]["num_shards"]):
        _put(fs, f"{root}/_shards/shard-{shard:06d}.parquet", b"listing")
        _put(fs, f"{root}/_done/shard-{shard:06d}.json", b"{}")
    _put(fs, f"{root}/report/report.html", b"<html>")
    _put(fs, f"{root}/report/notes.md", b"someone's notes")
    _put(fs, f"{root}/README.md", b"about this run")
    return manifest


def _run_folder(uri: str, storage_options: Optional[dict] = None):
    from pipeline.config import load_config
    from pipeline.run.folder import RunFolder

    options = [f"output.storage_options.{k}={v}" for k, v in (storage_options or {}).items()]
    return RunFolder(load_config(None, ["input.uri=photos", f"output.uri={uri}", *options]))


def _keys(fs, root: str) -> dict[str, bytes]:
    fs.invalidate_cache(root)
    return {p[len(root) + 1:]: fs.cat_file(p) for p in fs.find(root)}


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto's S3 server on loopback with a bucket ``runs``."""
    from moto_server import start_moto

    server = start_moto(tmp_path_factory.mktemp("moto"))
    server.client().create_bucket(Bucket="runs")
    yield server
    server.stop()


def _storage(where: str, tmp_path: Path, request) -> tuple:
    """(fs, root path, storage options) of a fresh folder, local or on the moto S3."""
    import fsspec

    if where == "local":
        return fsspec.filesystem("file"), os.path.realpath(tmp_path / "run"), {}
    server = request.getfixturevalue("s3")
    fs = fsspec.filesystem("s3", **server.options)
    return fs, f"runs/{tmp_path.name}/run", server.options


@pytest.mark.parametrize("where", ["local", "s3"])
@pytest.mark.parametrize("intruder", ["images/cat.jpg", "objects/shard-000099.parquet", "_staging/shard-000000/notes.txt",
                                      "_done/shard-000000.json.bak", "summaries/notes.txt"])
def test_overwrite_and_resume_refuse_a_file_the_run_did_not_write(tmp_path, request, where, intruder):
    """In the run's own folders every file must be one the run wrote (a shard id of its listing, the sink's
    names); anything else is named and nothing is deleted, --overwrite or resume."""
    from pipeline.config import ConfigError

    fs, root, options = _storage(where, tmp_path, request)
    manifest = _bound_run(fs, root, options)
    _put(fs, f"{root}/{intruder}", b"not the run's")
    before = _keys(fs, root)
    folder = _run_folder(fs.unstrip_protocol(root), options)
    for overwrite in (True, False):
        with pytest.raises(ConfigError, match=f"but also {intruder}, which the run did not write"):
            folder.previous_run(overwrite)
    with pytest.raises(ConfigError, match="nothing was touched"):
        folder.clear()
    with pytest.raises(ConfigError, match="nothing was touched"):
        folder.clean_unfinished(manifest, {"000000"})
    assert _keys(fs, root) == before


@pytest.mark.parametrize("where", ["local", "s3"])
def test_overwrite_removes_exactly_the_runs_files(tmp_path, request, where):
    """A bound run, reached as RUN/images/.. with a trailing slash: --overwrite deletes its files and
    nothing else (README.md and report/notes.md stay)."""
    fs, root, options = _storage(where, tmp_path, request)
    _bound_run(fs, root, options)
    _put(fs, f"{root}/_staging/shard-000001/images-0123456789abcdef.parquet", b"staged")
    _put(fs, f"{root}/images/.tmp-{'a' * 32}-shard-000001.parquet", b"half written")
    before = _keys(fs, root)
    assert {"images/shard-000000.parquet", "objects/shard-000001.parquet", "_shards/shard-000001.parquet",
            "summaries/shard-000001.parquet"} <= set(before)
    folder = _run_folder(fs.unstrip_protocol(root) + "/images/../", options)
    assert folder.path == root
    assert folder.previous_run(overwrite=True) is None
    folder.clear()
    assert _keys(fs, root) == {"README.md": b"about this run", "report/notes.md": b"someone's notes"}
    if where == "local":
        assert sorted(p.name for p in Path(root).iterdir()) == ["README.md", "report"]  # the run's folders went too


def test_a_symlink_in_the_run_is_never_followed(tmp_path):
    """A symlink where the run writes is refused (never deleted through), wherever it points."""
    from pipeline.config import ConfigError
    import fsspec

    fs = fsspec.filesystem("file")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "precious.parquet").write_bytes(b"someone's table")
    for link, target in (("images/shard-000000.parquet", elsewhere / "precious.parquet"), ("objects", elsewhere),
                         ("review", elsewhere)):
        root = tmp_path / f"run-{link.replace('/', '-')}"
        _bound_run(fs, str(root))
        shutil.rmtree(root / link) if (root / link).is_dir() else (root / link).unlink(missing_ok=True)
        (root / link).symlink_to(target)
        before, outside = tree(root), tree(elsewhere)
        folder = _run_folder(str(root))
        with pytest.raises(ConfigError, match=rf"{link} \(a symlink\)"):
            folder.previous_run(overwrite=True)
        with pytest.raises(ConfigError, match="symlinks are never followed"):
            folder.clear()
        assert tree(root) == before and tree(elsewhere) == outside


def test_a_run_made_by_the_previous_version_is_overwritten_by_its_names(tmp_path):
    """run.json without run_id/location (the previous version's): files named as that version names
    them, of the shard ids its listing had, are the run's; here a shard id past its listing is not."""
    import fsspec

    from pipeline.config import ConfigError

    fs = fsspec.filesystem("file")
    root = tmp_path / "old"
    manifest = _bound_run(fs, str(root))
    (root / "run.json").write_text(json.dumps(_legacy(manifest)))
    (root / "images" / "shard-000002.parquet").write_bytes(b"not from its listing of 2 shards")
    folder = _run_folder(str(root))
    with pytest.raises(ConfigError, match="but also images/shard-000002.parquet"):
        folder.previous_run(overwrite=True)
    (root / "images" / "shard-000002.parquet").unlink()
    folder.clear()
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*")) == ["README.md", "report", "report/notes.md"]


# ------------------------------------------------------------------------------ exports


def _yolo_dataset(folder: Path) -> Path:
    for sub in ("images/train", "labels/train"):
        (folder / sub).mkdir(parents=True)
    (folder / "images" / "train" / "cat.jpg").write_bytes(b"someone's photo")
    (folder / "labels" / "train" / "cat.txt").write_text("0 0.1 0.1 0.2 0.1 0.2 0.2\n")
    (folder / "data.yaml").write_text("path: .\ntrain: images/train\nval: images/train\nnames: {0: cat}\n")
    return folder


@pytest.mark.parametrize("made_by", ["this version", "the previous version"])
def test_export_overwrite_refuses_a_hand_made_dataset_with_a_copied_marker(home, tmp_path, capsys, made_by):
    """Today a copied .autolabel-export.json let `export --format coco --out DATASET --overwrite` delete
    images/, labels/ and data.yaml of a hand-made YOLO dataset."""
    code, _, err = _cli(capsys, "export", str(home / "run"), "--format", "yolo", "--out", str(tmp_path / "real"), "--quiet")
    assert code == 0, err
    marker = json.loads((tmp_path / "real" / MARKER).read_text())
    dataset = _yolo_dataset(tmp_path / "dataset")
    if made_by == "this version":
        shutil.copy(tmp_path / "real" / MARKER, dataset / MARKER)
        expected = f"holds a {MARKER} written for file://{tmp_path / 'real'}, not for this folder"
    else:
        legacy = {k: v for k, v in marker.items() if k not in ("location", "export_id", "files", "run_id")}
        (dataset / MARKER).write_text(json.dumps(legacy))
        expected = "but also images/train/cat.jpg, labels/train/cat.txt, which are not part of it"
    before = tree(dataset)
    for out in (dataset, f"{dataset}/labels/..", f"file://{dataset}/"):
        code, _, err = _cli(capsys, "export", str(home / "run"), "--format", "coco", "--out", str(out), "--overwrite", "--quiet")
        assert tree(dataset) == before, "nothing may be touched"
        assert code == 2, err
        assert expected in err and "nothing there was touched" in err
    assert marker["location"] == f"file://{tmp_path / 'real'}" and len(marker["export_id"]) == 32
    assert sorted(marker["files"]) == sorted(str(p.relative_to(tmp_path / "real")) for p in (tmp_path / "real").rglob("*")
                                             if p.is_file() and p.name != MARKER)


def test_export_overwrite_removes_exactly_the_recorded_files(home, tmp_path, capsys):
    """A file named as the format names its files, but not in the marker's list, is not the export's."""
    dest = tmp_path / "exp"
    assert _cli(capsys, "export", str(home / "run"), "--format", "yolo", "--out", str(dest), "--quiet")[0] == 0
    stranger = dest / "images" / "train" / "mine-0123456789abcdef.jpg"
    stranger.write_bytes(b"placed by hand")
    before = tree(dest)
    code, _, err = _cli(capsys, "export", str(home / "run"), "--format", "coco", "--out", f"{dest}/./", "--overwrite", "--quiet")
    assert code == 2 and "but also images/train/mine-0123456789abcdef.jpg, which are not part of it" in err
    assert tree(dest) == before
    stranger.unlink()
    code, _, err = _cli(capsys, "export", str(home / "run"), "--format", "coco", "--out", str(dest), "--overwrite", "--quiet")
    assert code == 0, err
    assert sorted(p.name for p in dest.iterdir()) == sorted([MARKER, "instances.json"])  # yolo's folders went with their files


def test_export_overwrite_on_s3_is_bound_to_its_location(home, tmp_path, s3):
    """The same rules on an object store: a genuine export is replaced; a marker copied elsewhere is not a licence."""
    import fsspec

    fs = fsspec.filesystem("s3", **s3.options)
    export(str(home / "run"), "png", f"s3://runs/{tmp_path.name}/exp/", progress=False, storage_options=s3.options)
    marker = json.loads(fs.cat_file(f"runs/{tmp_path.name}/exp/{MARKER}"))
    copy_root = f"runs/{tmp_path.name}/dataset"
    for rel, data in {"images/train/cat.jpg": b"photo", "data.yaml": b"names: {0: cat}", MARKER: json.dumps(marker).encode()}.items():
        _put(fs, f"{copy_root}/{rel}", data)
    before = _keys(fs, copy_root)
    with pytest.raises(ExportError, match=f"written for s3://runs/{tmp_path.name}/exp, not for this folder"):
        export(str(home / "run"), "coco", f"s3://runs/{tmp_path.name}/x/../dataset", overwrite=True, progress=False,
               storage_options=s3.options)
    assert _keys(fs, copy_root) == before
    assert marker["location"] == f"s3://runs/{tmp_path.name}/exp"
    export(str(home / "run"), "coco", f"s3://runs/{tmp_path.name}/exp", overwrite=True, progress=False, storage_options=s3.options)
    assert sorted(_keys(fs, f"runs/{tmp_path.name}/exp")) == sorted([MARKER, "instances.json"])


# ------------------------------------------------------------------------------ a real run: review, resume


def _reject_object_zero(run: Path, tmp_path: Path) -> Path:
    """A Label Studio JSON export in which a person deleted region o0 (object 0) of the first task."""
    export(str(run), "labelstudio", str(tmp_path / "ls"), progress=False)
    task = next(t for t in json.loads((tmp_path / "ls" / "tasks.json").read_text()) if "o0" in t["data"]["autolabel"]["objects"])
    result = [r for r in task["predictions"][0]["result"] if r["id"] != "o0"]
    reviewed = [{"id": 1, "data": task["data"], "predictions": [], "annotations": [
        {"id": 1, "completed_by": 1, "was_cancelled": False, "result": result,
         "created_at": "2026-02-02T10:00:00Z", "updated_at": "2026-02-02T10:00:00Z"}]}]
    (tmp_path / "reviewed.json").write_text(json.dumps(reviewed))
    shutil.rmtree(tmp_path / "ls")
    return tmp_path / "reviewed.json"


def _coco_object_ids(run: Path, tmp_path: Path) -> list[int]:
    out = tmp_path / "coco-check"
    export(str(run), "coco", str(out), progress=False)
    ids = sorted(a["object_id"] for a in json.loads((out / "instances.json").read_text())["annotations"])
    shutil.rmtree(out)
    return ids


def test_run_overwrite_clears_the_runs_review_decisions(ray_local, checkpoints, photo_folder, tmp_path):
    """Today review/ outlived `run --overwrite`: run A, object 0 rejected, overwritten by run B: B's
    object 0 was missing from every export and the report."""
    from pipeline.config import load_config
    from pipeline.outputs.review import import_review
    from pipeline.outputs.rundata import RunData
    from pipeline.run.job import run

    (tmp_path / "single").mkdir()
    shutil.copy(photo_folder / "zidane.jpg", tmp_path / "single" / "zidane.jpg")
    out = tmp_path / "out"
    overrides = [f"input.uri={tmp_path / 'single'}", f"output.uri={out}", *model_overrides(checkpoints)]
    first = run(load_config(None, overrides))
    assert first["totals"]["objects"] >= 1
    every = _coco_object_ids(out, tmp_path)
    assert 0 in every
    result = import_review(str(out), str(_reject_object_zero(out, tmp_path)))
    assert result.decisions["rejected"] == 1
    assert _coco_object_ids(out, tmp_path) == [i for i in every if i != 0]
    export(str(out), "coco", progress=False)  # RUN/exports/coco: the run's too
    (out / "my-notes.md").write_text("stays")

    second = run(load_config(None, [*overrides, f"output.uri={out}/images/.."]), overwrite=True)  # run B
    assert second["status"] == "finished" and second["run_id"] != first["run_id"]
    assert second["location"] == first["location"] == f"file://{out}"
    assert not (out / "review").exists() and not (out / "exports").exists()
    assert (out / "my-notes.md").read_text() == "stays"
    assert not RunData(str(out)).review
    assert 0 in _coco_object_ids(out, tmp_path)


def test_resume_ignores_a_trailing_slash_and_performance_keys(real_run):
    """Today `input.uri=photos/` after `input.uri=photos` was refused as a different configuration.
    ray.* and sam.batch_size only change speed: they may differ between attempts."""
    from pipeline.config import load_config
    from pipeline.run.job import run

    single = real_run["root"] / "single"
    for extra in ([f"input.uri={single}/"], [f"input.uri={single}/./"], ["sam.batch_size=3", "ray.sam_actors=1", "ray.num_cpus=1"]):
        again = run(load_config(None, [*real_run["overrides"], *extra]))
        assert again["note"] == "already finished; nothing was redone", extra
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match="different configuration"):
        run(load_config(None, [*real_run["overrides"], "detector.conf=0.05"]))


def test_a_fingerprint_written_with_a_trailing_slash_still_resumes(real_run):
    """run.json files of the previous version hold input.uri as typed (``photos/``); they still resume."""
    import hashlib as _hashlib

    from pipeline.config import load_config
    from pipeline.run.folder import RunFolder, fingerprint

    now = fingerprint(load_config(None, real_run["overrides"]), real_run["manifest"]["models"])
    config = json.loads(json.dumps(now["config"]))
    config["input"]["uri"] += "/"
    old = {"config": config, "models": now["models"],
           "sha256": _hashlib.sha256(json.dumps({"config": config, "models": now["models"]}, sort_keys=True).encode()).hexdigest()}
    folder = RunFolder(load_config(None, real_run["overrides"]))
    folder.check_resumable({"fingerprint": old}, now)  # no ConfigError
