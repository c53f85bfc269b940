# The two commands of the README: `make serve` and `make test`. Each installs what is missing
# into .venv first, so they work on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q

.PHONY: serve test browser lint format bench bench-attention bench-check bench-pipeline bench-worker bench-train bench-api bench-context-parallel clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip

# One stamp per extra; re-installed when pyproject.toml changes.
$(VENV)/.installed-%: pyproject.toml | $(VENV)/bin/python
	$(PIP) install -e ".[$*]"
	touch $@

# Settings come from the environment or the command line, e.g. `make serve GPUS_PER_JOB=2`
# (groups of 2 GPUs share each job: docs/deploy.md, "One video on several GPUs").
serve: $(VENV)/.installed-worker
	$(PY) -m service.serve

test: $(VENV)/.installed-dev browser
	$(PY) -m pytest -q

# ruff (lint + format check) and mypy, as declared in pyproject.toml; zero findings.
lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# Apply ruff's fixes and formatting.
format: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# The playground's test (tests/e2e/test_playground.py) drives a real browser: Debian's chromium
# and chromedriver, and a font to draw its text. Installed with apt when missing (as root, else
# through sudo).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  ($(SUDO) apt-get update && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y \
	   --no-install-recommends chromium chromium-driver fonts-dejavu-core)

# Benchmarks need a CUDA GPU (bench-api does not); results land in bench/results/.
bench: bench-attention bench-check bench-pipeline bench-worker

bench-attention: $(VENV)/.installed-dev
	$(PY) -m bench.attention

bench-check: $(VENV)/.installed-dev
	$(PY) -m bench.check_attention

bench-train: $(VENV)/.installed-dev
	$(PY) -m bench.check_backward
	$(PY) -m bench.attention_backward
	$(PY) -m bench.train_step

bench-worker: $(VENV)/.installed-dev
	$(PY) -m bench.worker_e2e

bench-pipeline: $(VENV)/.installed-dev
	$(PY) -m bench.pipeline

bench-api: $(VENV)/.installed-dev
	$(PY) -m bench.api

# One step on 1 GPU against CP_GPUS GPUs (Ulysses context parallelism): a host with that many.
CP_GPUS ?= 2
bench-context-parallel: $(VENV)/.installed-dev
	$(PY) -m bench.context_parallel --gpus $(CP_GPUS)

clean:
	rm -rf $(VENV) .pytest_cache
