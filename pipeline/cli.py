"""``autolabel`` command line: ``autolabel run [--config FILE] [key=value ...]``.

Exit codes: 0 the run finished (some images may be error rows), 2 bad config or weights
(nothing was started), 1 the job failed while running.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Optional

from .config import ConfigError, allowed_keys, load_config

EXIT_OK, EXIT_FAILED, EXIT_BAD_CONFIG = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="autolabel", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run",
        help="label a folder/bucket of images",
        description="Run the labeling job. Overrides use dotted keys: " + ", ".join(allowed_keys()),
    )
    run.add_argument("--config", help="YAML config file (see configs/default.yaml)")
    run.add_argument("--overwrite", action="store_true", help="replace an existing run in output.uri")
    run.add_argument("overrides", nargs="*", metavar="key=value")
    run.set_defaults(handler=_run)
    # Each further subcommand: a sub-parser here with set_defaults(handler=...), the handler
    # importing its module lazily (so `autolabel --help` stays fast) and returning an exit code.
    return parser


def _setup_logging() -> None:
    logging.basicConfig(level=os.environ.get("AUTOLABEL_LOG_LEVEL", "INFO"), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def main(argv: Optional[list[str]] = None) -> int:
    args = _parser().parse_args(argv)
    _setup_logging()
    return args.handler(args)


def _run(args) -> int:
    from .job import format_summary, run

    try:
        cfg = load_config(args.config, args.overrides)
        manifest = run(cfg, overwrite=args.overwrite)
    except ConfigError as exc:
        print(f"autolabel: error: {exc}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    print(format_summary(manifest))
    return EXIT_OK if manifest["status"] == "finished" else EXIT_FAILED


if __name__ == "__main__":
    raise SystemExit(main())
