# The two commands a newcomer needs: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint migrate clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/chatd serve

migrate: $(STAMP)
	$(BIN)/chatd migrate

test: $(STAMP)
	$(BIN)/ruff check chatd tests
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check chatd tests
	$(BIN)/ruff format --check chatd tests

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info
