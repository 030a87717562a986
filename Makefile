# raysky: `make demo` runs the whole job on the bundled sample; `make test` runs the suite.
# Both create and install .venv themselves.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv test test-fast lint demo bench clean chromium docs

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[demo,test]'
	touch $(STAMP)

venv: $(STAMP)

# The official ISIC scorer needs pandas < 3, so the cross-check tests run it from its own venv.
.venv-isic/.installed:
	$(PYTHON) -m venv .venv-isic
	.venv-isic/bin/pip install -q 'isic-challenge-scoring==5.6.0' 'pandas>=2.1,<3'
	touch $@

# The report test renders the page in headless Chromium; fresh Debian/Ubuntu CI machines lack it.
chromium:
	@command -v chromium >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1 || \
	  { SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); $$SUDO apt-get update -qq && \
	    $$SUDO apt-get install -y -qq chromium; }

lint: venv
	$(BIN)/ruff check .
	$(BIN)/lint-imports

test: venv lint .venv-isic/.installed chromium
	$(BIN)/pytest -q -p no:cacheprovider

# The edit-test loop: everything but the tests marked slow (Ray clusters, training runs).
test-fast: venv lint .venv-isic/.installed chromium
	$(BIN)/pytest -q -p no:cacheprovider -m "not slow"

demo: venv
	$(BIN)/raysky demo

# The documentation site (MkDocs, Material theme: the `docs` extra, which `test` includes) into
# site/; --strict turns a broken link, a missing anchor or a page left out of the navigation
# into a failed build.
docs: venv
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) .pytest_cache build site *.egg-info
