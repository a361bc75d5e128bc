r"""Supervised fine-tuning of a causal LM on completions (loss on completion tokens only), under any
accelerate config. Its output directory is the starting policy (and reference) for scripts/dpo.py.

Examples (the tiny demo model: `python scripts/build_tiny_model.py runs/tiny-model`):

    # one process (CPU, MPS or one GPU): the chosen responses of the demo preference pairs
    accelerate launch --config_file accelerate_configs/cpu.yaml scripts/sft.py \
        --model_name_or_path runs/tiny-model --dataset_name data/demo --eval_split test \
        --output_dir runs/sft --learning_rate 3e-3 --max_steps 60 --max_length 96

    # the SFT recipe of the quick start, on two CPU processes (gloo)
    accelerate launch --config_file accelerate_configs/multi_cpu.yaml scripts/sft.py \
        --config recipes/sft_quickstart.yaml --output_dir runs/sft-2p

    # then DPO from the SFT model (it is also the reference)
    accelerate launch scripts/dpo.py --config recipes/quickstart.yaml --model_name_or_path runs/sft \
        --output_dir runs/dpo-from-sft

Data: preference records (the chosen completion is trained on, tokenized exactly as dpo.py does),
`{"prompt", "completion"}` records, or `{"messages": [...]}` conversations (the last assistant turn is
the completion). A DPO recipe works too: its DPO-only keys (beta, loss_type, ...) are ignored.

Writes into --output_dir: the model (safetensors) and tokenizer, config.yaml, train_results.json,
logs/ (TensorBoard: train/loss, eval/loss, eval/perplexity, train/learning_rate, train/grad_norm,
train/tokens_per_second, */logps/completion) and checkpoints/ (with --save_steps).
"""

from dpo_core.allocator import preload_allocator

preload_allocator(__name__)  # first, before torch: tcmalloc or jemalloc where installed (dpo_core/allocator.py)

from dpo_core.cli import run_cli
from dpo_core.config import DPOArguments, SFTConfig, parse_config
from dpo_core.sft import train_sft


def main(argv=None):
    (config,) = parse_config((SFTConfig,), argv, description=__doc__, yaml_ignore=(DPOArguments,))
    train_sft(config)


if __name__ == "__main__":
    run_cli(main)
