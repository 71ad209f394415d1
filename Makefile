# Two entry points for a fresh machine: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# A CPU machine installs this torch first so that nothing pulls a multi-GB CUDA build; override on GPU hosts.
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[cpu,dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/btp-compile builtin:tiny-llava --plan btp -o build/demo --force
	$(BIN)/btp-run build/demo --image tools/data/sample.png --prompt "What is shown in the image?" \
		--max-new-tokens 16 --explain build/demo-kept.png

lint: $(STAMP)
	$(BIN)/ruff check .

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) build .pytest_cache .ruff_cache .hypothesis
