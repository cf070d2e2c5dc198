# kdbench: two commands on a fresh machine.
#   make demo   set up, then run the default suite (benchmarks/quickstart.yaml) and print its leaderboard;
#               results in results/quickstart/ (gitignored: the working tree stays clean)
#   make test   set up, then run the test suite
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
# A CPU wheel of this version lies on the project's machines; elsewhere pip fetches it.
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin
UV     := $(BIN)/uv pip install --quiet --python $(BIN)/python
SUITE  ?= benchmarks/quickstart.yaml
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TRANSFORMERS_VERBOSITY ?= error
# Python caches each module it compiles (__pycache__/*.pyc) unless PYTHONDONTWRITEBYTECODE
# is set, as it is on the project's machines. Neither pip (--no-compile below) nor uv
# compiles at install, so with it set every process make starts compiled torch, scipy and
# transformers from source again: about 12 s more per `kdbench run` that builds a BERT
# (27.7 s instead of 16.0 s for the smoke suite), and `make test` starts dozens. Commands
# run by make write the cache (into .venv and the gitignored __pycache__ folders) once.
unexport PYTHONDONTWRITEBYTECODE

.PHONY: setup demo test report reports clean browser peers

setup: $(VENV)/.ready

# pip installs torch alone (only pip looks at the local CPU wheel; --no-compile: imports
# compile what they use, once: see PYTHONDONTWRITEBYTECODE above); then uv, from PyPI,
# installs everything else, torch's own dependencies included, many at once (it keeps the
# installed torch: it satisfies torch>=2.3).
$(VENV)/.ready: pyproject.toml requirements/assets.txt
	test -x $(BIN)/python || $(PYTHON) -m venv --without-pip $(VENV)
	test -x $(BIN)/uv || $(PYTHON) -m pip --python $(BIN)/python install --quiet uv
	$(PYTHON) -m pip --python $(BIN)/python install --quiet --no-deps --no-compile "$(TORCH)"
	$(UV) -e ".[dev,ray,tensorboard,llm-real,peers]" pip setuptools
	$(UV) --no-deps --require-hashes -r requirements/assets.txt
	$(BIN)/kdbench prepare $(SUITE) benchmarks/smoke.yaml
	touch $@

demo: setup
	$(BIN)/kdbench run $(SUITE)

# Setup and the browser install overlap; then pytest on $(WORKERS) processes (pytest-xdist).
# Whole test files go to a worker (the Ray tests share one cluster per file), the longest
# first (tests/conftest.py, LONG_FILES), then in file order. (xdist_group marks do nothing
# under pytest 9.)
# The 30 slowest tests are listed at the end: the profile for making the suite faster.
WORKERS ?= 2
test:
	$(MAKE) --no-print-directory -j2 setup browser
	$(BIN)/python -m pytest -q -n $(WORKERS) --dist loadfile --no-loadscope-reorder --durations=30

# Debian's Chromium renders the HTML report in an end-to-end test (skipped without it).
browser:
	@if [ ! -x /usr/bin/chromium ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	fi

report: setup
	$(BIN)/kdbench report $(SUITE) --format md

# Every committed report under results/ written again from its store by the current code, in
# the formats each folder holds (refuses a dirty tree; says whether any number moved).
reports: setup
	nice -n 10 $(BIN)/python benchmarks/regenerate_reports.py

# kdbench's step beside torchdistill's and TextBrewer's (benchmarks/peers.py, docs/peers.md), in
# its own environment: torchdistill needs torchvision, and torchvision's PyPI wheels import only
# beside their own torch build (on x86_64 a 5.5 GB CUDA one), not the CPU torch .venv pins. Both
# sides run in this one environment, so they share one torch. ROUNDS: interleaved rounds (the
# script prints its expected run time after the warm-up); PEERS_OUT: where the raw rounds go.
PEERS_VENV  ?= .venv-peers
PEERS_TORCH ?= torch==2.14.1 torchvision==0.29.1
PEERS_OUT   ?= results/peers-cpu-$(shell date -u +%Y-%m-%d)
ROUNDS      ?= 5
PEERS_ARGS  ?=

peers: $(PEERS_VENV)/.ready
	$(PEERS_VENV)/bin/python benchmarks/peers.py $(PEERS_OUT) --rounds $(ROUNDS) $(PEERS_ARGS)

$(PEERS_VENV)/.ready: pyproject.toml requirements/assets.txt
	test -x $(PEERS_VENV)/bin/python || $(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/pip install --quiet $(PEERS_TORCH)
	$(PEERS_VENV)/bin/pip install --quiet -e ".[dev,peers-bench]"
	$(PEERS_VENV)/bin/pip install --quiet --no-deps --require-hashes -r requirements/assets.txt
	touch $@

# Removes the virtual environment only: results stores (committed evidence, or a suite in
# progress with its write-ahead log) and teacher checkpoints that stored runs name are never
# removed by make; delete a results folder yourself when you mean it.
clean:
	rm -rf $(VENV) $(PEERS_VENV)
