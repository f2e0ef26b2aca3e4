# Two commands for a fresh machine:
#   make demo   set up .venv, distil the shipped digits teacher, sample, evaluate, print the result table
#   make test   set up .venv, run the test suite
PY      ?= python3
VENV    ?= .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
# torch 2.14.1 / torchvision 0.29.1: the newest versions tested with this project; lpips needs torchvision.
TORCH   := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test setup clean gpu-wheels

$(STAMP): pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --disable-pip-version-check $(TORCH)
	$(VPY) -m pip install -q --disable-pip-version-check -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VPY) bench/digits_table.py --demo --out runs/demo

test: $(STAMP)
	$(VPY) -m pytest -q tests

# Wheels the GPU machine lacks (it has torch and triton, no network): see bench/gpu_session.sh.
GPU_WHEELS := diffusers==0.42.1 lpips==0.1.4 hjson==3.1.0 pydantic==2.14.4 pydantic_core==2.50.5 \
	annotated-types==0.8.0 typing-inspection==0.4.5 typing_extensions==4.16.0 importlib_metadata==10.2.0 \
	lazy-importer==0.1.0 transformers==5.24.0 tokenizers==0.23.3 regex==2026.11.19
gpu-wheels: $(STAMP)
	$(VPY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d .whl $(GPU_WHEELS)
	$(VPY) -m pip wheel -q --no-deps --no-build-isolation -w .whl deepspeed==0.19.8  # an sdist on PyPI

clean:
	rm -rf runs .pytest_cache
