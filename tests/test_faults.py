"""Exactly once: real SIGKILLs of a Ray worker and of the driver, poison images, CUDA OOM
(injected: a CPU cannot run out of GPU memory), a read-only and a full output disk, resume.

Every faulted run is compared with a clean run of the same config: the same (image_id,
object_id, candidate, mask) rows, each exactly once.
"""
from __future__ import annotations

import io
import json
import os
import select
import shutil
import signal
import subprocess
import tarfile
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import autolabel_cli, real_photos, run_overrides
from session_processes import SESSION_ENV, started_by
from pipeline.config import load_config
from pipeline.run.job import run

SEGMENTER_TITLE = "ray::MapWorker(MapBatches(Segmenter))"
DETECTOR_TITLE = "ray::MapWorker(MapBatches(Detector))"


@pytest.fixture(scope="module")
def fault_images(tmp_path_factory) -> Path:
    """Ten real photos (five, and their mirror images), small so a run takes seconds per image."""
    folder = tmp_path_factory.mktemp("fault-images")
    for name, rgb in real_photos().items():
        for k, pixels in enumerate((rgb, rgb[:, ::-1].copy())):
            img = Image.fromarray(pixels)
            img.thumbnail((320, 320))
            img.save(folder / f"{name}{k}.jpg", quality=92)
    return folder


def fault_overrides(images: Path, out: Path, checkpoints: dict) -> list[str]:
    # One image per shard, so shards are committed while the job runs. One image per detector
    # call and per SAM encoder batch: which images share a batch depends on timing, and batching
    # moves boxes and logits in their last float bits, which would make two clean runs differ by
    # a mask pixel now and then.
    # One prompt per mask-decoder call, for the same reason: the decoder's CPU kernels give a
    # prompt's logits other last float bits in a call of 4 prompts than alone (a 1-pixel flip at
    # IoU 0.99998 was seen), and an injected OOM splits calls down to one prompt each.
    # One SAM actor: the kill test kills "the" segment worker.
    return [*run_overrides(images, out, checkpoints), "input.shard_size=1", "detector.batch_size=1", "sam.batch_size=1",
            "sam.box_chunk=1", "ray.sam_actors=1", "report.enabled=false"]


def read_run(out: Path) -> dict:
    images = pq.read_table(out / "images").to_pandas()
    objects = pq.read_table(out / "objects").to_pandas()
    return {"images": images, "objects": objects, "manifest": json.loads((out / "run.json").read_text())}


def mask_rows(objects) -> list[tuple]:
    return sorted(
        (r.image_id, r.object_id, r.candidate, r.status, None if r.mask is None else r.mask["counts"])
        for r in objects.itertuples()
    )


def assert_exactly_once(result: dict, expected: dict, skip_uris: tuple[str, ...] = ()) -> None:
    """Same rows as the clean run (except images named in ``skip_uris``), none twice."""
    images, objects = result["images"], result["objects"]
    assert images["image_id"].is_unique, "an image has two rows"
    assert not objects.duplicated(["image_id", "object_id", "candidate"]).any(), "an object has two rows"
    keep = lambda df: df[~df["uri"].str.contains("|".join(skip_uris))] if skip_uris else df  # noqa: E731
    assert mask_rows(keep(objects)) == mask_rows(keep(expected["objects"]))
    columns = ["image_id", "uri", "status", "num_objects"]
    got = keep(images)[columns].sort_values("image_id").reset_index(drop=True)
    want = keep(expected["images"])[columns].sort_values("image_id").reset_index(drop=True)
    assert got.equals(want)


