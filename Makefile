# fsledger: the two commands a newcomer needs are `make run PHOTOS=DIR` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Two stamps on one venv: `make run` installs the runtime only (fsledger[all]: no test
# tools); `make test` / `make install` add the dev extras to the same venv.
RUNTIME := $(VENV)/.installed-runtime
STAMP   := $(VENV)/.installed

.PHONY: install system-deps run test test-fast lint unit bench bench-quick clean

# native/install.sh: the `fsledger` command becomes the native launcher (native/fsledger.c),
# which serves `fsledger scan` through a running daemon and execs the Python console script,
# moved to $(VENV)/libexec/fsledger, for the rest. Again after each pip install, which writes
# bin/fsledger anew.
$(RUNTIME): pyproject.toml native/fsledger.c native/install.sh
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[all]'
	bash native/install.sh $(VENV)
	touch $(RUNTIME)

$(STAMP): $(RUNTIME)
	$(BIN)/pip install --quiet -e '.[dev]'
	bash native/install.sh $(VENV)
	touch $(STAMP)

install: $(STAMP)

# Debian packages the tests and benchmarks drive (rsync, git, chromium, b3sum); needs root.
system-deps:
	bash .ci/system-deps

run: $(RUNTIME)
	@if [ -n "$(PHOTOS)" ]; then \
	    $(BIN)/fsledger repo add "$(PHOTOS)" --if-missing --no-scan || exit $$?; \
	fi
	$(BIN)/fsledger run $(RUN_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy

# Tests run on every core (pytest-xdist; XDIST= runs them in one process). The tests marked
# pg_restart stop the shared PostgreSQL server, which would fail every other test using it
# meanwhile: they run afterwards, alone (exit code 5 is "none selected", with PYTEST_ARGS).
XDIST ?= -n auto --dist worksteal

unit: $(STAMP)
	$(BIN)/pytest -q $(XDIST) -m "not pg_restart" $(PYTEST_ARGS)
	$(BIN)/pytest -q -m pg_restart $(PYTEST_ARGS) || [ $$? -eq 5 ]

# The edit-test loop: everything but the tests marked slow (and pg_restart), on every core,
# with the slowest ten shown (a test that takes seconds belongs in `slow`: README, Tests).
test-fast: $(STAMP)
	$(BIN)/pytest -q $(XDIST) -m "not slow and not pg_restart" --durations=10 $(PYTEST_ARGS)

test: system-deps lint unit

bench: $(STAMP)
	$(BIN)/python -m benchmarks $(BENCH_ARGS)

# The CLI's start-up (python -m benchmarks.startup) first: seconds, and no library needed.
bench-quick: $(STAMP)
	-$(BIN)/python -m benchmarks.startup --quick
	$(BIN)/python -m benchmarks --quick $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
