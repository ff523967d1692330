# moec: `make demo` runs the pipeline on the bundled reference model, `make test` runs the tests.
# Both set up their own virtual environment first (torch CPU build installed before the package).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
OUT ?= out
# pytest-xdist workers for `make test` (2 on the 2-core CI machine; tests of the emulated arm64 device stay on one)
JOBS ?= 2

.PHONY: setup demo test test-fast clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

demo: setup
	mkdir -p $(OUT)
	$(BIN)/moec profile reference/checkpoint --data reference/data/calib.txt --max-tokens 16384 --out $(OUT)/profile.json --plot $(OUT)/profile.png
	$(BIN)/moec eval reference/checkpoint --data reference/data/heldout.txt --max-tokens 16384
	$(BIN)/moec eval reference/checkpoint --data reference/data/heldout.txt --max-tokens 16384 --plan uniform:4
	$(BIN)/moec compile reference/checkpoint --target host --plan uniform:4 --out $(OUT)/reference-host
	$(BIN)/moec eval $(OUT)/reference-host --data reference/data/heldout.txt --max-tokens 16384
	$(BIN)/moec run $(OUT)/reference-host --prompt "The list type is" --max-new-tokens 32

test: setup
	$(BIN)/pytest -q -n $(JOBS) --dist loadgroup --durations=30

test-fast: setup
	$(BIN)/pytest -q -m 'not slow'

clean:
	rm -rf $(OUT) .pytest_cache
