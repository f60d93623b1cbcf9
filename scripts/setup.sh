#!/usr/bin/env bash
# Create .venv with everything the project needs, from nothing. Idempotent: when the stamp matches
# the current pyproject.toml and this script, it returns at once and changes nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
stamp=.venv/.autolabel-installed
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x .venv/bin/autolabel ]; then
    exit 0
fi
echo "setup: creating .venv (torch, sam2, ultralytics, ray; a few minutes the first time)" >&2
[ -x .venv/bin/python ] || "$PY" -m venv .venv
log=$(mktemp)
pip_install() {  # quiet on success (this machine's pip.conf makes pip chatty); full log on failure
    if ! .venv/bin/python -m pip install --disable-pip-version-check -q "$@" >"$log" 2>&1; then
        cat "$log" >&2
        echo "setup: pip install $* failed" >&2
        exit 1
    fi
}
pip_install --upgrade "pip>=24" "setuptools>=77" wheel
# The only torch/torchvision pair that imports on the reference machine (see shared design notes).
pip_install torch==2.14.1 torchvision==0.29.1
# sam2 ships as an sdist; building it without isolation reuses the torch above (14 s instead of
# 4 min) and SAM2_BUILD_CUDA=0 skips the optional CUDA extension (connected components for
# video post-processing, unused by the image predictor).
if ! .venv/bin/python -c "import sam2" 2>/dev/null; then
    SAM2_BUILD_CUDA=0 pip_install --no-build-isolation sam2==1.1.0
fi
pip_install -e ".[test]"
rm -f "$log"
echo "$want" > "$stamp"
echo "setup: .venv ready" >&2
