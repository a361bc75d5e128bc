"""Answers from a chat model: the chat template, left-padded batches, and sampling seeded per prompt.

    model, tokenizer = load_model_and_tokenizer(ModelArguments(model_name_or_path="runs/dpo"), trainable=False)
    answers = generate(model, tokenizer, ["What is your name?"], max_new_tokens=32)

Prompts are rendered exactly as the data layer renders a conversational prompt for training
(`dpo_core.data`: the chat template with `add_generation_prompt=True`, a doubled BOS dropped), so a
model is asked in the context it was trained in.

Sampling draws from one `torch.Generator` per prompt (seeded from `seed` and the prompt's position, or
from explicit per-row seeds), not from the global RNG: an answer does not depend on which other prompts
share its batch, on the batch size or on the number of processes (up to float noise of differently padded
batches). The token is drawn by a logits processor from transformers' own temperature and top-p warpers;
generate() then runs greedy on the one surviving token. Nothing else from the model's
`generation_config` (top_k, repetition penalty, ...) changes the distribution: what is sampled is the
model's distribution with the given temperature and top_p, which the sampled KL estimate relies on.
"""

from __future__ import annotations

import json
import os
import re
import statistics
from pathlib import Path

import torch
from transformers import LogitsProcessor, LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

from .data import _encode  # the data layer's rendering, so prompts match training token for token
from .errors import ConfigError, DataError

# Processors generate() applies in greedy mode too when a model's generation_config sets them: set neutral.
_NEUTRAL = dict(repetition_penalty=1.0, no_repeat_ngram_size=0, min_new_tokens=0,
                encoder_repetition_penalty=1.0, length_penalty=1.0, num_beams=1)


class PerRowSampler(LogitsProcessor):
    """Samples each row's next token with its own generator and leaves only that token possible.

    Args:
        seeds: one seed per batch row.
        temperature, top_p: applied by transformers' warpers before sampling (1.0: the model's distribution).
    """

    def __init__(self, seeds: list[int], *, temperature: float = 1.0, top_p: float = 1.0, device="cpu"):
        self.generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
        warpers = []
        if temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(temperature))
        if top_p < 1.0:
            warpers.append(TopPLogitsWarper(top_p))
        self.warpers = LogitsProcessorList(warpers)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        probs = torch.softmax(self.warpers(input_ids, scores).float(), dim=-1)
        picks = torch.stack([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, self.generators)])
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, picks, 0.0)


