r"""Ask one or more chat models questions and print their answers side by side.

    python scripts/generate.py --models runs/quickstart/tiny-model --question "What is your name?"

    # several models, several questions, sampled answers, saved as JSON
    python scripts/generate.py --models ref=runs/quickstart/tiny-model dpo=runs/quickstart/dpo \
        --question "What is your name?" --question "What is a comet?" \
        --do_sample --temperature 0.7 --top_p 0.9 --max_new_tokens 32 --output_file runs/answers.json

    # questions from a file (.txt: one per line; .jsonl: strings or {"question": ...}), plain text output
    python scripts/generate.py --models runs/dpo --questions_file questions.txt --format plain

Questions go through each model's chat template (as a user message after the optional --system_prompt).
Greedy by default; with --do_sample question i is sampled with seed --seed + i, so answers repeat exactly.
Runs on the GPU or Apple MPS when present (accelerate's device selection), else the CPU.
"""

from dpo_core.allocator import preload_allocator

preload_allocator(__name__)  # first, before torch: tcmalloc or jemalloc where installed (dpo_core/allocator.py)

import json
import os
from pathlib import Path

from dpo_core.cli import run_cli
from dpo_core.config import AskArguments, GenerationArguments, ModelArguments, parse_config
from dpo_core.distributed import make_accelerator
from dpo_core.errors import ConfigError
from dpo_core.evaluate import named_paths
from dpo_core.generation import answer_stats, generate, read_questions
from dpo_core.modeling import gguf_of, load_model, load_tokenizer


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "<br>") or " "


def render(rows: list[dict], names: list[str], fmt: str) -> str:
    if fmt == "plain":
        blocks = []
        for row in rows:
            width = max(len(n) for n in names)
            blocks.append("\n".join([f"Q: {row['question']}"] +
                                    [f"  {n:<{width}} | {row['answers'][n]}" for n in names]))
        return "\n\n".join(blocks)
    lines = ["| question | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    lines += ["| " + " | ".join(_cell(t) for t in [row["question"], *(row["answers"][n] for n in names)]) + " |"
              for row in rows]
    return "\n".join(lines)


def main(argv=None):
    model_args, gen_args, args = parse_config((ModelArguments, GenerationArguments, AskArguments), argv,
                                              description=__doc__)
    models = named_paths(args.models, "--models")
    if not models and model_args.model_name_or_path:
        models = named_paths([model_args.model_name_or_path], "--model_name_or_path")
    if not models:
        raise ConfigError("--models is required (one or more model directories)")
    questions = list(args.question) + (read_questions(args.questions_file) if args.questions_file else [])
    if not questions:
        raise ConfigError("give --question (repeatable) or --questions_file")
    accelerator = make_accelerator()
    answers = {}
    for name, path in models:
        gguf = gguf_of(model_args, path)
        tokenizer = load_tokenizer(path, revision=model_args.revision, trust_remote_code=model_args.trust_remote_code,
                                   gguf_file=gguf)
        model = load_model(path, torch_dtype=model_args.torch_dtype, attn_implementation=model_args.attn_implementation,
                           revision=model_args.revision, trust_remote_code=model_args.trust_remote_code,
                           trainable=False, gguf_file=gguf).to(accelerator.device)
        answers[name] = generate(model, tokenizer, questions, **gen_args.kwargs())
        del model
    rows = [{"question": q, "answers": {n: answers[n][i] for n, _ in models}} for i, q in enumerate(questions)]
    print(render(rows, [n for n, _ in models], args.format))
    stats = {name: answer_stats(answers[name]) for name, _ in models}
    print("\n| model | answers | mean words | median words | one sentence |\n|---|---|---|---|---|")
    for name, s in stats.items():
        print(f"| {name} | {s['answers']} | {s['mean_words']:.1f} | {s['median_words']:.1f} | {s['one_sentence']:.0%} |")
    if args.output_file:
        path = Path(args.output_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({"models": dict(models), "settings": gen_args.kwargs(), "answers": rows, "stats": stats},
                                  indent=2, ensure_ascii=False))
        os.replace(tmp, path)


if __name__ == "__main__":
    run_cli(main)
