# One set-up-and-test command (`make test`) and one main job (`make run`).
# torch is pinned and installed before everything else so that pip never resolves a CUDA build.
# `make test` ends with the package as users install it: a wheel, installed outside the
# checkout, running the main job from an empty folder (.ci/check_wheel.sh, about 30 s).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0

.PHONY: install test lint wheel run slow clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[dev,ray]"
	touch $@

install: $(VENV)/.installed

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: lint
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict -q -d build/site
	$(PY) -m pytest -q
	.ci/check_wheel.sh $(PY)

wheel: install
	.ci/check_wheel.sh $(PY)

slow: install
	$(PY) -m pytest -q -m slow

run: install
	$(PY) -m esper_gym.train

clean:
	rm -rf $(VENV) outputs multirun wandb build dist
