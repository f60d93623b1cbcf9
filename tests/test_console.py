"""What a person sees: a healthy ``autolabel run`` prints our own lines and the summary, nothing else.

The run is the one a new user makes: the console script in a subprocess, a fresh HOME (no
ultralytics settings, no Ray token, no matplotlib cache), YOLO_CONFIG_DIR and RAY_AUTH_MODE
unset, random-weight checkpoints from tests/model_factory at sam.image_size=256. What the libraries
say must be in the run's log file instead (and the first of our lines names that file).

Our lines are recognised by their format, ``console.LINE_FORMAT`` with a logger of ours:
``<date> <time>,<ms> <LEVEL> <autolabel|pipeline>[.<module>]: <message>`` on stderr, and the
summary block (``autolabel run finished`` and its indented lines) on stdout.
"""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from conftest import autolabel_cli, model_overrides, real_photos

pytestmark = pytest.mark.slow

OUR_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) (autolabel|pipeline)(\.\w+)*: ")
# A line at WARNING or ERROR level in any of the formats seen here: Python logging (Ray's, ours,
# basicConfig's), ultralytics' emoji prefixes, Ray's C++ core (``[date time E pid tid]``), glog,
# Python warnings, tracebacks.
ALARMING = re.compile(r"\b(WARNING|WARN|ERROR|CRITICAL|FATAL)\b|⚠|❌|^\[[\d\-: ,.]+ [WEF] \d+ \d+\]|^[WEF]\d{4} \d\d:"
                      r"|\b\w*Warning: |^Traceback \(most recent call last\)|^\w*(Error|Exception): ")
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def alarming_lines_not_ours(text: str) -> list[str]:
    return [line for line in text.splitlines() if ALARMING.search(ANSI.sub("", line)) and not OUR_LINE.match(line)]


def test_the_classifier_tells_our_lines_from_the_libraries():
    """The lines of issue 21, as they were printed, are caught; ours pass."""
    before = """\
2026-12-06 06:16:40,997 WARNING autolabel: RANDOM WEIGHTS (sam.checkpoint=random): masks and boxes are meaningless
2026-12-06 06:16:41,774\tWARNING authentication_token_setup.py:85 -- Token authentication is enabled for this Ray cluster.
[2026-12-06 06:16:48,385 E 5718 5718] core_worker.cc:2465: Actor with class name: 'MapWorker(MapBatches(Detector))' ...
\x1b[36m(MapWorker(MapBatches(Segmenter)) pid=6070)\x1b[0m /w/pipeline/sam_batch.py:274: UserWarning: The given NumPy array is not writable
2026-12-06 06:17:11,445 ERROR pipeline.faults: segment: x.jpg crashed its worker 3 times
WARNING ⚠️ imgsz=[330] must be multiple of max stride 32, updating to [352]
  images     4  (ok 4, error 0)
"""
    assert alarming_lines_not_ours(before) == before.splitlines()[1:4] + [before.splitlines()[5]]


def test_the_console_passes_our_lines_and_sends_the_workers_other_output_to_the_log(tmp_path):
    """What Ray forwards from workers is recognised by its prefix; only our records pass."""
    import io

    from pipeline.run.console import _Console

    shown = io.StringIO()
    with open(tmp_path / "log", "wb") as log:
        console = _Console(shown, native_fd=log.fileno())
        console.write("\r  labeling:  50%")  # a progress bar: passes at once
        assert shown.getvalue() == "\r  labeling:  50%"
        ours = "2026-12-06 06:36:01,409 WARNING pipeline.faults: segment: x.jpg crashed its worker 3 times"
        console.write("\x1b[2m\x1b[36m(MapWorker(MapBatches(Segmenter)) pid=7, ip=10.0.0.2)\x1b[0m ")  # print() writes
        console.write(ours)  # the line and its end separately: held until the line is whole
        assert shown.getvalue() == "\r  labeling:  50%"
        console.write("\n")
        console.write("\x1b[36m(CrashLedger pid=8)\x1b[0m [mutex.cc : 452] RAW: Lock blocking 0x55ded7e70a50\n")
        console.write("(raylet) Spilled 300 MiB\n(autoscaler +2s) Tip: use `ray status`\n")
        console.write("(not Ray's) a line of our own that starts with a bracket\n")
        console.close()
    assert shown.getvalue() == ("\r  labeling:  50%\x1b[2m\x1b[36m(MapWorker(MapBatches(Segmenter)) pid=7, ip=10.0.0.2)\x1b[0m "
                                + ours + "\n(not Ray's) a line of our own that starts with a bracket\n")
    assert (tmp_path / "log").read_text() == ("\x1b[36m(CrashLedger pid=8)\x1b[0m [mutex.cc : 452] RAW: Lock blocking 0x55ded7e70a50\n"
                                              "(raylet) Spilled 300 MiB\n(autoscaler +2s) Tip: use `ray status`\n")


