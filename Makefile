# The two set-up commands of the README: `make run` and `make test`. Both create .venv first
# (scripts/setup.sh: idempotent, returns at once when nothing changed).
.PHONY: setup run test bench
ARGS ?=

setup:
	@bash scripts/setup.sh

run: setup
	.venv/bin/autolabel run --overwrite $(ARGS)

test: setup
	.venv/bin/python -m pytest

bench: setup
	.venv/bin/python benchmarks/throughput.py $(ARGS)
