# `make demo` and `make test` create the project venv (.venv) on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# A plain `torch` request would pull a multi-GB CUDA build from PyPI; the pinned pair installs from local disk.
TORCH_PIN := torch==2.14.1 torchvision==0.29.1

.PHONY: venv test test-long demo gpu-check clean

venv: $(STAMP)

$(STAMP): setup.py constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -c constraints.txt $(TORCH_PIN)
	$(BIN)/pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev]'
	# the tests read clip-benchmark's packaged prompt files only, so without its heavy metric dependencies
	$(BIN)/pip install -q --disable-pip-version-check --no-deps clip-benchmark==1.6.2
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

# also the tests marked long (the GPU check's CPU run, ZeRO-3 resume on fewer ranks, two MDS nodes, a SIGKILLed MDS run): ~6 min more
test-long: $(STAMP)
	$(BIN)/python -m pytest -q --run-long tests

# make demo FORMAT=mds: the same demo on mosaicml-streaming shards
FORMAT ?= wds

demo: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH FORMAT=$(FORMAT) bash launch/demo.sh

# The prepared GPU check, at most 8 minutes (benchmarks/gpu_check.py); make gpu-check ARGS=--tiny: its CPU smoke run.
# On a lent GPU machine without the venv, run it with python3 after the device README's wheels line.
gpu-check: $(STAMP)
	$(BIN)/python benchmarks/gpu_check.py $(ARGS)

clean:
	rm -rf runs data
