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
import shutil
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import autolabel_cli, model_overrides
from synthetic_run import write_synthetic_run

from pipeline.cli import main
from pipeline.export import ExportError, export

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
    from pipeline.job import run

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
    (out / "_staging" / "shard-x").mkdir(parents=True)
    (out / "_staging" / "shard-x" / "images-stale.parquet").write_bytes(b"left by a crash")
    keep = {k: v for k, v in tree(out).items()
            if k in ("README.md", "exports/mine", "exports/mine/hand-made.json", "report/my-notes.md", "exports/coco/my-notes.txt")}
    old_parts = {p.name for p in (out / "images").glob("*.parquet")}

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
    assert not old_parts & {p.name for p in (out / "images").glob("*.parquet")}
    assert pq.read_table(out / "images").num_rows == 1
    assert (out / "report" / "report.html").read_text() != "old report"
