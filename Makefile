# Every target installs what it needs into .venv first, so a fresh clone needs only python3 and make.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=

.PHONY: all install test data train sample eval explore sweep bench clean

all: data train eval sample

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest $(ARGS)

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

# obs_std values to compare with `make sweep`
SWEEP ?= 0.03,0.1,0.3

sweep: install
	$(PY) -m pipeline.train --multirun obs_std=$(SWEEP) $(ARGS)
	$(PY) -m pipeline.sample sheet=obs_std
	$(PY) -m pipeline.evaluate --multirun +obs_std=$(SWEEP)
	$(PY) -m pipeline.evaluate report=true

bench: install
	$(PY) bench/crop_throughput.py
	$(PY) bench/train_throughput.py

clean:
	rm -rf $(VENV) .pytest_cache
