# The two set-up commands of the README: `make demo` (the main job) and `make test` (the test suite).
# Both install what they need first; torch is pinned here, not in pyproject.toml (a library states floors).
PYTHON ?= python3
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
FASHION_MNIST_DIR ?= /usr/share/datasets/fashion-mnist

.PHONY: install data demo test test-all lint bench

install: .install.stamp

.install.stamp: pyproject.toml setup.py
	$(PYTHON) -m pip install --quiet $(TORCH_PINS)
	$(PYTHON) -m pip install --quiet -e '.[dev]'
	touch $@

data:
	@if [ -d "$(FASHION_MNIST_DIR)" ]; then echo "Fashion-MNIST: $(FASHION_MNIST_DIR)"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	else echo "Fashion-MNIST not found: run 'sudo apt-get install dataset-fashion-mnist'," \
		"or pass --download to the training scripts (needs internet)"; exit 1; fi

demo: install data
	$(PYTHON) training/demo.py

test: install data
	$(PYTHON) -m pytest

# ruff (lint, import order) and import-linter (the layers of sd_zoo), both from the dev extra; see pyproject.toml
lint: install
	$(PYTHON) -m ruff check .
	$(PYTHON) -c 'from importlinter.cli import lint_imports_command; lint_imports_command()'

test-all: install data
	$(PYTHON) -m pytest -m 'not network and not gpu'

bench: install
	$(PYTHON) benchmarks/train_step.py
