# Two commands get a new user going (see README):
#   make demo   set up, then distill on Fashion-MNIST (a few minutes on 2 CPU cores)
#   make test   set up, then run the test suite
# VENV may point anywhere (CI keeps one outside the clone, keyed on the lock).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
STAMP := $(VENV)/.okdpipe-installed

.PHONY: setup data demo lint test bench clean

setup: $(STAMP)

# torch 2.14.1 / torchvision 0.29.1 are pinned in the lock; pip takes them from the machine's local wheel store
# where there is one. The editable install maps distill/, datasets/, export/, serve/ under `okdpipe.`. The example
# plug-in (examples/plugin) is installed too: the tests train, export and serve what it registers.
$(STAMP): requirements.lock pyproject.toml examples/plugin/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps -e .
	$(BIN)/python -m pip install --quiet --no-deps -e examples/plugin
	touch $(STAMP)

# Fashion-MNIST from Debian's package (root on Debian/Ubuntu); elsewhere put the four IDX files in
# $$OKDPIPE_DATA/fashion-mnist or pass --data-dir.
data:
	@test -f $(FMNIST) || test -f "$$OKDPIPE_DATA/fashion-mnist/train-images-idx3-ubyte.gz" || \
	  { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; }

demo: setup data
	$(BIN)/okdpipe distill --method vanilla --arch resnet20 --dataset fashion-mnist --epochs 2 --out runs/demo

# Lint (ruff check + format check) then the whole suite: what CI runs.
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: setup data lint
	$(BIN)/python -m pytest -q --durations=30

bench: setup data
	$(BIN)/python -m pytest benchmarks -q --benchmark-only

clean:
	rm -rf runs .pytest_cache
