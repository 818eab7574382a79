# sensorwatch developer and CI entry points. `make test` is what CI runs (through .ci/run).
#
# The virtual environment lives outside the checkout and is shared by every clone on the machine,
# because PyPI's default Linux torch wheel is a multi-GB CUDA build: it is installed once, and only
# reinstalled when pyproject.toml changes (the stamp file name carries its hash).

SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV ?= $(HOME)/.cache/sensorwatch/venv
PY := $(VENV)/bin/python
PYTHON ?= python3
PYTEST_ARGS ?=
PYPROJECT_HASH := $(shell sha256sum pyproject.toml | cut -c1-16)
STAMP := $(VENV)/.sensorwatch-$(PYPROJECT_HASH)

.PHONY: help venv system-deps kafka-jars test demo lint clean-venv-stamps

help:
	@echo "make venv         cached virtualenv at $(VENV) (torch once, then the project editable with [test])"
	@echo "make system-deps  PostgreSQL server, Java, Maven and openssl from apt when missing (as root)"
	@echo "make kafka-jars   fetch the local Kafka broker jars into ~/.cache/sensorwatch (once)"
	@echo "make test         all tests; needs the above; CI=true turns missing services into failures"
	@echo "make demo         sensorwatch demo (local broker unless KAFKA_BOOTSTRAP_SERVERS is set)"
	@echo "make lint         ruff check"

# The stamp has no prerequisites on purpose: a fresh clone's pyproject.toml is always newer than the
# stamp, so an mtime rule would reinstall everything on every CI run. The hash in its name is the key.
$(STAMP):
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q 'setuptools>=68' wheel
	@$(PY) -c 'import torch' 2>/dev/null || { echo "installing torch into $(VENV) (large download, once)"; \
		$(PY) -m pip install torch; }
	$(PY) -m pip install -e '.[test]'
	@rm -f $(VENV)/.sensorwatch-*
	@touch $@

# The venv is shared between clones: point its editable install at this checkout when it points
# elsewhere (or nowhere) - cheap, no dependency resolution.
venv: $(STAMP)
	@where=$$(cd /tmp && $(PY) -c 'import pipeline, os; print(os.path.dirname(os.path.dirname(os.path.realpath(pipeline.__file__))))' 2>/dev/null); \
	if [ "$$where" != "$$(realpath $(CURDIR))" ]; then \
		echo "pointing the editable install in $(VENV) at $(CURDIR)"; \
		out=$$($(PY) -m pip install -q --no-deps --no-build-isolation -e . 2>&1) || { echo "$$out" >&2; exit 1; }; \
	fi

# Debian: PostgreSQL server binaries (without the auto-created main cluster), Java 17+, Maven and openssl (the test
# broker's certificates).
system-deps:
	@missing=""; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 \
		|| missing="$$missing postgresql"; \
	command -v java >/dev/null 2>&1 || missing="$$missing default-jdk-headless"; \
	command -v mvn >/dev/null 2>&1 || missing="$$missing maven"; \
	command -v openssl >/dev/null 2>&1 || missing="$$missing openssl"; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then \
		echo "warning: missing system packages:$$missing (Debian: sudo apt-get install$$missing);" \
		     "tests that need them will skip (or fail with CI=true)" >&2; exit 0; fi; \
	set -e; export DEBIAN_FRONTEND=noninteractive; \
	echo "installing system packages:$$missing"; \
	apt-get update -qq; \
	case "$$missing" in *postgresql*) \
		apt-get install -y -qq --no-install-recommends postgresql-common >/dev/null; \
		sed -ri 's/^#?\s*create_main_cluster\s*=.*/create_main_cluster = false/' \
			/etc/postgresql-common/createcluster.conf;; \
	esac; \
	apt-get install -y -qq --no-install-recommends $$missing >/dev/null

kafka-jars: venv system-deps
	@$(PY) -m pipeline.localinfra jars >/dev/null

test: venv system-deps kafka-jars
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

demo: venv system-deps kafka-jars
	$(VENV)/bin/sensorwatch demo

lint: venv
	$(VENV)/bin/ruff check .

# Forget the install stamp (next `make venv` re-runs pip install -e '.[test]'; torch stays).
clean-venv-stamps:
	rm -f $(VENV)/.sensorwatch-*
