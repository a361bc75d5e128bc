# The two commands of the README: `make quickstart` and `make test`. Both install what they need first.
# torch is installed only where none is: the pinned CPU build (an unpinned torch pulls GBs of CUDA wheels).
PYTHON ?= python3
PIP := $(PYTHON) -m pip
RUN := runs/quickstart
CPU := accelerate launch --config_file accelerate_configs/cpu.yaml

.PHONY: install install-test quickstart test lint

install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	$(PIP) install -q -e .

# DeepSpeed's build imports torch: installed without build isolation (keeps the installed torch).
install-test: install
	$(PIP) install -q -e ".[test]" ruff
	$(PIP) install -q --no-build-isolation "deepspeed>=0.16"

# Reference precompute -> DPO (no reference model in memory) -> held-out metrics, on the tiny demo model.
quickstart: install
	$(PYTHON) scripts/build_tiny_model.py $(RUN)/tiny-model
	$(CPU) scripts/precompute_ref_logprobs.py --config recipes/quickstart.yaml \
		--output_dir $(RUN)/ref-cache --overwrite
	$(CPU) scripts/dpo.py --config recipes/quickstart.yaml \
		--ref_logprobs $(RUN)/ref-cache --output_dir $(RUN)/dpo --overwrite_output_dir

test: install-test lint
	$(PYTHON) -m pytest -q -p no:cacheprovider tests

lint:
	$(PYTHON) -m ruff check dpo_core scripts tests
