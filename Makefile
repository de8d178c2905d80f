# Set-up, checks, demo and benchmarks for scrapy-resilience.
#
# Every target that runs Python uses the project's own virtualenv, $(VENV), which is
# created with the machine's python3 on first use and always called by path, so no
# global tool is ever used. `make help` lists the targets.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

# The interpreter that creates the virtualenv, and the virtualenv itself.
PYTHON ?= python3
VENV ?= .venv
VENV_BIN := $(VENV)/bin
VENV_PYTHON := $(VENV_BIN)/python

# Extras of pyproject.toml installed into the virtualenv. The stamp file name carries
# them, so changing EXTRAS triggers a new install.
EXTRAS ?= test,docs,playwright,scrapyd
comma := ,
INSTALL_STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))

# Debian packages that the demo or the tests need. `make system-deps` installs the
# missing ones. python3-doc provides the real Python docs that the fault site serves,
# and python3-venv lets Debian's own python3 create a virtualenv. chromium is the
# browser that the scrapy-playwright tests drive. Append any system package that the
# Scrapyd tests need when those tests land.
DEBIAN_PACKAGES ?= python3-doc python3-venv chromium

# Extra arguments passed through to pytest, the demo and the benchmarks, for example
# `make test PYTEST_ARGS='-k circuit -x'` or `make demo DEMO_ARGS=--quick`.
PYTEST_ARGS ?=
DEMO_ARGS ?=
BENCH_ARGS ?=

# -W turns Sphinx warnings into errors, --keep-going reports all of them before
# failing, -n (nitpicky) also warns about references that resolve to nothing, and -E
# rereads every page so warnings from unchanged pages are not hidden by the cache.
SPHINX_OPTS ?= -W --keep-going -n -E
DOCS_OUTPUT := docs/_build/html

# Tests and the demo start subprocesses such as `scrapy` or `scrapyd` by name: putting
# the virtualenv first on PATH makes those resolve to the project's own copies.
export PATH := $(abspath $(VENV_BIN)):$(PATH)
export PIP_DISABLE_PIP_VERSION_CHECK := 1

# The check commands, shared by their own targets and by `make test`.
RUFF_CHECK := $(VENV_BIN)/ruff check .
RUFF_FORMAT_CHECK := $(VENV_BIN)/ruff format --check .
MYPY := $(VENV_BIN)/mypy scrapy_resilience
SPHINX_BUILD := $(VENV_PYTHON) -m sphinx -b html $(SPHINX_OPTS) docs $(DOCS_OUTPUT)

# pytest exits with 5 when it collected no tests. make fails on any non-zero status,
# so that case fails too. The message says why, because make itself exits with 2.
PYTEST := $(VENV_PYTHON) -m pytest -p no:cacheprovider $(PYTEST_ARGS) \
	|| { status=$$?; \
	     if [ "$$status" -eq 5 ]; then echo "error: pytest collected no tests (exit status 5)" >&2; fi; \
	     exit "$$status"; }

.PHONY: help system-deps venv install demo test lint typecheck pytest docs bench clean distclean

help:
	@echo "Targets:"
	@echo "  make demo         set up, then run the main job (example_project/run_main_job.py)"
	@echo "  make test         set up, then run ruff, mypy, pytest and the docs build"
	@echo "  make lint         ruff check and ruff format --check"
	@echo "  make typecheck    mypy on scrapy_resilience"
	@echo "  make pytest       only the test suite (PYTEST_ARGS passes arguments)"
	@echo "  make docs         build the Sphinx docs into $(DOCS_OUTPUT)"
	@echo "  make bench        run benchmarks/run.py (BENCH_ARGS passes arguments)"
	@echo "  make install      create $(VENV) and install the package with [$(EXTRAS)]"
	@echo "  make system-deps  install the missing Debian packages: $(DEBIAN_PACKAGES)"
	@echo "  make clean        remove build outputs and caches (keeps $(VENV))"
	@echo "  make distclean    clean, and also remove $(VENV) and .tox"

# Install the Debian packages of DEBIAN_PACKAGES that dpkg does not report as
# installed. Does nothing, and runs no apt-get, when all of them are present.
system-deps:
	@if ! command -v dpkg >/dev/null 2>&1; then \
	  echo "system-deps: dpkg not found, so this is not Debian; install these yourself: $(DEBIAN_PACKAGES)"; \
	  exit 0; \
	fi; \
	missing=(); \
	for package in $(DEBIAN_PACKAGES); do \
	  dpkg -s "$$package" 2>/dev/null | grep '^Status: install ok installed' >/dev/null \
	    || missing+=("$$package"); \
	done; \
	if [ "$${#missing[@]}" -eq 0 ]; then \
	  echo "system-deps: all present: $(DEBIAN_PACKAGES)"; \
	  exit 0; \
	fi; \
	if [ "$$(id -u)" -eq 0 ]; then \
	  as_root=(); \
	elif command -v sudo >/dev/null 2>&1; then \
	  as_root=(sudo); \
	else \
	  echo "error: missing Debian packages: $${missing[*]}; run make as root or install sudo" >&2; \
	  exit 1; \
	fi; \
	echo "system-deps: installing $${missing[*]}"; \
	"$${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update; \
	"$${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$${missing[@]}"

# Create the virtualenv when its python is missing or broken (for example after the
# interpreter it was made from was removed). A half-made one is removed on failure.
$(VENV_PYTHON): | system-deps
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); echo "error: '$(PYTHON) -m venv $(VENV)' failed" >&2; exit 1; }

venv: $(VENV_PYTHON)

# Install the package in editable mode, again whenever pyproject.toml changes.
$(INSTALL_STAMP): pyproject.toml | $(VENV_PYTHON)
	$(VENV_PYTHON) -m pip install --upgrade pip
	$(VENV_PYTHON) -m pip install -e '.[$(EXTRAS)]'
	touch $@

install: system-deps $(INSTALL_STAMP)

demo: install
	$(VENV_PYTHON) example_project/run_main_job.py $(DEMO_ARGS)

test: install
	$(RUFF_CHECK)
	$(RUFF_FORMAT_CHECK)
	$(MYPY)
	$(PYTEST)
	$(SPHINX_BUILD)

lint: install
	$(RUFF_CHECK)
	$(RUFF_FORMAT_CHECK)

typecheck: install
	$(MYPY)

pytest: install
	$(PYTEST)

docs: install
	$(SPHINX_BUILD)

bench: install
	@if [ -f benchmarks/run.py ]; then \
	  echo "$(VENV_PYTHON) benchmarks/run.py $(BENCH_ARGS)"; \
	  $(VENV_PYTHON) benchmarks/run.py $(BENCH_ARGS); \
	else \
	  echo "bench: benchmarks/run.py does not exist yet, so there is nothing to run"; \
	fi

clean:
	rm -rf build dist *.egg-info docs/_build example_project/output
	rm -rf .mypy_cache .ruff_cache .pytest_cache .coverage .coverage.* htmlcov
	find . \( -path ./$(VENV) -o -path ./.tox -o -path ./.git \) -prune -o -type d -name __pycache__ -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) .tox
