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

.PHONY: setup test test-slow test-all lint format lock dvc-lock clean help demo demo-clean
.PHONY: test-load
.PHONY: bench bench-quality
.PHONY: image image-gpu test-image test-containers setup-system test-system

help:
	@echo "make setup      create .venv from requirements.txt + constraints.txt"
	@echo "make test       all tests but 'slow' (unit, integration, e2e), 2 workers (TEST_WORKERS=N)"
	@echo "make test-slow  the slow tier"
	@echo "make test-load  load test of cta serve (32 clients, 2000 requests; bench/results/load_serve.json)"
	@echo "make lint       ruff check + format check + import layers (lint-imports) + dvc.lock fresh"
	@echo "make dvc-lock   dvc repro: rebuild the data stages and refresh dvc.lock after their sources change"
	@echo "make bench-quality  STL/HPS/CTAL inspection figures, 5 seeds (SIZE=cpu|cpu-long|full|smoke, SEEDS=N)"
	@echo "make bench      every bench/*.py benchmark -> bench/results/ (BENCH_QUICK=1: smoke sizes)"
	@echo "make image      build the project image (buildah, else docker; infra/images/README.md)"
	@echo "make image-gpu  the same image with the CUDA build of torch (CTA_GPU_IMAGE, cta-gpu:0.1.0)"
	@echo "make test-image build the image, run a component in it with podman (slow)"
	@echo "make test-containers  build the image, run the compiled pipeline with every step in it (slow)"
	@echo "make setup-system  install chromium, buildah, podman, runc, debootstrap (apt)"

setup: $(STAMP)

$(STAMP): requirements.txt constraints.txt pyproject.toml
	@command -v uv >/dev/null 2>&1 || $(PYTHON) -m pip install -q "uv==$(UV_VERSION)"
	@test -x $(VENV)/bin/python || uv venv -q --python $(PYTHON) $(VENV)
	@# --compile-bytecode: .pyc files written once here; without them every process (each
	@# pipeline step, server and test subprocess) compiled mlflow and torch again, ~3 s each.
	uv pip install -q --python $(VENV)/bin/python --find-links "$(FIND_LINKS)" \
		--compile-bytecode -r requirements.txt -c constraints.txt
	uv pip install -q --python $(VENV)/bin/python --no-deps -e .
	@touch $(STAMP)

# Two workers, each test file on one (module fixtures and servers stay per file): most tests
# wait on subprocesses and servers, so the suite takes about 2/3 of its one-worker time on
# 2 cores. TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2
test: setup test-system
	$(VENV)/bin/python -m pytest -m "not slow" -n $(TEST_WORKERS) --dist loadfile --durations=15 \
		$(PYTEST_ARGS)

test-slow: setup test-system setup-system
	$(VENV)/bin/python -m pytest -m "slow" --durations=15 $(PYTEST_ARGS)

test-all: setup
	$(VENV)/bin/python -m pytest --durations=15 $(PYTEST_ARGS)

# lint-imports checks the layer contracts of [tool.importlinter] in pyproject.toml.
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports --no-cache --no-logo
	@# A stage's source changed without `make dvc-lock`: a fresh clone's dry repro then fails.
	@stale=$$(PATH=$(VENV)/bin:$$PATH dvc status 2>&1 | grep -E 'modified: +[^ ]+\.(py|yaml)$$'); \
		if [ -n "$$stale" ]; then echo "dvc.lock is stale (run make dvc-lock, commit dvc.lock):"; \
		echo "$$stale"; exit 1; fi

dvc-lock: setup
	PATH=$(VENV)/bin:$$PATH dvc repro

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
# kfp.local (validate -> STL baselines when missing -> train -> evaluate -> ROI report ->
# register -> gate (configs/gate-demo.yaml) -> roll-out wave 1 on local line servers), then the
# monitoring step: every line's qa split replayed through a server, one line under brighter light,
# and `cta monitor` per line. A second run reuses data and baselines and registers the next version.
demo: setup
	@start=$$(date +%s); \
	if [ ! -f $(DEMO_DIR)/data/manifest.parquet ]; then \
		$(VENV)/bin/cta data generate --out $(DEMO_DIR)/data --lines 3 --samples-per-line 100 \
			--line-samples press-a=400 --splits 0.5,0.15,0.25,0.1 --size 384 --seed 0 \
			--workers 2; \
	fi && \
	$(VENV)/bin/cta pipeline run --local --data $(DEMO_DIR)/data --work-dir $(DEMO_DIR) \
		--config configs/demo.yaml --tracking-uri sqlite:///$(DEMO_DIR)/mlflow/mlflow.db \
		--gate-policy configs/gate-demo.yaml --rollout-plan configs/rollout-demo.yaml \
		--rollout-state $(DEMO_DIR)/rollout --no-stl-baselines && \
	$(VENV)/bin/python -m components.monitor.demo --data $(DEMO_DIR)/data \
		--tracking-uri sqlite:///$(DEMO_DIR)/mlflow/mlflow.db --out $(DEMO_DIR)/reports/monitor && \
	echo "demo took $$(( $$(date +%s) - start )) s"

demo-clean:
	-@test -x $(VENV)/bin/cta && $(VENV)/bin/cta rollout stop-all --state $(DEMO_DIR)/rollout
	rm -rf $(DEMO_DIR)

# The project image, tagged $CTA_IMAGE or cta:0.1.0 (components/image.py); flags are
# environment variables documented in infra/images/README.md.
image:
	bash infra/images/build.sh

# The same image with the CUDA build of the pinned torch from the package index (several GB),
# tagged $CTA_GPU_IMAGE or cta-gpu:0.1.0: the train step and the TrainJob pods run in it.
image-gpu:
	TORCH_BUILD=cuda CTA_IMAGE=$${CTA_GPU_IMAGE:-cta-gpu:0.1.0} bash infra/images/build.sh

test-image: setup
	$(VENV)/bin/python -m pytest tests/slow/test_image.py -m slow -v --timeout 3600 $(PYTEST_ARGS)

# The compiled pipeline with every step a podman container of the image (kfp.local DockerRunner),
# data on moto S3 and an MLflow server on loopback (issue 16 item 5); also part of test-slow.
test-containers: setup setup-system
	$(VENV)/bin/python -m pytest tests/integration/test_containers.py -m slow -v -s --timeout 3600 \
		$(PYTEST_ARGS)

setup-system:
	bash infra/images/setup-system.sh

# Debian's Chromium for the report tests: installed when missing (root or password-less sudo),
# else make test stops at once with the command to run.
test-system:
	@bash infra/images/test-system.sh

# Bounded load test of `cta serve` on loopback (issue 9 item 3); also part of test-slow.
test-load: setup
	$(VENV)/bin/python -m pytest tests/load/test_load.py -m slow -s $(PYTEST_ARGS)

# Every benchmark (bench/run_all.py), each configuration in a fresh subprocess; tables and JSON
# in bench/results/ (README.md gathers them). BENCH_QUICK=1 runs smoke sizes into
# bench/results/raw/quick instead.
bench: setup
	$(VENV)/bin/python bench/run_all.py

bench-quality: setup
	$(VENV)/bin/python bench/quality.py --size $(or $(SIZE),cpu) $(if $(SEEDS),--seeds $(SEEDS))
