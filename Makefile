# Two commands set everything up on a fresh machine:
#   make demo   creates .venv if missing, runs the whole pipeline on the embedded corpus
#   make test   creates .venv if missing, runs the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1

.PHONY: demo test env bench clean-venv

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e '.[dev]'
	touch $@

env: $(VENV)/.installed

demo: env
	$(PY) -m ray_jobs.pipeline

test: env
	$(PY) -m pytest -q

bench: env
	for b in bench/*.py; do $(PY) $$b || exit 1; done

clean-venv:
	rm -rf $(VENV)
