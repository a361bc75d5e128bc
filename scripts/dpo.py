r"""Direct Preference Optimization of a causal LM, under any accelerate config.

Examples (the tiny demo model: `python scripts/build_tiny_model.py runs/tiny-model`):

    # one process (CPU, MPS or one GPU)
    accelerate launch --config_file accelerate_configs/cpu.yaml scripts/dpo.py \
        --model_name_or_path runs/tiny-model --dataset_name data/demo --eval_split test \
        --output_dir runs/dpo --learning_rate 1e-3 --max_steps 60 --beta 0.1

    # two CPU processes (gloo), reference log-probs from a precomputed cache (see `make quickstart`)
    accelerate launch --config_file accelerate_configs/multi_cpu.yaml scripts/dpo.py \
        --config recipes/quickstart.yaml --ref_logprobs runs/quickstart/ref-cache --output_dir runs/dpo-2p

    # DeepSpeed ZeRO-3 on 8 GPUs (also deepspeed_zero2.yaml, deepspeed_zero3_offload.yaml, fsdp.yaml, ddp.yaml);
    # the reference model is sharded like the policy. On CPU: add --num_processes 2 --mixed_precision no
    accelerate launch --config_file accelerate_configs/deepspeed_zero3.yaml scripts/dpo.py \
        --model_name_or_path runs/tiny-model --dataset_name data/demo --output_dir runs/dpo-z3 --max_steps 60

    # any flag may come from a YAML file; the command line overrides it
    accelerate launch scripts/dpo.py --config recipes/quickstart.yaml --output_dir runs/dpo-mix \
        --beta 0.2 --loss_type sigmoid sft --loss_weights 1 0.2

    # LoRA (the reference: the base with the adapter disabled); QLoRA adds --load_in_4bit
    accelerate launch --config_file accelerate_configs/cpu.yaml scripts/dpo.py \
        --model_name_or_path runs/tiny-model --dataset_name data/demo --eval_split test \
        --output_dir runs/dpo-lora --use_lora --lora_r 16 --learning_rate 1e-3 --max_steps 20 --merge_adapter

    # TR-DPO: the reference moves toward the policy every 10 steps
    accelerate launch --config_file accelerate_configs/cpu.yaml scripts/dpo.py \
        --model_name_or_path runs/tiny-model --dataset_name data/demo --output_dir runs/dpo-trdpo \
        --learning_rate 1e-3 --max_steps 40 --sync_ref_model --ref_model_sync_steps 10

Writes into --output_dir: the model (safetensors) and tokenizer, config.yaml, train_results.json,
logs/ (TensorBoard: train/* and eval/* scalars) and checkpoints/ (with --save_steps). With LoRA, the
adapter (adapter_model.safetensors, adapter_config.json) instead of the model, and with --merge_adapter
the merged full weights in merged/.
"""

from dpo_core.allocator import preload_allocator

preload_allocator(__name__)  # first, before torch: tcmalloc or jemalloc where installed (dpo_core/allocator.py)

from dpo_core.cli import run_cli
from dpo_core.config import DPOConfig, parse_config
from dpo_core.dpo import train_dpo


def main(argv=None):
    (config,) = parse_config((DPOConfig,), argv, description=__doc__)
    train_dpo(config)


if __name__ == "__main__":
    run_cli(main)
