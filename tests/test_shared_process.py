"""A Python API user's process is shared with the job (issue 16, item 17): ``pipeline.run.job.run``
sets Ray Data's ``DataContext`` for its own dataset (original exceptions, waiting for the first
actors, no Ray Data progress bars) and puts the process's own back afterwards, the very object
with the values it had.

The run is the session's ``labeled`` run (conftest.py), made in this process with the user's own
settings (``USER_DATA_CONTEXT``), each unlike what the run sets; the fixture records the settings
just before and just after the run."""
from __future__ import annotations

from conftest import USER_DATA_CONTEXT


def test_a_run_leaves_the_process_s_ray_data_settings_as_they_were(labeled):
    before, after = labeled["data_context"]["before"], labeled["data_context"]["after"]
    assert {name: before["fields"][name] for name in USER_DATA_CONTEXT} == USER_DATA_CONTEXT  # the user's, as set
    assert labeled["manifest"]["status"] == "finished" and labeled["manifest"]["totals"]["images"] == 6
    assert after["context"] is before["context"]
    assert after["fields"] == before["fields"]
    assert after["progress_level"] == before["progress_level"]
