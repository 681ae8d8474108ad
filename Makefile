# advrec developer commands. `make help` lists them.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)
PYTEST_ARGS ?=

.PHONY: help install kafka-start kafka-stop test test-unit lint demo bench clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

# pip's own lines show the progress (a first install downloads torch: minutes); the sed drops
# setuptools' banner about editable installs (its first line and the 9 after it), nothing else
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || { echo "== creating $(VENV)"; $(PY) -m venv $(VENV); }
	@echo "== installing advrec with every extra into $(VENV) (the first time downloads torch: a few minutes)"
	$(BIN)/pip install -q --upgrade pip wheel setuptools
	@set -o pipefail; $(BIN)/pip install --progress-bar off -e '.[serving,trainer,dev]' 2>&1 \
	  | sed -u '/BuildBackendWarning: Editable installation/,+9d' \
	  | { grep --line-buffered -v '^Requirement already satisfied' || true; }
	@rm -f $(VENV)/.installed-* && touch $@
	@echo "== installed"

install: $(STAMP)  ## create .venv and install advrec with every extra (once)
	@scripts/kafka.sh fetch

kafka-start: install  ## start the local Kafka broker on 127.0.0.1:9092
	scripts/kafka.sh start

kafka-stop:  ## stop the local Kafka broker
	scripts/kafka.sh stop

test: install  ## run every test (starts Kafka for the tests that need it)
	@if [ -x scripts/install-deploy-tools.sh ]; then scripts/install-deploy-tools.sh; fi
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-unit: install  ## run the unit tests only (no Kafka)
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

lint: install  ## ruff over the code and tests
	$(BIN)/ruff check advrec stream_app trainer tests bench

demo: install  ## the whole loop on the synthetic stream: broker, worker, trainer, replay
	$(BIN)/python scripts/demo.py

bench: install kafka-start  ## run the benchmarks (JSON under bench/results/)
	$(BIN)/python bench/ingest.py

clean:  ## remove local state (tables, bundles, checkpoints); keeps .venv and Kafka jars
	rm -rf var/
