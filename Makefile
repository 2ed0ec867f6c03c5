# sluice: every target sets up what it needs on a fresh machine.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: venv run test conformance bench check clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

# Debian tools the tests drive as real clients/servers (curl).
test-deps:
	@command -v curl >/dev/null || (apt-get update -qq && apt-get install -y -qq curl)

run: venv
	$(VENV)/bin/sluice run

test: venv test-deps
	$(PY) -m pytest tests conformance

conformance: venv
	$(PY) -m pytest conformance

bench: venv
	bash benchmarks/setup.sh
	$(PY) benchmarks/run.py

clean:
	rm -rf $(VENV) build *.egg-info