def test_a_command_s_logging_is_undone_when_it_ends(tmp_path, capfd):
    """In-process (the tests call cli.main): the log file gets the libraries' lines and what is
    written to file descriptor 2; the console ours; afterwards everything is as it was."""
    import logging
    import sys

    from pipeline.run import console

    before = sys.stdout, sys.stderr, logging.getLogger().handlers[:], logging.getLogger().level
    log_file = tmp_path / "run.log"
    with console.configured(log_file):
        logging.getLogger("autolabel").warning("ours")
        logging.getLogger("ultralytics").info("a library's banner")  # via the filter set before any import
        logging.getLogger("somelib").warning("a library's warning")
        os.write(2, b"[2026-12-06 06:16:48,385 E 5718 5718] core_worker.cc:2465: from C++\n")
    assert (sys.stdout, sys.stderr, logging.getLogger().handlers, logging.getLogger().level) == before
    os.write(2, b"after\n")
    err = capfd.readouterr().err
    assert "WARNING autolabel: ours" in err and "library" not in err and "C++" not in err and err.endswith("after\n")
    logged = log_file.read_text()
    assert all(text in logged for text in ("ours", "a library's banner", "a library's warning", "from C++"))


@pytest.fixture
def few_photos(tmp_path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("bus", "zidane", "coffee"):
        img = Image.fromarray(real_photos()[name])
        img.thumbnail((320, 320))
        img.save(folder / f"{name}.jpg", quality=92)
    return folder


def test_a_healthy_run_prints_only_our_lines_and_logs_the_rest(checkpoints, few_photos, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items()
           if k not in ("YOLO_CONFIG_DIR", "MPLCONFIGDIR", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_ADDRESS", "AUTOLABEL_CACHE")}
    env.update(HOME=str(home), AUTOLABEL_LOG_DIR=str(tmp_path / "logs"))
    out = tmp_path / "out"
    proc = subprocess.run(
        [*autolabel_cli(), "run", f"input.uri={few_photos}", f"output.uri={out}", "sam.device=cpu", "ray.num_cpus=2",
         *model_overrides(checkpoints)],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    assert alarming_lines_not_ours(proc.stdout + proc.stderr) == []
    assert [line for line in proc.stderr.splitlines() if line and not OUR_LINE.match(line)] == [], "stderr: our lines only"
    summary = proc.stdout.strip("\n").splitlines()
    assert summary[0] == "autolabel run finished" and all(line.startswith("  ") for line in summary[1:]), proc.stdout
    assert "  images     3  (ok 3, error 0)" in summary

    # The log file, named by the first of our lines and by the summary, holds what the console did not.
    (log_line,) = [line for line in summary if line.startswith("  log ")]
    log_file = Path(log_line.split(None, 1)[1])
    assert log_file.parent == tmp_path / "logs"
    assert f"log file (this run's messages, the libraries' too): {log_file}" in proc.stderr.splitlines()[0]
    logged = log_file.read_text(errors="replace")
    for library_line in (
        "Creating new Ultralytics Settings",  # ultralytics' banner: a fresh settings file
        "Token authentication is enabled for this Ray cluster",  # Ray: RAY_AUTH_MODE unset
        "has constructor arguments in the object store",  # Ray's core worker (C++), Ray issue #53727
        "Starting execution of Dataset",  # Ray Data
    ):
        assert library_line in logged, library_line
    assert "images 3/3 (100%)" in logged  # our own lines are there too

    # ultralytics' settings live in our cache folder (the user never set YOLO_CONFIG_DIR), not in ~/.config.
    assert (home / ".cache" / "autolabel" / "ultralytics" / "Ultralytics" / "settings.json").is_file()
    assert not (home / ".config" / "Ultralytics").exists()
