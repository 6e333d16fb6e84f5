# Every target that runs code depends on `setup`, which builds .venv from the pins once
# (a stamp file makes the second run a no-op).
SHELL := /bin/bash
PYTHON ?= python3.11
UV_VERSION := 0.9.30
VENV := .venv
STAMP := $(VENV)/.setup-stamp
FIND_LINKS ?= $(or $(PIP_FIND_LINKS),/opt/wheels)
export MLFLOW_DISABLE_TELEMETRY := true
export DVC_NO_ANALYTICS := 1
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: setup test test-slow test-all lint format lock clean help demo demo-clean

help:
	@echo "make setup      create .venv from requirements.txt + constraints.txt"
	@echo "make test       all tests but 'slow' (unit, integration, e2e)"
	@echo "make test-slow  the slow tier"
	@echo "make lint       ruff check + format check"

setup: $(STAMP)

$(STAMP): requirements.txt constraints.txt pyproject.toml
	@command -v uv >/dev/null 2>&1 || $(PYTHON) -m pip install -q "uv==$(UV_VERSION)"
	@test -x $(VENV)/bin/python || uv venv -q --python $(PYTHON) $(VENV)
	uv pip install -q --python $(VENV)/bin/python --find-links "$(FIND_LINKS)" \
		-r requirements.txt -c constraints.txt
	uv pip install -q --python $(VENV)/bin/python --no-deps -e .
	@touch $(STAMP)

test: setup
	$(VENV)/bin/python -m pytest -m "not slow" --durations=15 $(PYTEST_ARGS)

test-slow: setup
	$(VENV)/bin/python -m pytest -m "slow" --durations=15 $(PYTEST_ARGS)

test-all: setup
	$(VENV)/bin/python -m pytest --durations=15 $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# Re-resolve the full constraints file from the direct pins.
lock:
	uv pip compile requirements.txt --find-links "$(FIND_LINKS)" --python-version 3.11 \
		--no-header --no-annotate -o constraints.txt

clean:
	rm -rf .cta local_outputs mlruns .pytest_cache .ruff_cache

DEMO_DIR := $(CURDIR)/.cta/demo

# The whole local demo on synthetic data: generate once, then the training pipeline through
# kfp.local (validate -> train -> evaluate -> register); a second run registers the next version.
demo: setup
	@start=$$(date +%s); \
	if [ ! -f $(DEMO_DIR)/data/manifest.parquet ]; then \
		$(VENV)/bin/cta data generate --out $(DEMO_DIR)/data --lines 3 --samples-per-line 60 \
			--size 128 --seed 0; \
	fi && \
	$(VENV)/bin/cta pipeline run --local --data $(DEMO_DIR)/data --work-dir $(DEMO_DIR)/kfp \
		--config configs/demo.yaml --tracking-uri sqlite:///$(DEMO_DIR)/mlflow/mlflow.db && \
	echo "demo took $$(( $$(date +%s) - start )) s"

demo-clean:
	rm -rf $(DEMO_DIR)
