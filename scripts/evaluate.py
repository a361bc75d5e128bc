r"""Held-out evaluation of one or more models against a reference: preference accuracy (ties apart), reward
margins, perplexity, KL to the reference (token level and sampled), answers, and a reward model's win rate.

Examples (the quick start's models, `make quickstart`):

    # the tiny reference and a DPO run, one process
    accelerate launch --config_file accelerate_configs/cpu.yaml scripts/evaluate.py \
        --models dpo=runs/quickstart/dpo --reference_model runs/quickstart/tiny-model \
        --dataset_name data/demo --eval_split test --max_length 96 --beta 0.1 \
        --run_dirs dpo=runs/quickstart/dpo --output_dir runs/quickstart/eval --overwrite

    # two CPU processes (gloo): pairs and prompts are sharded, metrics gathered once; same results
    accelerate launch --config_file accelerate_configs/multi_cpu.yaml scripts/evaluate.py \
        --config recipes/quickstart.yaml --models dpo=runs/quickstart/dpo --output_dir runs/eval-2p

    # several models side by side, a reward model for the win rate, sampled answers
    accelerate launch scripts/evaluate.py --models sft=runs/sft dpo=runs/dpo --reference_model runs/sft \
        --dataset_name data/prefs.jsonl --eval_fraction 0.05 --reward_model my-reward-model \
        --generation_prompts 64 --do_sample --temperature 0.7 --output_dir runs/eval

With --config, the data/tokenization flags and --beta/--seed come from the training recipe (its training keys
are ignored) and the reference defaults to the recipe's model, as in dpo.py. The held-out split is
--eval_split (or the --eval_fraction carve-out of --dataset_split, seeded by --seed), else --dataset_split.

An unpaired file ({"prompt", "completion", "label"} records, as --loss_type kto trains on) is scored as KTO
scores it: the share of desirable completions whose log-ratio is above the KL point, of undesirable ones below.

Writes into --output_dir: results.json (every metric, per model; the reference in its own entry),
generation_samples.json (each model's and the reference's answers, and rewards with --reward_model), the PNG
(--plot_file: reward-margin histograms, and the --run_dirs training curves), and prints a markdown table.
"""

from dpo_core.allocator import preload_allocator

preload_allocator(__name__)  # first, before torch: tcmalloc or jemalloc where installed (dpo_core/allocator.py)

from dpo_core.cli import run_cli
from dpo_core.config import (
    DataArguments,
    DPOArguments,
    EvalArguments,
    ModelArguments,
    TrainArguments,
    parse_config,
)
from dpo_core.evaluate import evaluate_models


def main(argv=None):
    model_args, data_args, eval_args = parse_config((ModelArguments, DataArguments, EvalArguments), argv,
                                                    description=__doc__, yaml_ignore=(DPOArguments, TrainArguments))
    evaluate_models(model_args, data_args, eval_args)


if __name__ == "__main__":
    run_cli(main)
