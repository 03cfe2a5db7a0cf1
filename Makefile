# The two commands the README opens with: `make demo` (needs only Python) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_ARGS ?=

.PHONY: setup test-tools demo demo-transfers bench-download test lint

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements/ci-constraints.txt docker/requirements.lock scripts/setup_env.sh
	bash scripts/setup_env.sh $(VENV)

# nginx, promtool/prometheus and docker-compose: the tests use them, the demo does not.
test-tools:
	bash scripts/setup_env.sh --test-tools-only

demo: setup
	$(PY) scripts/demo_network.py $(DEMO_ARGS)

demo-transfers: setup
	$(PY) scripts/demo.py

bench-download: setup test-tools
	$(PY) scripts/bench_download.py

test: setup test-tools
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q

lint:
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .
