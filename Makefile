# The two set-up commands of the README: `make demo` (the main job) and `make test`.
# Both install into a virtual environment: the one that is active, or else ./.venv, made
# here. Never into the system interpreter (Debian's and Ubuntu's are PEP 668 managed).
PYTHON ?= python3
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER ?= 0

ifdef VIRTUAL_ENV
VENV_PYTHON := $(VIRTUAL_ENV)/bin/python
else
VENV_PYTHON := $(CURDIR)/.venv/bin/python
endif

# As if the environment were activated: `ray`, `raysweep` and `python` (which tests and
# job entrypoints run by name) are the environment's own.
export PATH := $(dir $(VENV_PYTHON)):$(PATH)

.PHONY: install demo test test-oldest-ray bench

# The oldest Ray that setup.py supports, in a venv of its own; CI runs the smoke tests there.
OLDEST_RAY ?= 2.58
OLDEST_VENV := $(CURDIR)/.venv-ray$(subst .,,$(OLDEST_RAY))

$(CURDIR)/.venv/bin/python:
	$(PYTHON) -m venv $(CURDIR)/.venv || { echo "make: could not create .venv; on Debian/Ubuntu: sudo apt install python3-venv" >&2; exit 1; }

install: $(VENV_PYTHON)
	$(VENV_PYTHON) -m pip install -q -e ".[dev]"

demo: install
	$(VENV_PYTHON) -m cluster tune --space digits_cnn --trials 12 --max-epochs 8

# Whole modules in TEST_WORKERS processes (each its own Ray), heaviest first (tests/conftest.py):
# much of a Ray test is waiting on processes starting, so 2 processes on 2 cores nearly halve
# the wall time (1547 s -> 827 s in .ci/run here). TEST_WORKERS=0 runs them in this one process.
TEST_WORKERS ?= 2
test: install
	$(VENV_PYTHON) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder tests

$(OLDEST_VENV)/bin/python:
	$(PYTHON) -m venv $(OLDEST_VENV)

test-oldest-ray: $(OLDEST_VENV)/bin/python
	$(OLDEST_VENV)/bin/python -m pip install -q -e ".[dev]" "ray[data,train,tune,serve,default]==$(OLDEST_RAY).*"
	PATH=$(OLDEST_VENV)/bin:$$PATH $(OLDEST_VENV)/bin/python -m pytest -q -m smoke tests

# The report is rewritten only when every benchmark ran (&&), and only from clean records.
bench: install
	$(VENV_PYTHON) -m benchmarks all && $(VENV_PYTHON) -m benchmarks.report --readme
