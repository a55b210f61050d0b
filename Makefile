# One entry point for people and CI. `make test` and `make demo` work on a fresh machine:
# they create .venv, install torch (the registry's CUDA build, which also runs on CPU) and the
# package with its extras, then do their job.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch/torchvision pair that timm can import on these machines (REFERENCE.md); override for other hosts,
# e.g. `make test TORCH_SPEC="torch torchvision"`.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
EXTRAS ?= onnx,review,train,test,dali
PYTEST_ARGS ?=

.PHONY: venv test lint demo clean

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	$(BIN)/pip install --quiet -e ".[$(EXTRAS)]"
	touch $@

venv: $(VENV)/.installed

test: venv
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -ra $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check capsule_batch train tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
