"""What a person sees while a command runs, and where everything else goes.

``autolabel run`` shows on the console only our own lines (the loggers ``autolabel`` and
``pipeline``: progress, warnings, errors) and the summary. What the libraries say goes to the
run's log file instead, which the first line names: Ray's and Ray Data's Python loggers,
ultralytics' logger, Python warnings, and what C/C++ code writes to the process's stderr (Ray's
core worker logs its once-per-process ERROR about actor constructor arguments there; see
docs/running.md, "Console and logs"). The other commands keep one console: our lines at INFO, the
libraries' at WARNING.

Every change is undone when the command ends, so ``cli.main`` can be called more than once in a
process (the tests do).
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator, Optional

from pipeline.config import redact, redact_text

OUR_LOGGERS = ("autolabel", "pipeline")
LINE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_DIR_ENV = "AUTOLABEL_LOG_DIR"

# The command being run: its log file and how to undo what was changed for it.
_log_file: Optional[Path] = None
_undo: Optional[contextlib.ExitStack] = None


def is_ours(logger_name: str) -> bool:
    return any(logger_name == name or logger_name.startswith(name + ".") for name in OUR_LOGGERS)


class RedactingFilter(logging.Filter):
    """Credentials never reach the log: those inside URIs (``user:password@``, signed query strings)
    and, once the config is read, the values of its storage options (``OPTION_SETS``), also inside
    a traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = clean(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        if record.exc_info:
            record.exc_text = clean(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        return True


# The run's storage options (set once the config is read): their values are masked in every line.
OPTION_SETS: list[dict] = []


def clean(text: str) -> str:
    """``text`` fit for the console and the log: URI credentials and storage-option values masked."""
    return redact(redact_text(text), *OPTION_SETS)


class _OursOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return is_ours(record.name)


class _OursOrWarnings(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return is_ours(record.name) or record.levelno >= logging.WARNING


class _ToRootHandlers(logging.Filter):
    """Put on a library logger that prints through a console handler of its own (ultralytics):
    its records go to the root logger's handlers instead, so they follow the rules above."""

    def filter(self, record: logging.LogRecord) -> bool:
        logging.getLogger().handle(record)
        return False


def log_dir() -> Path:
    """Where ``autolabel run`` keeps its log files: ``AUTOLABEL_LOG_DIR``, else ``logs/`` in the
    node-local cache (``AUTOLABEL_CACHE``, ~/.cache/autolabel)."""
    from pipeline.models.weights import cache_dir

    return Path(os.environ.get(LOG_DIR_ENV) or cache_dir() / "logs")


def new_log_file(command: str) -> Path:
    """A fresh log file for one command (a private temporary file if the log folder is not writable)."""
    name = f"{command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    try:
        folder = log_dir()
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / name
        path.touch()
        return path
    except OSError:
        fd, path = tempfile.mkstemp(prefix=f"autolabel-{command}-", suffix=".log")
        os.close(fd)
        return Path(path)


def current_log_file() -> Optional[Path]:
    return _log_file


def default_ultralytics_settings() -> None:
    """ultralytics writes its settings file at import (announcing it with a banner when the file
    is new): unless ``YOLO_CONFIG_DIR`` says where, it goes to our own cache, not ~/.config."""
    from pipeline.models.weights import cache_dir

    os.environ.setdefault("YOLO_CONFIG_DIR", str(cache_dir() / "ultralytics"))


@contextlib.contextmanager
def configured(log_file: Optional[Path] = None) -> Iterator[Optional[Path]]:
    """Logging for one command; with ``log_file``, the console is ours alone (module docstring)."""
    global _log_file, _undo
    with contextlib.ExitStack() as undo:
        root = logging.getLogger()
        undo.callback(root.setLevel, root.level)
        root.setLevel(logging.INFO if log_file else logging.WARNING)
        if log_file is not None:
            _send_native_stderr_to(log_file, undo)  # before the console handler takes sys.stderr
            file_handler = logging.FileHandler(log_file, encoding="utf-8")
            file_handler.setLevel(logging.INFO)  # Ray Data logs DEBUG too: its own ray-data.log keeps those
            _add_handler(root, file_handler, undo)
            logging.captureWarnings(True)
            undo.callback(logging.captureWarnings, False)
        console = logging.StreamHandler(sys.stderr)
        console.addFilter(_OursOnly() if log_file else _OursOrWarnings())
        _add_handler(root, console, undo)
        level = os.environ.get("AUTOLABEL_LOG_LEVEL", "INFO")
        for name in OUR_LOGGERS:
            logger = logging.getLogger(name)
            undo.callback(logger.setLevel, logger.level)
            logger.setLevel(level)
        default_ultralytics_settings()
        ultralytics = logging.getLogger("ultralytics")
        to_root = _ToRootHandlers()
        ultralytics.addFilter(to_root)  # works before ultralytics is imported: its banner comes at import
        undo.callback(ultralytics.removeFilter, to_root)
        undo.callback(OPTION_SETS.clear)
        _log_file, _undo = log_file, undo
        undo.callback(_forget)
        yield log_file


def _forget() -> None:
    global _log_file, _undo
    _log_file = _undo = None


def _add_handler(logger: logging.Logger, handler: logging.Handler, undo: contextlib.ExitStack) -> None:
    handler.setFormatter(logging.Formatter(LINE_FORMAT))
    handler.addFilter(RedactingFilter())
    logger.addHandler(handler)
    undo.callback(handler.close)
    undo.callback(logger.removeHandler, handler)


def _send_native_stderr_to(log_file: Path, undo: contextlib.ExitStack) -> None:
    """C and C++ code write to file descriptor 2 directly, past Python's logging: from here on
    that descriptor is the log file. Python's ``sys.stderr`` (our lines, the progress bar, error
    messages, tracebacks) becomes a copy of the console's, and it and ``sys.stdout`` pass on
    what Ray forwards from the workers only when it is one of our records (``_Console``)."""
    sys.stdout.flush()
    sys.stderr.flush()
    previous = sys.stdout, sys.stderr
    console = os.fdopen(os.dup(2), "w", buffering=1, encoding=getattr(previous[1], "encoding", None) or "utf-8",
                        errors="backslashreplace")
    log_fd = os.open(log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    sys.stdout, sys.stderr = _Console(previous[0]), _Console(console)

    def restore() -> None:
        sys.stdout.close()
        sys.stderr.close()
        console.flush()
        os.dup2(console.fileno(), 2)
        console.close()
        sys.stdout, sys.stderr = previous

    undo.callback(restore)


# Ray prefixes each line it forwards from a worker with where it comes from, maybe coloured:
# "(MapWorker(MapBatches(Segmenter)) pid=12, ip=10.0.0.2) text", "(raylet) text", "(autoscaler +3s) text".
_FORWARDED = re.compile(r"^(?:\x1b\[[0-9;]*m)*\((?:raylet|autoscaler [^)]*|.*? pid=\w+(?:, ip=[^)]*)?)\)(?:\x1b\[[0-9;]*m)* ?")
_OUR_RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ (?:autolabel|pipeline)(?:\.\w+)*: ")


class _Console(io.TextIOBase):
    """A console stream of ``autolabel run``: what this process writes passes through; a line
    that Ray forwards from a worker passes only if it is one of our records (``worker_logging``
    gives them our format), and goes to the log file (file descriptor 2) otherwise. A line that
    may be a forwarded one is held until it is complete; anything else passes at once (a
    progress bar's carriage returns)."""

    def __init__(self, stream, native_fd: int = 2):
        self.stream = stream
        self.native_fd = native_fd
        self.pending = ""

    def write(self, text: str) -> int:
        self.pending += text
        while self.pending:
            line, newline, rest = self.pending.partition("\n")
            if newline:
                self._emit(line + newline)
                self.pending = rest
            elif self.pending.startswith(("(", "\x1b")):
                break  # perhaps the start of a forwarded line: wait for its end
            else:
                self.stream.write(self.pending)
                self.pending = ""
        return len(text)

    def _emit(self, line: str) -> None:
        forwarded = _FORWARDED.match(line)
        if forwarded and not _OUR_RECORD.match(line[forwarded.end():]):
            os.write(self.native_fd, line.encode("utf-8", "backslashreplace"))
        else:
            self.stream.write(line)

    def flush(self) -> None:
        self.stream.flush()

    def close(self) -> None:
        if self.pending:
            self._emit(self.pending)
            self.pending = ""
        self.stream.flush()
        super().close()

    def isatty(self) -> bool:
        return self.stream.isatty()

    def fileno(self) -> int:
        return self.stream.fileno()

    @property
    def encoding(self) -> str:
        return self.stream.encoding

    def writable(self) -> bool:
        return True


class _StderrAtEmit(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record comes (Ray and pytest replace it)."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def worker_logging() -> None:
    """In a Ray worker (each stage calls it as it starts): our records at WARNING and above go to
    the worker's stderr in ``LINE_FORMAT``, which Ray forwards to the driver, where the console
    knows them for ours. Once per process."""
    for name in OUR_LOGGERS:
        logger = logging.getLogger(name)
        if any(getattr(h, "autolabel_worker", False) for h in logger.handlers):
            continue
        handler = _StderrAtEmit()
        handler.setLevel(logging.WARNING)
        handler.setFormatter(logging.Formatter(LINE_FORMAT))
        handler.addFilter(RedactingFilter())
        handler.autolabel_worker = True
        logger.addHandler(handler)


def route_ray_logs() -> None:
    """With a log file: Ray's and Ray Data's loggers (configured at their import, each with a
    console handler of its own) keep their file handlers (Ray Data's ray-data.log in the session
    folder) and hand their records to ours instead of printing them. Imports ray and ray.data."""
    if _undo is None or _log_file is None:
        return
    import ray  # noqa: F401 - configures the "ray" logger
    import ray.data  # noqa: F401 - configures the "ray.data" logger

    for name in ("ray", "ray.data"):
        logger = logging.getLogger(name)
        for handler in [h for h in logger.handlers if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]:
            logger.removeHandler(handler)
            _undo.callback(logger.addHandler, handler)
        _undo.callback(setattr, logger, "propagate", logger.propagate)
        logger.propagate = True
