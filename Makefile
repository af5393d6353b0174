# The two commands of the README: `make demo` and `make test`. Both install the locked, tested set of versions
# (requirements/lock-pyX.Y.txt); pyproject.toml keeps ranges for those who install cxrdist into their own environment.
VENV ?= .venv
PYTHON ?= python3
STAMP := $(VENV)/.installed
PYVER := $(shell $(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])')
LOCK := requirements/lock-py$(PYVER).txt
# What the venv is installed under: the lock (default), or nothing: the newest releases the ranges allow.
CONSTRAINT ?= $(abspath $(LOCK))
# The oldest accelerate pyproject.toml allows: the launcher tests run on it too (tests/test_launcher_outcome.py).
ACCELERATE_FLOOR = $(shell $(PYTHON) -c 'import re, tomllib; d = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]; print(re.search(r">=([\w.]+)", next(x for x in d if x.startswith("accelerate"))).group(1))')

.PHONY: demo test lint bench gpu-wheels clean test-latest lock-refresh

$(STAMP): pyproject.toml $(wildcard $(LOCK))
	@if [ -n "$(CONSTRAINT)" ] && [ ! -f "$(CONSTRAINT)" ]; then echo "make: no lock for Python $(PYVER) ($(LOCK)); use Python 3.11, or 'make lock-refresh' to make one" >&2; exit 2; fi
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(if $(CONSTRAINT),PIP_CONSTRAINT=$(CONSTRAINT)) $(VENV)/bin/pip install -q --upgrade pip
	$(if $(CONSTRAINT),PIP_CONSTRAINT=$(CONSTRAINT)) $(VENV)/bin/pip install -q -e '.[dev]'
	$(VENV)/bin/pip install -q --no-deps --target $(VENV)/accelerate-oldest accelerate==$(ACCELERATE_FLOOR)
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/cxrdist demo --out demo-out

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: lint
	$(VENV)/bin/pytest -q -ra $(PYTEST_ARGS)

# The suite on the newest releases the ranges allow, in a venv of its own: drift is seen here before users meet it.
test-latest:
	rm -rf .venv-latest
	$(MAKE) test VENV=.venv-latest CONSTRAINT=

# A new lock: the newest releases, the whole suite on them, and only then the lock replaced (atomically).
lock-refresh: test-latest
	{ sed -n '1,2p' $(LOCK) 2>/dev/null || true; .venv-latest/bin/pip freeze --all --exclude-editable; } > $(LOCK).new
	mv $(LOCK).new $(LOCK)
	@echo "lock-refresh: $(LOCK) now holds the set the suite just passed on; commit it"

bench: $(STAMP)
	$(VENV)/bin/python bench/bench_folds.py
	$(VENV)/bin/python bench/bench_stream.py
	$(VENV)/bin/python bench/bench_prepare.py
	$(VENV)/bin/python bench/bench_trainer.py
	cd bench && PYTHONPATH=.. ../$(VENV)/bin/python bench_augment.py
	$(VENV)/bin/python bench/bench_bootstrap.py
	$(VENV)/bin/python bench/bench_audit.py

# Wheels of the dependencies an offline GPU machine with only torch, torchvision, timm, accelerate and
# scikit-learn lacks (see bench/README.md); run it with the GPU machine's Python version.
gpu-wheels: $(STAMP)
	$(VENV)/bin/python bench/gpu_wheels.py bench/wheels $(if $(GPU_PYTHON),--python-version $(GPU_PYTHON)) $(if $(GPU_PACKAGES),--present-file $(GPU_PACKAGES))

clean:
	rm -rf demo-out demo-out-two-datasets .pytest_cache
