# Two commands for a fresh machine:
#   make demo   set up .venv, distil the shipped digits teacher, sample, evaluate, print the result table
#   make test   set up .venv, run the test suite
PY      ?= python3
VENV    ?= .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
# torch 2.14.1 / torchvision 0.29.1 are the newest this workplace's pip serves; lpips needs torchvision.
TORCH   := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test setup clean

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

clean:
	rm -rf runs .pytest_cache
