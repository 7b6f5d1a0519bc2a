# `make train` and `make test` set up .venv by themselves; the install is redone when pyproject.toml changes.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torchvision (needed by open_clip) must match torch exactly; override for another platform or CUDA version.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

export WANDB_MODE ?= offline
export WANDB_SILENT ?= true

.PHONY: install train train-new vae vae-shapes features test test-slow test-all bench lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# make train continues the newest run it started with the same ARGS if that run stopped before its last step
# (killed, Ctrl-C, pre-empted; ldm/commands/unfinished.py); make train-new always starts a new run
train: $(STAMP)
	$(PY) train.py $$($(PY) -m ldm.commands.unfinished $(ARGS)) $(ARGS)

train-new: $(STAMP)
	$(PY) train.py $(ARGS)

vae: $(STAMP)
	$(PY) train.py experiment=vae_digits vae.export_path=ldm/autoencoders/weights/digits_vae.safetensors $(ARGS)

vae-shapes: $(STAMP)
	$(PY) train.py experiment=vae_shapes vae.export_path=ldm/autoencoders/weights/shapes_vae.safetensors $(ARGS)

features: $(STAMP)
	$(PY) -m ldm.tools.train_features $(ARGS)

# a worker per core (pytest-xdist); the tests that start several processes run in one worker, one at a time
test: $(STAMP)
	$(PY) -m pytest -q -n auto --dist loadgroup $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(PY) -m pytest -q -n auto --dist loadgroup -m slow $(PYTEST_ARGS)

test-all: $(STAMP)
	$(PY) -m pytest -q -n auto --dist loadgroup -m '' $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) -m ldm.tools.bench $(ARGS)

# ruff, and import-linter's contract: imports only go down the layers (pyproject.toml, [tool.importlinter])
lint: $(STAMP)
	$(PY) -m ruff check .
	$(VENV)/bin/lint-imports

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache
