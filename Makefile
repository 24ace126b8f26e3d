# Two commands matter: `make run` (the pipeline on the default dataset) and `make test`.
# Both start from nothing: `setup` makes .venv from requirements.lock (quick when nothing changed).

VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed

# Same values as tasks/env.py (which the Python entry points use); here for dvc and prefect CLIs.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export PREFECT_HOME ?= $(CURDIR)/.prefect
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 120
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export DO_NOT_TRACK ?= 1
export DVC_NO_ANALYTICS ?= 1
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup run test test-fast bench ui browser clean

setup: $(STAMP)

# torch first and pinned: a looser request pulls a multi-GB CUDA build.
$(STAMP): requirements.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements.lock
	touch $(STAMP)

run: setup
	dvc repro
	$(PY) -m tasks.summary

# The suite on TEST_WORKERS pytest-xdist processes, each test file on one of them (its module
# fixtures, a tiny pipeline run, are built once); much of the suite waits on subprocesses.
TEST_WORKERS ?= 2
test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# The suite without the end-to-end tests marked `slow` (Prefect, DVC, multi-process runs).
test-fast: setup
	$(PY) -m pytest -q -m "not slow"

bench: setup
	$(PY) -m benchmarks.run_all

ui: setup
	prefect server start --host 127.0.0.1 --port 4200

# Stages on work pools (prefect.yaml, README "GPU workers"): `make deploy` once against the server in
# PREFECT_API_URL; `make worker POOL=gpu` in a checkout on each machine runs the stages sent to that pool.
.PHONY: deploy worker
POOL ?= cpu
deploy: setup
	for pool in cpu gpu; do prefect work-pool inspect $$pool >/dev/null 2>&1 || prefect work-pool create $$pool --type process; done
	prefect --no-prompt deploy --all

worker: setup
	prefect worker start --pool $(POOL) --limit 1

# Debian's chromium for the browser test of the UI (root or password-less sudo; else it skips).
browser:
	.ci/install-chromium

clean:
	rm -rf data reports .prefect
