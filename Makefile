# Two commands from a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A CPU build of torch keeps the install small; GPU users install preftune with their own torch.
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test test-slow test-all lint format install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[test,demo,deepspeed,qlora]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/preftune demo

# The fast tier, for the edit-and-test loop; test-all adds the slow tier (runs of the command
# line in fresh processes, several processes, long runs), as CI does.
test: install
	$(BIN)/ruff check preftune tests bench
	$(BIN)/ruff format --check preftune tests bench
	$(BIN)/mypy
	$(BIN)/python -m pytest -m "not slow"

test-slow: install
	$(BIN)/python -m pytest -m slow

test-all: test test-slow

format: install
	$(BIN)/ruff format preftune tests bench
	$(BIN)/ruff check --fix preftune tests bench

clean:
	rm -rf $(VENV) runs .pytest_cache