@pytest.fixture(scope="module")
def clean(ray_local, checkpoints, fault_images, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("clean") / "out"
    manifest = run(load_config(None, fault_overrides(fault_images, out, checkpoints)))
    assert manifest["status"] == "finished" and manifest["totals"]["ok"] == 10
    result = read_run(out)
    assert result["manifest"]["totals"]["objects"] > 10, "the comparison needs objects to compare"
    return result


def done_markers(out: Path) -> list[Path]:
    return sorted((out / "_done").glob("shard-*.json")) if (out / "_done").is_dir() else []


def pids_titled(title: str) -> list[int]:
    """This session's processes (never another's on the machine: session_processes.py) whose
    command line (Ray's process title) starts with ``title``."""
    pids = []
    for pid in started_by(os.environ[SESSION_ENV]):
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").startswith(title):
                pids.append(pid)
        except OSError:
            pass
    return pids


def wait_for(condition, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def test_sigkill_of_each_actor_loses_and_duplicates_nothing(ray_local, checkpoints, fault_images, clean, tmp_path):
    """One run, a SIGKILL for an actor of each pool: the detector actor (the faster one: it could
    be done by then) as soon as its process is up, then the segment actor once a shard is
    committed. Ray restarts each from the constructor arguments Ray Data keeps in the object store
    (Ray issue #53727; job.py build_dataset), and the run ends as the clean one did."""
    out = tmp_path / "out"
    cfg = load_config(None, fault_overrides(fault_images, out, checkpoints))
    outcome: dict = {}
    titles = (DETECTOR_TITLE, SEGMENTER_TITLE)
    earlier = {title: set(pids_titled(title)) for title in titles}  # actors of earlier runs may still be shutting down
    exited, done_at_kill = {}, {}
    job = threading.Thread(target=lambda: outcome.update(manifest=run(cfg)))
    job.start()
    try:
        for title in titles:
            if title == SEGMENTER_TITLE:
                wait_for(lambda: len(done_markers(out)) >= 1, 300, "the first shard to be committed")
            (pid,) = wait_for(lambda: set(pids_titled(title)) - earlier[title], 300, f"this job's {title} process")
            handle = os.pidfd_open(pid)  # follows this process, not whatever later reuses its pid
            done_at_kill[title] = len(done_markers(out))
            os.kill(pid, signal.SIGKILL)
            exited[title], _, _ = select.select([handle], [], [], 30)
            os.close(handle)
    finally:
        job.join(timeout=600)
    for title in titles:
        assert exited[title], f"the actor's worker died: {title}"
        assert done_at_kill[title] < 10, f"the kill must land in the middle of the job: {title}"
    assert outcome["manifest"]["status"] == "finished"
    result = read_run(out)
    assert (result["images"]["status"] == "ok").all()
    assert_exactly_once(result, clean)
    assert not (out / "_staging").exists()


def test_poison_images_become_worker_crash_rows_and_oom_retries_smaller_chunks(ray_local, checkpoints, fault_images, clean, tmp_path, monkeypatch):
    """Test-only hooks (AUTOLABEL_TEST_FAULTS) SIGKILL the decode, detect and segment workers
    every time they start one chosen image each, and raise CUDA OOM in SAM's decoder for more
    than one prompt at a time, and always for a fourth image.

    This run asks for 64 prompts per decoder call, so every image of several objects hits the
    OOM and is split in halves down to one prompt per call; the clean run decodes one prompt per
    call (fault_overrides), so the masks must agree bit for bit: a split that lost, repeated,
    misplaced or mixed prompts would show. (Against a clean run of 64 prompts per call they
    would not: CPU kernels round a prompt's logits differently in a batch of 4 than alone.)"""
    monkeypatch.setenv("AUTOLABEL_TEST_FAULTS", json.dumps({
        "kill": {"decode": "bus1", "detect": "zidane1", "segment": "astronaut1"},
        "oom_uri": "coffee1", "oom_over_prompts": 1,
    }))
    out = tmp_path / "out"
    manifest = run(load_config(None, [*fault_overrides(fault_images, out, checkpoints), "ray.max_image_crashes=2",
                                           "sam.box_chunk=64"]))
    assert manifest["status"] == "finished"
    result = read_run(out)
    by_name = {Path(u).stem: row for u, row in zip(result["images"]["uri"], result["images"].itertuples())}
    for name, stage in (("bus1", "decode"), ("zidane1", "detect"), ("astronaut1", "segment")):
        row = by_name[name]
        assert (row.status, row.error_class) == ("error", "worker_crash"), name
        assert f"the {stage} worker died 2 times" in row.error
    assert (by_name["coffee1"].status, by_name["coffee1"].error_class) == ("error", "oom")
    assert "even one prompt at a time" in by_name["coffee1"].error
    assert manifest["totals"]["errors_by_class"] == {"worker_crash": 3, "oom": 1}
    deaths = {key.split(":", 1)[0] + ":" + Path(key).stem: n for key, n in manifest["worker_deaths"].items()}
    assert {deaths["decode:bus1"], deaths["detect:zidane1"], deaths["segment:astronaut1"]} == {2}
    # Everything else is exactly the clean run, though every multi-object image hit OOM first.
    assert max(clean["images"]["num_objects"]) > 1
    assert (manifest["config"]["sam"]["box_chunk"], clean["manifest"]["config"]["sam"]["box_chunk"]) == (64, 1)
    assert_exactly_once(result, clean, skip_uris=("bus1", "zidane1", "astronaut1", "coffee1"))


def test_sigkill_of_the_driver_then_the_same_command_resumes(checkpoints, fault_images, clean, tmp_path):
    out = tmp_path / "out"
    command = [*autolabel_cli(), "run", *fault_overrides(fault_images, out, checkpoints)]
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(lambda: len(done_markers(out)) >= 2, 300, "two shards to be committed")
        os.kill(first.pid, signal.SIGKILL)  # the driver only; its Ray dies with it
        first.wait(timeout=60)
    finally:
        time.sleep(2)
        try:
            os.killpg(first.pid, signal.SIGKILL)  # Ray helpers the driver's death left behind
        except ProcessLookupError:
            pass
    done_before = {m.name: (m.stat().st_mtime_ns, m.read_bytes()) for m in done_markers(out)}
    kept = {p.name: p.stat().st_mtime_ns for p in (out / "images").glob("shard-*.parquet") if p.name.replace(".parquet", ".json") in done_before}
    assert 2 <= len(done_before) < 10, "the driver must die in the middle of the job"
    assert json.loads((out / "run.json").read_text())["status"] == "running"

    again = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{len(done_before)} of 10 shards already done" in again.stderr
    assert f"({len(done_before)} done before this attempt, {10 - len(done_before)} images labeled in it)" in again.stdout
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["progress"]["shards_done_before_this_attempt"] == len(done_before)
    assert manifest["progress"]["images_this_attempt"] == 10 - len(done_before)
    assert len(manifest["attempts"]) == 2 and manifest["totals"]["images"] == 10
    for name, (mtime, data) in done_before.items():  # finished shards were not recomputed
        marker = out / "_done" / name
        assert (marker.stat().st_mtime_ns, marker.read_bytes()) == (mtime, data)
    assert kept and all((out / "images" / n).stat().st_mtime_ns == t for n, t in kept.items())
    assert_exactly_once(read_run(out), clean)

    # The same command once more: nothing to do. A changed config: refused, nothing touched.
    third = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert third.returncode == 0 and "already finished; nothing was redone" in third.stdout
    changed = subprocess.run([*command, "detector.conf=0.05"], capture_output=True, text=True, timeout=300)
    assert changed.returncode == 2
    assert "different configuration" in changed.stderr and "detector.conf: 0.04 -> 0.05" in changed.stderr
    assert "--overwrite" in changed.stderr
    assert json.loads((out / "run.json").read_text()) == manifest


def test_overwrite_starts_clean(ray_local, checkpoints, fault_images, clean, tmp_path):
    out = tmp_path / "out"
    overrides = fault_overrides(fault_images, out, checkpoints)
    (out / "_staging" / "shard-000003").mkdir(parents=True)
    (out / "_staging" / "shard-000003" / "images-0123456789abcdef.parquet").write_bytes(b"left by a crash")
    (out / "run.json").write_text(json.dumps({"status": "running", "fingerprint": {"sha256": "another run"}}))
    with pytest.raises(Exception, match="different configuration"):
        run(load_config(None, overrides))
    manifest = run(load_config(None, overrides), overwrite=True)
    assert manifest["status"] == "finished" and len(manifest["attempts"]) == 1
    assert manifest["progress"]["shards_done_before_this_attempt"] == 0
    assert not (out / "_staging").exists()
    assert_exactly_once(read_run(out), clean)


def test_a_resume_in_another_dtype_is_refused(ray_local, checkpoints, fault_images, tmp_path):
    """sam.dtype=auto is bfloat16 on a GPU and float32 on a CPU: a run started on one and resumed
    on the other would mix the two in one dataset. The first attempt runs in bfloat16 (CPU
    autocast, standing in for a GPU node); its interruption is simulated by removing one shard's
    done marker and files (the real driver kill is tested above). A resume with sam.dtype=auto
    (float32 here) is refused before any work, naming the dtypes; with sam.dtype=bfloat16 it
    resumes."""
    images = tmp_path / "images"
    images.mkdir()
    for name in ("coffee0.jpg", "chelsea0.jpg"):
        shutil.copy(fault_images / name, images / name)
    out = tmp_path / "out"
    overrides = fault_overrides(images, out, checkpoints)
    first = run(load_config(None, [*overrides, "sam.dtype=bfloat16"]))
    assert first["status"] == "finished" and first["fingerprint"]["config"]["sam"]["dtype"] == "bfloat16"
    manifest = json.loads((out / "run.json").read_text())
    for path in (out / "_done" / "shard-000001.json", out / "images" / "shard-000001.parquet", out / "objects" / "shard-000001.parquet"):
        path.unlink()
    (out / "run.json").write_text(json.dumps({**manifest, "status": "failed"}))
    before = (out / "run.json").read_bytes()
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match=r"sam.dtype: 'bfloat16' -> 'float32'(.|\n)*segmented in another dtype"):
        run(load_config(None, overrides))
    assert (out / "run.json").read_bytes() == before and not (out / "_done" / "shard-000001.json").exists()
    stale = out / "summaries" / "shard-000001.parquet"  # the interrupted shard's summary, left behind
    stale.write_bytes(b"left behind")
    resumed = run(load_config(None, [*overrides, "sam.dtype=bfloat16"]))
    assert resumed["status"] == "finished" and resumed["progress"]["shards_done_before_this_attempt"] == 1
    assert resumed["totals"]["images"] == 2
    # The resumed run's report: both shards from their summaries (the stale one was removed and written
    # again by the shard's new commit), and the numbers equal a scan of every row.
    assert stale.read_bytes() != b"left behind"
    from test_counting import assert_merged_equals_scan

    how = assert_merged_equals_scan(out, tmp_path / "report")
    assert (how["from_summaries"], how["scanned"]) == (2, 0)


def _unshare_works() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs tmpfs /mnt"], capture_output=True)
    return probe.returncode == 0


needs_mount_namespace = pytest.mark.skipif(
    not _unshare_works(), reason="needs `unshare -rm` (user + mount namespaces) to mount a private tmpfs"
)


@needs_mount_namespace
def test_read_only_output_fails_before_any_work(checkpoints, fault_images, tmp_path):
    mount = tmp_path / "ro"
    mount.mkdir()
    overrides = fault_overrides(fault_images, mount / "run", checkpoints)
    script = f'mount -t tmpfs -o ro tmpfs "{mount}" && exec "$@"'
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", *autolabel_cli(), "run", *overrides],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"output.uri {mount / 'run'} cannot be written" in proc.stderr and "Read-only file system" in proc.stderr
    assert "actors:" not in proc.stderr, "it must fail before Ray starts"


@needs_mount_namespace
def test_disk_full_mid_run_fails_loudly_then_resumes_to_the_clean_output(checkpoints, fault_images, clean, tmp_path):
    """A private 16 MiB tmpfs as the output disk, filled up by `dd` once the first shard is done."""
    mount, logs = tmp_path / "disk", tmp_path / "logs"
    mount.mkdir()
    logs.mkdir()
    overrides = fault_overrides(fault_images, mount / "run", checkpoints)
    script = f"""
    mount -t tmpfs -o size=16m tmpfs "{mount}" || exit 90
    "$@" > "{logs}/first.out" 2> "{logs}/first.err" &
    pid=$!
    while [ "$(ls "{mount}/run/_done" 2>/dev/null | wc -l)" -lt 1 ] && kill -0 $pid 2>/dev/null; do sleep 0.05; done
    dd if=/dev/zero of="{mount}/filler" bs=64k 2>/dev/null
    wait $pid; echo $? > "{logs}/first.rc"
    ls "{mount}/run/_done" | wc -l > "{logs}/done.count"
    rm "{mount}/filler"
    "$@" > "{logs}/second.out" 2> "{logs}/second.err"; echo $? > "{logs}/second.rc"
    cp -r "{mount}/run" "{tmp_path}/copied"
    """
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", *autolabel_cli(), "run", *overrides],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    first_err = (logs / "first.err").read_text()
    assert (logs / "first.rc").read_text().strip() == "1", first_err[-3000:]
    assert "the job failed: cannot write" in first_err and "No space left on device" in first_err
    assert f"{mount}/run/" in first_err.split("the job failed: cannot write", 1)[1], "the message names the path"
    done = int((logs / "done.count").read_text())
    assert 1 <= done < 10
    assert (logs / "second.rc").read_text().strip() == "0", (logs / "second.err").read_text()[-3000:]
    assert f"{done} of 10 shards already done" in (logs / "second.err").read_text()
    assert_exactly_once(read_run(tmp_path / "copied"), clean)


# --- the pieces, without Ray -----------------------------------------------------------------

def _stage(batch_rows: list[dict], run_dir: Path) -> None:
    from pipeline.run.sink import write_batch
    from pipeline.stages.segment import OBJECT_TYPE

    objects = [[{"object_id": 0, "object_key": None, "source": "detector", "prompt": "box", "candidate": 0, "status": "ok",
                 "error": None, "class_id": 1, "class_name": "cat", "det_score": 0.5, "mask_score": 0.9,
                 "box": [0, 0, 1, 1], "area": 1, "mask": {"size": [2, 2], "counts": "0"}}] for _ in batch_rows]
    table = pa.table({
        "shard_id": [r["shard_id"] for r in batch_rows], "uri": [r["uri"] for r in batch_rows],
        "image_id": [r["image_id"] for r in batch_rows], "shard_rows": [2] * len(batch_rows),
        "width": pa.array([2] * len(batch_rows), pa.int32()), "height": pa.array([2] * len(batch_rows), pa.int32()),
        "status": ["ok"] * len(batch_rows), "error_class": pa.array([None] * len(batch_rows), pa.string()),
        "error": pa.array([None] * len(batch_rows), pa.string()), "note": pa.array([None] * len(batch_rows), pa.string()),
    }).append_column(pa.field("objects", pa.list_(OBJECT_TYPE)), pa.array(objects, pa.list_(OBJECT_TYPE)))
    write_batch(table, str(run_dir))


def test_commit_keeps_each_image_once_when_a_retry_staged_it_again(tmp_path):
    """A task retried after writing (e.g. its output was lost with a node) stages the same
    images again, possibly batched differently: the shard file still has each image once."""
    import fsspec

    from pipeline.run.sink import commit_shard

    a = {"shard_id": "000007", "uri": "/x/a.jpg", "image_id": "a"}
    b = {"shard_id": "000007", "uri": "/x/b.jpg", "image_id": "b"}
    other = {"shard_id": "000008", "uri": "/x/c.jpg", "image_id": "c"}
    _stage([a, b, other], tmp_path)
    _stage([b], tmp_path)  # the retry, batched differently
    assert len(list((tmp_path / "_staging" / "shard-000007").glob("images-*.parquet"))) == 2
    marker = commit_shard(fsspec.filesystem("file"), str(tmp_path), "000007")
    images = pq.read_table(tmp_path / "images" / "shard-000007.parquet")
    objects = pq.read_table(tmp_path / "objects" / "shard-000007.parquet")
    assert images.column("image_id").to_pylist() == ["a", "b"] and objects.column("image_id").to_pylist() == ["a", "b"]
    assert marker["images"] == 2 and marker["objects"] == 2
    assert json.loads((tmp_path / "_done" / "shard-000007.json").read_text()) == marker
    assert not (tmp_path / "_staging" / "shard-000007").exists()
    assert (tmp_path / "_staging" / "shard-000008").exists(), "other shards are untouched"


def test_a_commit_task_retried_after_it_finished_changes_nothing(ray_local, tmp_path):
    """Commits run as Ray tasks (retried when their worker dies). One that had finished, and so
    removed the shard's staged parts, runs again: the committed shard is kept as it is, not
    rewritten from the (now empty) staging folder."""
    from pipeline.run.sink import ShardCommits, commit_shard_task

    rows = [{"shard_id": "000003", "uri": f"/x/{n}.jpg", "image_id": n} for n in ("a", "b")]
    _stage(rows, tmp_path)
    commits = ShardCommits(f"file://{tmp_path}", None, [], retries=1)
    commits.launch("000003")
    (marker,) = commits.finished(block=True)
    assert marker["images"] == 2 and not (tmp_path / "_staging" / "shard-000003").exists()
    shard = tmp_path / "images" / "shard-000003.parquet"
    before = (shard.stat().st_mtime_ns, shard.read_bytes())
    again = commit_shard_task(f"file://{tmp_path}", None, "000003")  # the retry
    assert again == marker and (shard.stat().st_mtime_ns, shard.read_bytes()) == before


@pytest.mark.parametrize("members", [16, 17, 3])
def test_tar_shard_rows_arrive_with_the_last_batch(tmp_path, members):
    """A tar's image count is known only after reading it; its last batch carries it."""
    from pipeline.stages.read import read_tar_batch

    tar_path = tmp_path / "shard.tar"
    with tarfile.open(tar_path, "w") as tf:
        for i in range(members):
            buf = io.BytesIO()
            Image.new("RGB", (4, 4), (i, 0, 0)).save(buf, format="PNG")
            info = tarfile.TarInfo(f"img{i:03d}.png")
            info.size = len(buf.getvalue())
            tf.addfile(info, io.BytesIO(buf.getvalue()))
    shard = pa.table({"shard_id": ["000000"], "uri": [str(tar_path)], "data": pa.array([None], pa.binary())})
    batches = list(read_tar_batch(shard, extensions=(".png",)))
    assert sum(b.num_rows for b in batches) == members
    assert all(set(b.column("shard_rows").to_pylist()) == {None} for b in batches[:-1])
    assert set(batches[-1].column("shard_rows").to_pylist()) == {members}


def test_tracker_completes_a_shard_once_all_its_images_are_staged():
    from pipeline.run.progress import ShardTracker

    tracker = ShardTracker(["000000", "000001", "000002"])
    assert tracker.add([{"shard_id": "000000", "image_id": "a", "shard_rows": 2}]) == []
    assert tracker.add([{"shard_id": "000000", "image_id": "a", "shard_rows": 2}]) == [], "a duplicate is not a second image"
    assert tracker.add([{"shard_id": "000001", "image_id": "c", "shard_rows": None},  # a tar: count not known yet
                        {"shard_id": "000000", "image_id": "b", "shard_rows": 2}]) == ["000000"]
    assert tracker.add([{"shard_id": "000001", "image_id": "d", "shard_rows": 2}]) == ["000001"]
    assert tracker.remaining() == ["000002"]
