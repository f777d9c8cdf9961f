# One-command set-up: every target creates .venv and installs the project if needed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install test book bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[book,dev]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

# PROFILE=smoke|cpu|gpu|paper; none: cpu, or smoke with a banner where cpu cannot run
book: $(STAMP)
	$(PY) -m helpers book $(if $(PROFILE),--profile $(PROFILE))

bench: $(STAMP)
	$(PY) -m pip install -q -e '.[peers]'
	$(PY) bench/bench_core.py --memory
	$(PY) bench/bench_seeing.py
	$(PY) bench/bench_peers.py
	$(PY) bench/bench_e2e.py

clean:
	rm -rf _build .pytest_cache
