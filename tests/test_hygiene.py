"""The test suite's own rules: a warning from our code fails its test, and the session-end check
finds the processes this session started, and only those."""
from __future__ import annotations

import os
import subprocess
import sys

from conftest import REPO
from session_processes import SESSION_ENV, left_behind, started_by, using


def test_a_warning_from_our_code_fails_its_test_and_a_library_s_only_shows(tmp_path):
    (tmp_path / "test_w.py").write_text(
        "import warnings\n"
        "def test_ours():\n"
        "    warnings.warn_explicit('new in our code', UserWarning, 'pipeline/sam/model.py', 1, module='pipeline.sam.model')\n"
        "def test_a_library_s():\n"
        "    warnings.warn_explicit('new in a library', UserWarning, 'somelib.py', 1, module='somelib')\n"
        "def test_a_library_named_like_us():\n"
        "    warnings.warn_explicit('not ours', UserWarning, 'pipelines.py', 1, module='pipelines')\n"
    )
    proc = subprocess.run([sys.executable, "-m", "pytest", "-c", str(REPO / "pyproject.toml"), "--rootdir", str(tmp_path),
                           "-p", "no:cacheprovider", "-q", str(tmp_path / "test_w.py")],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert "_ test_ours _" in proc.stdout and "E       UserWarning: new in our code" in proc.stdout, proc.stdout
    assert "1 failed, 2 passed, 2 warnings" in proc.stdout, proc.stdout


def test_a_process_with_this_session_s_marker_is_found_and_one_without_is_not(tmp_path):
    session = os.environ[SESSION_ENV]
    sleeper = [sys.executable, "-c", "import time; time.sleep(600)"]
    ours = subprocess.Popen(sleeper, start_new_session=True)  # inherits the marker, even in a session of its own
    other = subprocess.Popen(sleeper, env={**os.environ, SESSION_ENV: str(tmp_path)})  # another session's
    unmarked = subprocess.Popen(sleeper, env={k: v for k, v in os.environ.items() if k != SESSION_ENV})
    try:
        found = started_by(session)
        assert ours.pid in found
        assert other.pid not in found and unmarked.pid not in found
        assert started_by(str(tmp_path)) == [other.pid]

        described = left_behind(str(tmp_path), grace_s=0.5)  # other's session "ended" with it alive
        assert len(described) == 1 and described[0].startswith(f"pid {other.pid}: {sys.executable} -c import time")
        assert other.wait(timeout=10) == -9 and started_by(str(tmp_path)) == []
    finally:
        for proc in (ours, other, unmarked):
            proc.kill()
            proc.wait()
    assert ours.pid not in started_by(session)  # reaped: nothing left for the session-end check


def test_the_processes_working_in_a_folder_are_found_by_it(tmp_path):
    """How the cluster harness finds a node's processes outside its session (a job's driver)."""
    (tmp_path / "node").mkdir()
    inside = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], cwd=tmp_path / "node", start_new_session=True)
    with open(tmp_path / "node" / "worker.err", "wb") as err:
        logging_there = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], stderr=err)
    elsewhere = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], cwd=tmp_path)
    try:
        assert sorted(using(str(tmp_path / "node"))) == sorted([inside.pid, logging_there.pid])
    finally:
        for proc in (inside, logging_there, elsewhere):
            proc.kill()
            proc.wait()
    assert using(str(tmp_path / "node")) == []
