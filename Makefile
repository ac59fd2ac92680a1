# The README's two commands: `make demo` (set up + main job on the embedded model) and `make test`
# (ruff, then the tests; tests/test_notebooks.py executes every notebook and checks its offline HTML export).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
OUT ?= runs/demo

.PHONY: demo test lint venv clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e ".[dev,embedded]"
	touch $@

venv: $(VENV)/.installed

lint: venv
	$(BIN)/ruff check .

test: venv lint
	$(BIN)/python -m pytest -q tests

demo: venv
	$(BIN)/refusal-lens run --out $(OUT) --overwrite

clean:
	rm -rf $(VENV) .pytest_cache