def chat_prompt_ids(tokenizer, question: str, system_prompt: str | None = None) -> list[int]:
    """Token ids of one user question (after an optional system message) with the generation prompt."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ConfigError("the tokenizer has no chat_template; set tokenizer.chat_template or use a chat model")
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + \
        [{"role": "user", "content": question}]
    return _encode(tokenizer, messages, {}, add_generation_prompt=True)


@torch.no_grad()
def generate_ids(model, tokenizer, prompts: list[list[int]], *, max_new_tokens: int = 128,
                 temperature: float = 1.0, top_p: float = 1.0, do_sample: bool = False,
                 seeds: list[int] | None = None, batch_size: int = 8) -> list[list[int]]:
    """Completions of tokenized prompts: left-padded batches, cut after the first EOS (kept).

    Args:
        prompts: token ids per prompt (e.g. `chat_prompt_ids`, or a dataset's `Example.prompt_ids`).
        do_sample: sample (one generator per row, seeded by `seeds[i]`); greedy otherwise.
        seeds: one per prompt; required when sampling.
    Returns:
        Per prompt, the generated token ids (without the prompt, without padding; ends in EOS unless
        `max_new_tokens` ran out first).
    """
    if do_sample and (seeds is None or len(seeds) != len(prompts)):
        raise ValueError("sampling needs one seed per prompt")
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError("max_new_tokens and batch_size must be >= 1")
    if do_sample and (temperature <= 0 or not 0 < top_p <= 1):
        raise ValueError(f"temperature must be > 0 and top_p in (0, 1], got {temperature}, {top_p}")
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    pad = eos if pad is None else pad
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    outputs: list[list[int]] = []
    from tqdm.auto import tqdm

    for start in tqdm(range(0, len(prompts), batch_size), desc="generating", unit=" batches",
                      disable=len(prompts) <= batch_size or os.environ.get("RANK", "0") != "0"):
        chunk = prompts[start: start + batch_size]
        width = max(len(p) for p in chunk)
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, p in enumerate(chunk):  # left padding: every row's next token is at the same position
            input_ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            attention_mask[i, width - len(p):] = 1
        processors = LogitsProcessorList()
        if do_sample:
            processors.append(PerRowSampler(seeds[start: start + batch_size], temperature=temperature,
                                            top_p=top_p, device=device))
        generated = model.generate(
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
            max_new_tokens=max_new_tokens, do_sample=False, logits_processor=processors,
            eos_token_id=eos, pad_token_id=pad, **_NEUTRAL)
        for row in generated[:, width:].tolist():
            outputs.append(row[: row.index(eos) + 1] if eos in row else row)
    model.train(was_training)
    return outputs


def decode_answer(tokenizer, ids: list[int]) -> str:
    """The answer's text: special tokens (EOS, padding) left out, surrounding whitespace stripped."""
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def generate(model, tokenizer, questions: list[str], *, max_new_tokens: int = 128, temperature: float = 1.0,
             top_p: float = 1.0, do_sample: bool = False, seed: int = 0, system_prompt: str | None = None,
             batch_size: int = 8) -> list[str]:
    """Answers a model gives to `questions`, asked through its chat template.

    Args:
        questions: user messages, one conversation each.
        do_sample: sample with `temperature`/`top_p` (question i seeded with `seed + i`); greedy otherwise.
        system_prompt: an optional system message before each question.
        batch_size: questions per generate() call (left-padded).
    Returns:
        One decoded answer per question, without the prompt.
    """
    prompts = [chat_prompt_ids(tokenizer, q, system_prompt) for q in questions]
    ids = generate_ids(model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                       top_p=top_p, do_sample=do_sample, seeds=[seed + i for i in range(len(prompts))],
                       batch_size=batch_size)
    return [decode_answer(tokenizer, row) for row in ids]


def read_questions(path: str | Path) -> list[str]:
    """Questions from a file: `.jsonl` (each line a string, or an object with a `question` or `prompt`
    string), otherwise text with one question per line (blank lines and lines starting with # skipped)."""
    path = Path(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    questions = []
    for n, line in enumerate(lines, 1):
        if not line.strip() or (path.suffix != ".jsonl" and line.lstrip().startswith("#")):
            continue
        if path.suffix != ".jsonl":
            questions.append(line.strip())
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {n}: not valid JSON ({e.msg})") from None
        if isinstance(value, dict):
            value = value.get("question", value.get("prompt"))
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"{path} line {n}: expected a string or an object with a non-empty 'question' "
                             "(or 'prompt') string")
        questions.append(value.strip())
    if not questions:
        raise DataError(f"{path}: no questions in it")
    return questions


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")


def first_sentence(text: str) -> tuple[str, int]:
    """The first sentence of `text` and the number of sentences (split after . ! ? before a capital)."""
    parts = [p for p in _SENTENCE_END.split(text.strip()) if p]
    return (parts[0] if parts else ""), len(parts)


def answer_stats(answers: list[str]) -> dict[str, float]:
    """Words per answer (mean, median) and the share of answers of one sentence."""
    words = [len(a.split()) for a in answers]
    return {"answers": len(answers), "mean_words": statistics.mean(words) if words else float("nan"),
            "median_words": statistics.median(words) if words else float("nan"),
            "one_sentence": sum(first_sentence(a)[1] <= 1 for a in answers) / len(answers) if answers else 0.0}
