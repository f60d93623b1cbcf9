"""A Python API user's process is shared with the job (issue 16, item 17): ``pipeline.run.job.run``
sets Ray Data's ``DataContext`` for its own dataset (original exceptions, waiting for the first
actors, no Ray Data progress bars) and puts the process's own back afterwards, the very object
with the values it had."""
from __future__ import annotations

import logging
import shutil

from conftest import run_overrides
from pipeline.config import load_config
from pipeline.run.job import run

FIELDS = ("raise_original_map_exception", "wait_for_min_actors_s", "enable_progress_bars", "custom_execution_callback_classes")


def test_a_run_leaves_the_process_s_ray_data_settings_as_they_were(ray_local, photo_folder, checkpoints, tmp_path):
    import ray

    images = tmp_path / "photos"
    images.mkdir()
    for name in ("bus.jpg", "astronaut.jpg"):
        shutil.copy(photo_folder / name, images / name)
    context = ray.data.DataContext.get_current()
    # The user's own settings, each unlike what the run sets.
    context.raise_original_map_exception, context.wait_for_min_actors_s, context.enable_progress_bars = False, 1234, True
    progress_log = logging.getLogger("ray.data._internal.progress")
    level = progress_log.level
    before = {name: getattr(context, name) for name in FIELDS}
    manifest = run(load_config(None, [*run_overrides(images, tmp_path / "out", checkpoints), "input.shard_size=1", "report.enabled=false"]))
    assert manifest["status"] == "finished" and manifest["totals"]["images"] == 2
    assert ray.data.DataContext.get_current() is context
    assert {name: getattr(context, name) for name in FIELDS} == before
    assert progress_log.level == level
