# The two set-up commands of the README: `make demo` (the main job) and `make test`.
PYTHON ?= python3
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER ?= 0

.PHONY: install demo test bench

install:
	$(PYTHON) -m pip install -q -e ".[dev]"

demo: install
	raysweep tune --space digits_cnn --trials 12 --max-epochs 8

test: install
	$(PYTHON) -m pytest -q tests

bench: install
	$(PYTHON) -m benchmarks all; $(PYTHON) -m benchmarks.report --readme
