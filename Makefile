# The two commands of the README: `make demo` and `make test`.
VENV ?= .venv
PYTHON ?= python3
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

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

clean:
	rm -rf demo-out .pytest_cache
