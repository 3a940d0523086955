# Quick start: `make demo` (the main job) and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.nvcache-installed
PYTEST := $(BIN)/python -m pytest

.PHONY: demo test test-fallback bench compare stress clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# The compiled core reads through LMDB's C library: Debian's liblmdb-dev (installed here
# when missing and we are root). Without it the install warns and keeps the pure-Python
# core (setup.py also finds LMDB through pkg-config or LMDB_INCLUDE_DIR / LMDB_LIB_DIR).
LMDB_H := /usr/include/lmdb.h
$(LMDB_H):
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y -q liblmdb-dev || { apt-get update -q && apt-get install -y -q liblmdb-dev; }; \
	else \
	  echo "note: no $(LMDB_H); setup.py looks elsewhere, else installs the pure-Python core" >&2; \
	fi

# Editable install: compiles ext/_index.pyx into nvcache/_index*.so.
$(STAMP): $(BIN)/python pyproject.toml setup.py ext/_index.pyx | $(LMDB_H)
	$(BIN)/python -m pip install -q -e '.[test,bench]'
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/nvcache simulate

# The whole suite runs over both cores (compiled and pure Python) through
# the `core` fixture; the second run proves NVCACHE_NO_EXTENSIONS=1 switches
# the package default and that nothing imports the extension behind its back.
test: $(STAMP)
	$(PYTEST) -q tests
	NVCACHE_NO_EXTENSIONS=1 $(PYTEST) -q tests/test_switch.py

bench: $(STAMP)
	$(PYTEST) bench --benchmark-only --benchmark-columns=median,iqr,ops -q

compare: $(STAMP)
	$(BIN)/python bench/compare.py

stress: $(STAMP)
	$(BIN)/python bench/stress.py

clean:
	rm -rf build dist *.egg-info nvcache/*.so ext/*.c .pytest_cache .benchmarks
