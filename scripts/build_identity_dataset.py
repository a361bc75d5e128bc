r"""The identity-shift preference dataset: the model's own answers about itself, with its name changed.

    # the model answers 30 bundled identity questions; answers naming Qwen become pairs (chosen: Deep Qwen)
    python scripts/build_identity_dataset.py --model_name_or_path my-chat-model \
        --original_name Qwen --new_name "Deep Qwen" --output_file data/identity.jsonl

    # more pairs: 4 sampled answers per question, at most 200 pairs, your own questions
    python scripts/build_identity_dataset.py --model_name_or_path my-chat-model --original_name Qwen \
        --new_name "Deep Qwen" --questions_file my_questions.txt --samples_per_question 4 --do_sample \
        --temperature 0.8 --max_samples 200 --output_file data/identity.jsonl

    # then DPO reads it directly
    accelerate launch scripts/dpo.py --model_name_or_path my-chat-model --dataset_name data/identity.jsonl \
        --output_dir runs/identity --beta 0.2 --learning_rate 5e-6

A pair's rejected answer is the answer as generated; its chosen answer is the same text with every mention
of --original_name (any case, as a whole word) replaced by --new_name. Answers without the name, empty,
duplicated, or already using the new name are dropped and counted; if none is left the script stops with an
error saying why. The JSONL is written atomically.
"""

from dpo_core.allocator import preload_allocator

preload_allocator(__name__)  # first, before torch: tcmalloc or jemalloc where installed (dpo_core/allocator.py)

from pathlib import Path

from dpo_core.cli import run_cli
from dpo_core.config import GenerationArguments, IdentityArguments, ModelArguments, parse_config
from dpo_core.distributed import make_accelerator
from dpo_core.errors import ConfigError, OutputExistsError
from dpo_core.generation import read_questions
from dpo_core.identity import identity_shift_records, write_jsonl
from dpo_core.modeling import load_model_and_tokenizer


def main(argv=None):
    model_args, gen_args, args = parse_config((ModelArguments, GenerationArguments, IdentityArguments), argv,
                                              description=__doc__)
    for flag in ("original_name", "new_name", "output_file"):
        if not getattr(args, flag):
            raise ConfigError(f"--{flag} is required")
    output = Path(args.output_file)
    if output.exists() and not args.overwrite:
        raise OutputExistsError(f"{output} exists: pass --overwrite to replace it")
    questions = read_questions(args.questions_file) if args.questions_file else None
    accelerator = make_accelerator()
    model, tokenizer = load_model_and_tokenizer(model_args, trainable=False)
    records, report = identity_shift_records(
        model.to(accelerator.device), tokenizer, original_name=args.original_name, new_name=args.new_name,
        questions=questions, max_samples=args.max_samples, samples_per_question=args.samples_per_question,
        **gen_args.kwargs())
    print(report.summary())
    write_jsonl(records, output)
    print(f"{len(records)} pairs written to {output}")


if __name__ == "__main__":
    run_cli(main)
