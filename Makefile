# Every check CI runs has a target here, so a person can run exactly what CI runs.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
PORT    ?= 8080
DATA    ?= ./deploybus-data
PYTEST_ARGS ?=

.PHONY: help venv install demo brokers test test-unit test-contract test-e2e test-packaging lint typecheck bench clean deb wheelhouse

help:
	@echo "make demo     - create .venv, install, run 'deploybus up' on http://127.0.0.1:$(PORT)/"
	@echo "make test     - install test needs (Debian packages, brokers), run the whole suite"
	@echo "make brokers  - install/configure/start RabbitMQ (AMQP+STOMP) and ActiveMQ (root)"
	@echo "make lint     - ruff;  make typecheck - mypy"
	@echo "make bench    - bench/fanout.py at N=10"
	@echo "make deb      - deploybus-agent and deploybus-server .debs in packaging/dist/ (offline;"
	@echo "                DEB_VERSION=... for another version; packaging/README.md)"

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python setup.cfg pyproject.toml
	$(BIN)/pip install -q -e '.[test]'
	touch $@

venv: $(BIN)/python
install: $(VENV)/.installed

# The wheels the Debian packages bundle (packaging/requirements.txt), fetched
# once with the machine's pip configuration; `make deb` then builds offline.
WHEELHOUSE := packaging/wheelhouse
$(WHEELHOUSE)/.complete: packaging/requirements.txt $(VENV)/.installed
	$(BIN)/pip wheel -q --disable-pip-version-check -r packaging/requirements.txt -w $(WHEELHOUSE)
	touch $@
wheelhouse: $(WHEELHOUSE)/.complete

# Needs the Debian build tools scripts/setup-brokers.sh installs (make brokers).
deb: install wheelhouse
	$(if $(DEB_VERSION),DEB_VERSION=$(DEB_VERSION)) bash packaging/build-deb.sh

# The main job: everything in one process on the in-process bus, with a sample project.
demo: install
	$(BIN)/deploybus up --port $(PORT) --data $(DATA)

brokers:
	bash scripts/setup-brokers.sh

# The test command CI runs (.ci/run): system packages and brokers first, then the suite.
test: brokers install wheelhouse lint typecheck
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-unit: install
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

test-contract: brokers install
	$(BIN)/python -m pytest tests/contract $(PYTEST_ARGS)

test-e2e: brokers install
	$(BIN)/python -m pytest tests/e2e $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check deploybus daemons frontend tests bench

typecheck: install
	$(BIN)/mypy deploybus daemons frontend

test-packaging: brokers install wheelhouse
	$(BIN)/python -m pytest tests/packaging $(PYTEST_ARGS)

bench: brokers install
	$(BIN)/python bench/fanout.py --hosts 10

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache packaging/dist $(WHEELHOUSE)
