# moec: `make demo` runs the pipeline on the bundled reference model, `make test` runs the tests.
# Both set up their own virtual environment first (torch CPU build installed before the package).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
OUT ?= out

.PHONY: setup demo test test-all clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

demo: setup
	mkdir -p $(OUT)
	$(BIN)/moec profile reference/checkpoint --data reference/data/calib.txt --out $(OUT)/profile.json --plot $(OUT)/profile.png
	$(BIN)/moec eval reference/checkpoint --data reference/data/heldout.txt

test: setup
	$(BIN)/pytest -q

test-all: setup
	$(BIN)/pytest -q -m ''

clean:
	rm -rf $(OUT) .pytest_cache
