"""Shared fixtures: offline-safe environment, random-weight checkpoints, real photos, local Ray."""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
_TMP = Path(tempfile.mkdtemp(prefix="autolabel-tests-"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from session_processes import SESSION_ENV, left_behind  # noqa: E402

# Every process the tests start inherits this marker; at the end none may still be alive.
os.environ[SESSION_ENV] = str(_TMP)
# Set before anything imports ultralytics (it does DNS look-ups and writes settings at import).
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_CONFIG_DIR", str(_TMP / "ultralytics"))
os.environ.setdefault("MPLCONFIGDIR", str(_TMP / "matplotlib"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("AUTOLABEL_LOG_DIR", str(_TMP / "logs"))  # `autolabel run`'s log files

from model_factory import make_sam_checkpoint, make_yolo_checkpoint  # noqa: E402

VENV_BIN = Path(sys.executable).parent
SAM_IMAGE_SIZE = 256  # lowered from 1024 so SAM runs in ~0.2 s per image on a CPU


@pytest.fixture(scope="session", autouse=True)
def _no_process_outlives_the_session():
    """Set up first, so torn down last: after every other fixture stopped what it started, no
    process of this session (session_processes.py) may be left; any that is fails the suite,
    named, and is killed."""
    yield
    leftovers = left_behind(str(_TMP))
    if leftovers:
        pytest.fail("processes started by the tests outlived the session (now killed):\n  " + "\n  ".join(leftovers), pytrace=False)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("checkpoints")
    return {
        "sam": make_sam_checkpoint(folder / "sam2.1_hiera_tiny.pt"),
        "yolo": make_yolo_checkpoint(folder / "yolov8n-random.pt"),
    }


@pytest.fixture(scope="session")
def yoloe_checkpoint(tmp_path_factory) -> Path:
    """A random-weight YOLOE-11s (BatchNorm calibrated on the real photos), saved as yoloe-11s-seg.pt:
    ultralytics binds prompt embeddings to that stem (yoloe-11s)."""
    from model_factory import make_open_vocab_checkpoint

    return make_open_vocab_checkpoint(tmp_path_factory.mktemp("yoloe") / "yoloe-11s-seg.pt", list(real_photos().values()))


def real_photos() -> dict[str, "np.ndarray"]:
    """Real photographs that ship inside installed packages (no downloads)."""
    import numpy as np
    import skimage.data
    from PIL import Image

    import ultralytics

    assets = Path(ultralytics.__file__).parent / "assets"
    # np.array, not asarray: writable, as SAM 2's tutorial makes them (torch warns about read-only arrays)
    photos = {name: np.array(Image.open(assets / f"{name}.jpg").convert("RGB")) for name in ("bus", "zidane")}
    for name in ("astronaut", "coffee", "chelsea"):
        photos[name] = skimage.data.__getattribute__(name)()
    return photos


@pytest.fixture(scope="session")
def photo_folder(tmp_path_factory) -> Path:
    """Five real photos (one in a sub-folder, one PNG) and one broken JPEG."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("photos")
    (folder / "nested").mkdir()
    for i, (name, rgb) in enumerate(real_photos().items()):
        target = folder / ("nested" if name == "chelsea" else "") / (f"{name}.png" if name == "coffee" else f"{name}.jpg")
        Image.fromarray(rgb).save(target, **({} if target.suffix == ".png" else {"quality": 92}))
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    (folder / "notes.txt").write_text("not an image, and not listed")
    return folder


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the in-process tests (2 CPUs, like CI)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


# Ray Data settings of a Python API user's process, each unlike what a run sets for its own dataset
# (pipeline.run.cluster.run_data_context), and the fields test_shared_process.py compares.
USER_DATA_CONTEXT = {"raise_original_map_exception": False, "wait_for_min_actors_s": 1234, "enable_progress_bars": True}
DATA_CONTEXT_FIELDS = (*USER_DATA_CONTEXT, "custom_execution_callback_classes")


@pytest.fixture(scope="session")
def labeled(ray_local, checkpoints, photo_folder, tmp_path_factory):
    """The photo folder labeled once, in-process on the local Ray; many tests read its output.

    It runs as in a Python API user's process with Ray Data settings of its own
    (``USER_DATA_CONTEXT``); ``data_context`` records them before and after the run, for
    test_shared_process.py, and they are put back to the session's afterwards."""
    import logging

    import pyarrow.parquet as pq
    import ray.data

    from pipeline.config import load_config
    from pipeline.run.job import run

    out = tmp_path_factory.mktemp("run") / "out"
    overrides = run_overrides(photo_folder, out, checkpoints)
    cfg = load_config(None, overrides)
    context = ray.data.DataContext.get_current()
    session_values = {name: getattr(context, name) for name in USER_DATA_CONTEXT}
    progress_log = logging.getLogger("ray.data._internal.progress")

    def settings() -> dict:
        current = ray.data.DataContext.get_current()
        return {"context": current, "fields": {name: getattr(current, name) for name in DATA_CONTEXT_FIELDS},
                "progress_level": progress_log.level}

    for name, value in USER_DATA_CONTEXT.items():
        setattr(context, name, value)
    try:
        before = settings()
        manifest = run(cfg)
        after = settings()
    finally:
        for name, value in session_values.items():
            setattr(context, name, value)
    return {
        "manifest": manifest,
        "out": out,
        "images": pq.read_table(out / "images").to_pandas(),
        "objects": pq.read_table(out / "objects").to_pandas(),
        "cfg": cfg,
        "cfg_overrides": overrides,
        "data_context": {"before": before, "after": after},
    }


def counted_objects(objects):
    """Rows of an objects table that are objects: not invalid-prompt rows, not extra SAM candidates
    (what ``num_objects`` counts)."""
    return objects[(objects["status"] == "ok") & (objects["candidate"] == 0)]


def model_overrides(checkpoints: dict) -> list[str]:
    return [
        f"sam.checkpoint={checkpoints['sam']}",
        f"detector.weights={checkpoints['yolo']}",
        f"sam.image_size={SAM_IMAGE_SIZE}",
        "detector.conf=0.04",
        "detector.max_det=4",
        "detector.imgsz=320",
    ]


def autolabel_cli() -> list[str]:
    return [str(VENV_BIN / "autolabel")]


def run_overrides(photo_folder: Path, out: Path, checkpoints: dict) -> list[str]:
    """The configuration of the shared labeled run (also used to submit the same job to a cluster)."""
    # Two SAM actors; one image per detector call makes one block per image, arriving faster than
    # SAM finishes one, so they spread over both actors (test_e2e checks it).
    # sam.device=cpu: submitted to a cluster without GPUs, the job would otherwise wait for one.
    return [f"input.uri={photo_folder}", f"output.uri={out}", "input.shard_size=2", "detector.batch_size=1", "ray.sam_actors=2",
            "sam.batch_size=1", "sam.device=cpu", *model_overrides(checkpoints)]


@pytest.fixture(scope="session", autouse=True)
def _cleanup_tmp():
    yield
    shutil.rmtree(_TMP, ignore_errors=True)
