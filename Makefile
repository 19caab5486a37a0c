# Every target installs what it needs into .venv first, so a fresh clone needs only python3 and make.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=

.PHONY: all help install test test-fast data train sample eval explore export sweep bench clean

all: data train eval sample

help:
	@echo "make all        the whole job: data, train, eval, sample"
	@echo "make test       the whole test suite (what CI runs; under 10 minutes on 2 cores)"
	@echo "make test-fast  everything but the tests marked slow: the edit-test loop (under 2 minutes)"
	@echo "make data | train | eval | sample | explore | export | sweep | bench   one stage (ARGS=\"key=value ...\")"

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest $(ARGS)

test-fast: install
	$(PY) -m pytest -m "not slow" $(ARGS)

data: install
	$(PY) -m pipeline.data $(ARGS)

train: install
	$(PY) -m pipeline.train $(ARGS)

sample: install
	$(PY) -m pipeline.sample $(ARGS)

eval: install
	$(PY) -m pipeline.evaluate $(ARGS)

explore: install
	$(PY) -m pipeline.explore $(ARGS)

export: install
	$(PY) -m pipeline.export $(ARGS)

# obs_std values to compare with `make sweep`
SWEEP ?= 0.03,0.1,0.3

sweep: install
	$(PY) -m pipeline.train --multirun obs_std=$(SWEEP) $(ARGS)
	$(PY) -m pipeline.sample sheet=obs_std decoder=elbo
	$(PY) -m pipeline.evaluate --multirun +obs_std=$(SWEEP)
	$(PY) -m pipeline.evaluate report=true

bench: install
	$(PY) bench/crop_throughput.py
	$(PY) bench/train_throughput.py

clean:
	rm -rf $(VENV) .pytest_cache
