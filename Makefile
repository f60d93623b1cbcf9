# The two set-up commands of the README: `make run` and `make test`. Both create .venv first
# (scripts/setup.sh: idempotent, returns at once when nothing changed); `make test` also installs
# what the tests need outside Python (scripts/test-deps.sh: Chromium).
.PHONY: setup test-deps run test bench bench-gpu
ARGS ?=

setup:
	@bash scripts/setup.sh

test-deps:
	@bash scripts/test-deps.sh

run: setup
	.venv/bin/autolabel run --overwrite $(ARGS)

test: setup test-deps
	.venv/bin/python -m pytest

bench: setup
	.venv/bin/python benchmarks/throughput.py $(ARGS)

# SAM 2.1 throughput: encoder only vs the SAM 2 tutorial's loop vs this pipeline, one process
# (CUDA: hiera-tiny and hiera-large at 1024, bf16; CPU: tiny at 256). Writes bench-gpu.json.
bench-gpu: setup
	.venv/bin/python benchmarks/gpu_throughput.py --json bench-gpu.json $(ARGS)
