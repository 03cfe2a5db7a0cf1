# The two commands the README opens with: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo demo-transfers bench-download test lint

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements/ci-constraints.txt docker/requirements.lock scripts/setup_env.sh
	bash scripts/setup_env.sh $(VENV)

demo: setup
	$(PY) scripts/demo_network.py

demo-transfers: setup
	$(PY) scripts/demo.py

bench-download: setup
	$(PY) scripts/bench_download.py

test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q

lint:
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .
