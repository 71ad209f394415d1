# Entry points for a fresh machine: `make demo` and `make test` install the tested set from the lock.
#   make demo          compile builtin:toy-vlm with a two-stage plan and ask it about the bundled scene
#   make test          ruff and the test suite in .venv, installed exactly from requirements.lock
#   make test-latest   the same in .venv-latest with the newest releases inside pyproject's ranges
#   make test-lowest   the same in .venv-lowest with the lowest releases pyproject's ranges allow
#   make lock          regenerate requirements.lock (pip-compile) from pyproject's ranges
PYTHON ?= python3
LOCK := requirements.lock
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The tools that install and lock; pinned so that a new pip or pip-tools cannot change what `make test` does.
PIP := pip==26.3
PIP_TOOLS := pip-tools==7.6.2
UV := uv==0.13.9
EXTRAS := cpu,dev,serve
# The packages whose versions the notes and the test-latest/test-lowest runs print.
KEY_PACKAGES := torch transformers tokenizers onnx onnxscript onnxruntime polygraphy numpy

.PHONY: demo test lint lock test-latest test-lowest clean

# The venv is rebuilt from scratch whenever the lock or pyproject changes, so it holds the lock and nothing else.
# torch comes from the lock like every other package: `torch==2.13.0` takes a CPU wheel where pip finds one
# (as on our machines), else PyPI's build; nothing asks for a newer torch.
$(STAMP): pyproject.toml $(LOCK)
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -qq "$(PIP)"
	$(BIN)/python -m pip install -qq -r $(LOCK)
	$(BIN)/python -m pip install -qq --no-deps --no-build-isolation -e .
	$(BIN)/python -m pip check
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/btp-compile builtin:toy-vlm --plan tools/data/toy-vlm-plan.json -o build/demo --force
	@echo "question: Where is the white circle?   (tools/data/toy-scene.png; the right answer: bottom left)"
	$(BIN)/btp-run build/demo --image tools/data/toy-scene.png --prompt "Where is the white circle?" \
		--max-new-tokens 8 --explain build/demo-kept.png

lint: $(STAMP)
	$(BIN)/ruff check .

# The suite in pytest-xdist workers, one per core of the CI machine (2): about half the time of one process.
# `make test PYTEST_WORKERS=0` runs it in one process.
PYTEST_WORKERS ?= 2

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS)

# requirements.lock: every direct and transitive dependency of .[cpu,dev], resolved by pip's own resolver
# (pip-compile), so it sees the indexes and wheel directories pip is configured with. The local-version label
# of a platform build (torch 2.13.0+cpu) is dropped: the lock pins the release, pip picks the build.
lock: $(VENV)-lock/.installed
	$(VENV)-lock/bin/pip-compile --quiet --upgrade --strip-extras --allow-unsafe --no-emit-index-url \
		--no-emit-find-links --extra $(subst $(comma), --extra ,$(EXTRAS)) --output-file $(LOCK) pyproject.toml
	sed -E -i 's/^([A-Za-z0-9_.-]+==[0-9][0-9A-Za-z.]*)\+[0-9A-Za-z.]+/\1/' $(LOCK)
	@echo "wrote $(LOCK): $$(grep -c '==' $(LOCK)) pinned packages; run make test before committing it"

$(VENV)-lock/.installed:
	rm -rf $(VENV)-lock
	$(PYTHON) -m venv $(VENV)-lock
	$(VENV)-lock/bin/python -m pip install -qq "$(PIP)" "$(PIP_TOOLS)" "$(UV)"
	touch $@

comma := ,

# A fresh venv each time: the newest releases that pyproject's ranges admit, installed by pip's resolver.
test-latest:
	rm -rf $(VENV)-latest
	$(PYTHON) -m venv $(VENV)-latest
	$(VENV)-latest/bin/python -m pip install -qq --upgrade pip
	$(VENV)-latest/bin/python -m pip install -qq --upgrade --upgrade-strategy eager -e ".[$(EXTRAS)]"
	$(VENV)-latest/bin/python -m pip check
	@$(VENV)-latest/bin/python -m pip list --disable-pip-version-check 2>/dev/null | \
		grep -iE "^($(subst $(space),|,$(KEY_PACKAGES))) " | tr -s ' ' | tr '\n' ';'; echo
	$(VENV)-latest/bin/ruff check .
	$(VENV)-latest/bin/python -m pytest -n $(PYTEST_WORKERS)

# The lowest releases of the packages pyproject names (uv's lowest-direct resolution), as constraints: the
# packages they pull in come at whatever version those need.
test-lowest: $(VENV)-lock/.installed
	rm -rf $(VENV)-lowest
	mkdir -p build
	$(VENV)-lock/bin/uv pip compile --quiet --resolution lowest-direct --python $(PYTHON) --no-header \
		--extra $(subst $(comma), --extra ,$(EXTRAS)) --output-file build/lowest.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)-lowest
	$(VENV)-lowest/bin/python -m pip install -qq "$(PIP)"
	$(VENV)-lowest/bin/python -m pip install -qq -c build/lowest.txt -e ".[$(EXTRAS)]"
	$(VENV)-lowest/bin/python -m pip check
	@$(VENV)-lowest/bin/python -m pip list --disable-pip-version-check 2>/dev/null | \
		grep -iE "^($(subst $(space),|,$(KEY_PACKAGES))) " | tr -s ' ' | tr '\n' ';'; echo
	$(VENV)-lowest/bin/ruff check .
	$(VENV)-lowest/bin/python -m pytest -n $(PYTEST_WORKERS)

empty :=
space := $(empty) $(empty)

clean:
	rm -rf $(VENV) $(VENV)-latest $(VENV)-lowest $(VENV)-lock build .pytest_cache .ruff_cache .hypothesis
