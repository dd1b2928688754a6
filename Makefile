# The two commands a newcomer needs: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Browser tests drive Debian's Chromium through Playwright; no browser is ever downloaded.
CHROMIUM ?= /usr/bin/chromium

.PHONY: run test soak lint migrate clean browser-deps browser-test sdk

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	touch $(STAMP)

install: $(STAMP)

# Readable log lines on a terminal; chatd's own default is JSON lines (see README).
# `exec`: the recipe's shell becomes chatd, make's only child. make passes a SIGTERM on
# to its children and waits for them, so `kill <make's PID>` drains chatd and stops its
# embedded PostgreSQL before make exits; Ctrl-C signals make and chatd together.
run: $(STAMP)
	CHATD_LOG_FORMAT="$${CHATD_LOG_FORMAT:-console}" exec $(BIN)/chatd serve

migrate: $(STAMP)
	$(BIN)/chatd migrate

# Test files run in TEST_WORKERS processes, each with its own server, PostgreSQL and
# Redis (a file's tests stay together, in order, in one of them).
TEST_WORKERS ?= 2

test: $(STAMP)
	$(BIN)/ruff check chatd tests examples
	$(BIN)/pytest -n $(TEST_WORKERS) --dist loadfile
	@$(MAKE) --no-print-directory browser-test

# The load-shaped fault tests, SOAK times bigger (5,000 sockets in the storm, ...); not in CI.
SOAK ?= 5
soak: $(STAMP)
	CHATD_SOAK=$(SOAK) $(BIN)/pytest tests/test_reconnect_storm.py tests/test_slow_consumer.py tests/test_crash.py

# Installs Debian's chromium when it is missing and we may (root, apt-get).
browser-deps:
	@if [ ! -x "$(CHROMIUM)" ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  echo "installing Debian's chromium for the browser tests"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y -q chromium >/dev/null 2>&1 || \
	  { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1; } || true; \
	fi

# Runs the real-browser tests when Chromium is there, and says so loudly when it is not.
browser-test: $(STAMP) browser-deps
	@if [ -x "$(CHROMIUM)" ]; then \
	  CHATD_BROWSER_TESTS=1 CHATD_CHROMIUM=$(CHROMIUM) $(BIN)/pytest tests/browser; \
	else \
	  echo "*** browser tests NOT RUN: no Chromium at $(CHROMIUM)."; \
	  echo "*** Install Debian's chromium (make browser-deps as root) or set CHROMIUM=..."; \
	fi

# The bot SDK's own wheel (chatd-bot: chatd.bot, chatd.client, chatd.protocol,
# chatd.signing; httpx, websockets and msgspec only) into dist/.
sdk: $(STAMP)
	$(BIN)/pip wheel --quiet --no-deps --wheel-dir dist ./sdk
	rm -rf sdk/build

lint: $(STAMP)
	$(BIN)/ruff check chatd tests examples
	$(BIN)/ruff format --check chatd tests

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info
