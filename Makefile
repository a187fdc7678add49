# Two set-up commands: `make demo` and `make test`. Both create or reuse .venv; `make lint` checks style and types.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint install clean browser

$(BIN)/python:
	$(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first and pinned: the CPU wheel; an unpinned torch would pull CUDA packages.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[server,bench,test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/rankloop demo --quick

# the status page and the browser SDK are tested in Debian's chromium: installed when missing and possible (root, apt)
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1; } || \
	  echo "no chromium: the browser tests will fail (apt-get install chromium)"

test: $(STAMP) browser
	$(BIN)/python -m pytest -q -ra

# ruff (lint + format check) on everything, mypy on everything deployed (schemas/, training/, services/)
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

clean:
	-$(BIN)/rankloop down
	rm -rf .rankloop
