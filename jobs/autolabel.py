"""Entry point for ``ray job submit --working-dir . -- python jobs/autolabel.py [--config F] [key=value ...]``.

Takes exactly the arguments of ``autolabel run``; connects to the cluster the job runs on.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the uploaded working dir

from pipeline.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main(["run", *sys.argv[1:]]))
