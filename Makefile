# Two commands on a fresh machine (see README):
#   make demo   install, fine-tune the embedded tiny model with MAS, generate with the adapter
#   make test   install, run the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU machines: the local torch 2.13.0 CPU build. Override for CUDA, e.g. TORCH_SPEC="torch==2.13.0 --index-url ...".
TORCH_SPEC ?= torch==2.13.0
RUNS ?= /tmp/mas_runs

.PHONY: install demo test test-fast bench replicate clean

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

bench: install
	$(BIN)/python tools/bench_masks.py

# The miniature, pre-registered replication of docs/replication.md (CPU; rerun to continue a killed
# study; JOBS=2 runs two fine-tunes at a time on an idle 2-core machine).
JOBS ?= 1
replicate: install
	$(BIN)/python tools/replicate.py --out $(RUNS)/replication --jobs $(JOBS) --docs

clean:
	rm -rf $(VENV) build *.egg-info
