# Layerwise — the two commands of the README:
#   make book   installs, fetches the assets, executes the notebooks (default profile, unchanged ones
#               skipped) and builds the HTML book in _build/html
#   make test   ruff, pytest, a smoke run of every notebook, -W builds of the smoke and committed books,
#               the book checks (answer first, no raw math, no typed numbers; scripts/check_book.py) and
#               the offline-rendering check in headless Chromium (what CI runs: .ci/run)
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat requirements.lock pyproject.toml | sha256sum | cut -c1-12)
PROFILE ?= default
ARGS ?=

.PHONY: setup fetch book run test lint unit smoke books book-check html-check clean

$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.lock
	$(BIN)/python -m pip install -q --no-deps -e .
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	rm -f $(VENV)/.installed-* && touch $(STAMP)

setup: $(STAMP)

fetch: setup
	$(BIN)/analysis-kit fetch

book: fetch
	$(BIN)/analysis-kit book --profile $(PROFILE) $(ARGS)

run: fetch
	$(BIN)/analysis-kit run --profile $(PROFILE) $(ARGS)

lint: setup
	$(BIN)/ruff check analysis_kit tests scripts

unit: fetch
	$(BIN)/python -m pytest -q -m "not slow"

smoke: fetch
	LAYERWISE_PROGRESS=0 $(BIN)/analysis-kit run --profile smoke --force
	$(BIN)/analysis-kit book --profile smoke --no-run

books: smoke
	$(BIN)/analysis-kit book --profile default --no-run

book-check: books
	$(BIN)/python scripts/check_book.py _build/smoke_book/_build/html _build/html

html-check: books
	$(BIN)/python scripts/check_offline_html.py _build/smoke_book/_build/html _build/html

test: lint unit books book-check html-check

clean:
	rm -rf _build
