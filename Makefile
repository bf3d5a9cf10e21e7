# vvtq: `make demo` runs the main job, `make test` the checks. Both set up .venv first (idempotent).
PY := .venv/bin/python

.PHONY: setup demo test lint
setup:
	bash scripts/setup.sh

demo: setup
	$(PY) -m vvtq --threads 2 demo

test: setup
	.venv/bin/ruff check src tests benchmarks
	OMP_NUM_THREADS=2 VVTQ_TEST_THREADS=2 $(PY) -m pytest -q

lint: setup
	.venv/bin/ruff check src tests benchmarks
