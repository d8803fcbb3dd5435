# kdlab: every command a user or CI needs. `make test` and `make demo` work on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
# the torchvision release built against TORCH_VERSION (detection; pinned so pip never resolves
# a newer torchvision, which would pull another torch)
TORCHVISION_VERSION ?= 0.28.0
# timm (timm:NAME archs: ViT / DeiT / Swin / ConvNeXt; pinned and --no-deps so pip never resolves
# torch or torchvision through it; its other runtime deps come with the dev / vit extras)
TIMM_VERSION ?= 1.0.31
STAMP := $(VENV)/.kdlab-installed
DEV_STAMP := $(VENV)/.kdlab-dev-installed

.PHONY: setup dev test lint demo clean

# What the main job needs: torch (pinned, installed first, so pip never resolves a CUDA build
# from a range) and kdlab with its core dependencies.
setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==$(TORCH_VERSION)"
	$(PY) -m pip install -q -e .
	touch $(STAMP)
	@echo "kdlab is installed in $(VENV): run 'source $(VENV)/bin/activate' to put kdlab on PATH"
	@echo "(or call $(VENV)/bin/kdlab); 'make dev' adds the test, export, detection and timm tools"

# The development and test tools on top: the matching torchvision (--no-deps: it must not touch
# torch), timm (--no-deps: it must not touch torch or torchvision), then kdlab's dev and
# detection extras.
dev: $(DEV_STAMP)

$(DEV_STAMP): $(STAMP)
	$(PY) -m pip install -q --no-deps "torchvision==$(TORCHVISION_VERSION)"
	$(PY) -m pip install -q --no-deps "timm==$(TIMM_VERSION)"
	$(PY) -m pip install -q -e ".[dev,detection]"
	touch $(DEV_STAMP)

lint: dev
	$(VENV)/bin/ruff check src tests $(wildcard benchmarks)
	$(VENV)/bin/lint-imports

test: dev lint
	$(VENV)/bin/pytest

demo: setup
	$(PY) -m kdlab demo

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
