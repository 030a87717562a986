# raysky: `make demo` runs the whole job on the bundled sample; `make test` runs the suite.
# Both create and install .venv themselves.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv test lint demo bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

lint: venv
	$(BIN)/ruff check .

test: venv lint
	$(BIN)/pytest -q -p no:cacheprovider

demo: venv
	$(BIN)/raysky demo

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
