# The two commands of the README: `make demo` and `make test`.
VENV ?= .venv
PYTHON ?= python3
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench gpu-wheels clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/cxrdist demo --out demo-out

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: lint
	$(VENV)/bin/pytest -q -ra $(PYTEST_ARGS)

bench: $(STAMP)
	$(VENV)/bin/python bench/bench_folds.py
	$(VENV)/bin/python bench/bench_stream.py
	$(VENV)/bin/python bench/bench_prepare.py
	$(VENV)/bin/python bench/bench_trainer.py
	cd bench && PYTHONPATH=.. ../$(VENV)/bin/python bench_augment.py
	$(VENV)/bin/python bench/bench_bootstrap.py

# Wheels of the dependencies an offline GPU machine with only torch, torchvision, timm, accelerate and
# scikit-learn lacks (see bench/README.md); run it with the GPU machine's Python version.
gpu-wheels: $(STAMP)
	$(VENV)/bin/python bench/gpu_wheels.py bench/wheels $(if $(GPU_PYTHON),--python-version $(GPU_PYTHON)) $(if $(GPU_PACKAGES),--present-file $(GPU_PACKAGES))

clean:
	rm -rf demo-out .pytest_cache
