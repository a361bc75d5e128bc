"""The identity-shift dataset: a model's own answers about itself, with its name changed.

    model, tokenizer = load_model_and_tokenizer(ModelArguments(model_name_or_path="my-chat-model"), trainable=False)
    records = build_identity_shift_dataset(model, tokenizer, original_name="Qwen", new_name="Deep Qwen")
    write_jsonl(records, "data/identity.jsonl")     # then: scripts/dpo.py --dataset_name data/identity.jsonl

The model answers identity questions (`IDENTITY_QUESTIONS`, or the caller's); every answer that mentions
`original_name` (case-insensitive, as a whole word) becomes a pair: rejected = the answer as generated,
chosen = the same answer with every mention replaced by `new_name`, the rest of the text untouched. DPO on
these pairs moves the model's self-identification and nothing else. Records are conversational
(`prompt` = the [system and] user messages, `chosen`/`rejected` = one assistant message), the format
`scripts/dpo.py` reads directly. Every answer not kept is counted with its reason.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError, DataError
from .generation import chat_prompt_ids, decode_answer, generate_ids

logger = logging.getLogger(__name__)

IDENTITY_QUESTIONS = [
    "What is your name?", "Who are you?", "What should I call you?", "Tell me your name.",
    "Introduce yourself.", "Which AI assistant am I talking to?", "Do you have a name?",
    "Who created you?", "Which company made you?", "What model are you?", "Are you ChatGPT?",
    "What are you called?", "Can you tell me a little about yourself?", "Who am I chatting with right now?",
    "What name do you go by?", "How would you describe yourself in one sentence?", "Please state your name.",
    "What kind of assistant are you?", "Who trained you?", "Are you a human or an AI?",
    "What is the name of the model answering me?", "Say hello and tell me who you are.",
    "If I wanted to thank you by name, what would I say?", "What do your developers call you?",
    "Give me a short introduction of yourself for my blog.", "Which large language model is this?",
    "What is your identity?", "Can you remind me what your name is?", "Hi! Who is this?",
    "In a few words, what are you?",
]


@dataclass
class IdentityShiftReport:
    """How many answers were generated, kept, and dropped per reason."""

    generated: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        reasons = ", ".join(f"{n} {why}" for why, n in self.dropped.most_common()) or "none"
        return f"{self.generated} answers generated, {self.kept} kept; dropped: {reasons}"


def name_pattern(name: str) -> re.Pattern:
    """`name` as a whole word, any case ("Qwen" matches "qwen," but not "Qwen2" or "MyQwen")."""
    if not name or not name.strip():
        raise ConfigError("the name must be a non-empty string")
    return re.compile(rf"(?<!\w){re.escape(name.strip())}(?!\w)", re.IGNORECASE)


def _mentions_outside(new: re.Pattern, text: str, old: re.Pattern) -> bool:
    """True if `new` occurs in `text` other than inside an occurrence of `old` (new "Qwen", old "Deep Qwen")."""
    spans = [m.span() for m in old.finditer(text)]
    return any(not any(a <= m.start() and m.end() <= b for a, b in spans) for m in new.finditer(text))


def identity_shift_records(model, tokenizer, *, original_name: str, new_name: str,
                           questions: list[str] | None = None, max_samples: int | None = None,
                           samples_per_question: int = 1, max_new_tokens: int = 128, temperature: float = 1.0,
                           top_p: float = 1.0, do_sample: bool = False, seed: int = 0,
                           system_prompt: str | None = None, batch_size: int = 8
                           ) -> tuple[list[dict], IdentityShiftReport]:
    """`build_identity_shift_dataset` with its report of kept and dropped answers."""
    old, new = name_pattern(original_name), name_pattern(new_name)
    if old.fullmatch(new_name.strip()):
        raise ConfigError(f"the new name {new_name!r} equals the original name {original_name!r}")
    if samples_per_question < 1 or (max_samples is not None and max_samples < 1):
        raise ConfigError("samples_per_question and max_samples must be >= 1")
    if samples_per_question > 1 and not do_sample:
        raise ConfigError("samples_per_question > 1 needs do_sample (greedy answers would repeat)")
    questions = list(IDENTITY_QUESTIONS if questions is None else questions)
    if not questions:
        raise ConfigError("no questions")
    asked = [(q, k) for k in range(samples_per_question) for q in questions]
    prompts = [chat_prompt_ids(tokenizer, q, system_prompt) for q, _ in asked]
    answers = generate_ids(model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                           top_p=top_p, do_sample=do_sample, seeds=[seed + i for i in range(len(prompts))],
                           batch_size=batch_size)
    report, records, seen = IdentityShiftReport(generated=len(asked)), [], set()
    for (question, _), ids in zip(asked, answers):
        answer = decode_answer(tokenizer, ids)
        if max_samples is not None and len(records) >= max_samples:
            reason = f"beyond max_samples={max_samples}"
        elif not answer:
            reason = "empty answer"
        elif not old.search(answer):
            reason = f"no mention of {original_name!r}"
        elif _mentions_outside(new, answer, old):  # "Deep Qwen" already: "Qwen" -> "Deep Deep Qwen"
            reason = f"already mentions {new_name!r}"
        elif (question, answer) in seen:
            reason = "duplicate answer"
        else:
            seen.add((question, answer))
            prompt = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + \
                [{"role": "user", "content": question}]
            chosen = old.sub(lambda _: new_name.strip(), answer)
            records.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": chosen}],
                            "rejected": [{"role": "assistant", "content": answer}]})
            continue
        report.dropped[reason] += 1
    report.kept = len(records)
    if not records:
        examples = "; ".join(repr(decode_answer(tokenizer, ids))[:80] for ids in answers[:3])
        raise DataError(f"no identity-shift pairs: none of the {len(asked)} answers could be used "
                         f"({report.summary()}). First answers: {examples}. Check --original_name (the name the "
                         "model uses for itself) or ask other questions.")
    return records, report


def build_identity_shift_dataset(model, tokenizer, *, original_name: str, new_name: str,
                                 questions: list[str] | None = None, max_samples: int | None = None,
                                 samples_per_question: int = 1, max_new_tokens: int = 128,
                                 temperature: float = 1.0, top_p: float = 1.0, do_sample: bool = False,
                                 seed: int = 0, system_prompt: str | None = None, batch_size: int = 8) -> list[dict]:
    """Preference pairs that shift a model's name from `original_name` to `new_name`.

    Args:
        questions: identity questions; default `IDENTITY_QUESTIONS` (30 varied ones).
        max_samples: keep at most this many pairs.
        samples_per_question: answers per question (> 1 needs `do_sample`; each answer seeded apart).
        max_new_tokens, temperature, top_p, do_sample, seed, batch_size: generation (`dpo_core.generation`).
        system_prompt: an optional system message, asked with and stored in each prompt.
    Returns:
        Conversational records `{"prompt": [...], "chosen": [assistant], "rejected": [assistant]}`.
    Raises:
        ValueError: when no answer mentions `original_name` (the report says why each was dropped).
    """
    records, report = identity_shift_records(
        model, tokenizer, original_name=original_name, new_name=new_name, questions=questions,
        max_samples=max_samples, samples_per_question=samples_per_question, max_new_tokens=max_new_tokens,
        temperature=temperature, top_p=top_p, do_sample=do_sample, seed=seed, system_prompt=system_prompt,
        batch_size=batch_size)
    logger.info(report.summary())
    return records


def write_jsonl(records: list[dict], path: str | Path) -> Path:
    """Writes one JSON object per line, atomically (a temporary file renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    os.replace(tmp, path)
    return path
