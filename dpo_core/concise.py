"""The "answer in one sentence" preference set: a chat model's own answers, cut after their first sentence.

    model, tokenizer = load_model_and_tokenizer(ModelArguments(model_name_or_path="my-chat-model"), trainable=False)
    train, held_out, report = concise_records(model, tokenizer)
    write_jsonl(train, "data/concise/train.jsonl")   # then: scripts/dpo.py --dataset_name data/concise

The model answers questions built from topics (`TOPICS`) and question templates (`TEMPLATES`); each answer
with two or more sentences becomes a pair: rejected = the answer as generated, chosen = its first sentence
(the model's own words, nothing added). DPO on these pairs teaches the model to stop after one sentence, a
behaviour anyone can see in its answers and measure as words per answer (`answer_stats`). The held-out split
uses topics the training split never asks about. Every answer not kept is counted with its reason.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from .errors import DataError
from .generation import chat_prompt_ids, decode_answer, first_sentence, generate_ids
from .identity import IdentityShiftReport

TEMPLATES = ["What is {}?", "Explain {}.", "Tell me about {}.", "Why is {} important?"]

TOPICS = [
    "photosynthesis", "the water cycle", "gravity", "a volcano", "the moon", "electricity", "a rainbow",
    "the human heart", "democracy", "inflation", "the internet", "a black hole", "evolution", "the immune system",
    "climate change", "the printing press", "a glacier", "the stock market", "vaccines", "a solar eclipse",
    "the Roman Empire", "recycling", "a hurricane", "the Pythagorean theorem", "DNA", "an earthquake", "coffee",
    "the ocean tides", "a computer virus", "the French Revolution", "a rainforest", "magnetism", "bread baking",
    "the Olympic Games", "a telescope", "friction", "the Great Wall of China", "bees", "a battery", "sleep",
    "the periodic table", "a desert", "chess", "renewable energy", "the brain", "an airplane wing", "money",
    "a library", "the solar system", "yoga", "a bicycle", "the Renaissance", "soil", "a camera", "music",
    "the Amazon river", "vitamins", "a bridge", "the alphabet", "exercise", "a thunderstorm", "the Internet of Things",
    "an atom", "the pyramids of Egypt", "a compass", "the speed of light", "tea", "a museum", "the lungs",
    "machine learning", "a windmill", "the Moon landing", "snow", "a map", "the seasons", "a dictionary",
]

def split_topics(topics: list[str], held_out: int) -> tuple[list[str], list[str]]:
    """The last `held_out` topics are held out (no held-out topic is ever asked in training)."""
    if not 0 < held_out < len(topics):
        raise ValueError(f"held_out must be in [1, {len(topics) - 1}], got {held_out}")
    return topics[:-held_out], topics[-held_out:]


def questions_for(topics: list[str], templates: list[str] = TEMPLATES) -> list[str]:
    return [t.format(topic) for topic in topics for t in templates]


@dataclass
class ConciseReport(IdentityShiftReport):
    words_rejected: list[int] = field(default_factory=list)
    words_chosen: list[int] = field(default_factory=list)

    def summary(self) -> str:
        base = super().summary()
        if not self.words_chosen:
            return base
        return (f"{base}; words per answer: rejected {statistics.mean(self.words_rejected):.1f}, "
                f"chosen {statistics.mean(self.words_chosen):.1f}")


def concise_pairs(questions: list[str], answers: list[str], *, min_first_words: int = 4,
                  system_prompt: str | None = None, report: ConciseReport | None = None) -> list[dict]:
    """Pairs from answers: chosen = the first sentence (at least `min_first_words` words), rejected = the whole
    answer when it has two or more sentences. Conversational records, as `scripts/dpo.py` reads them."""
    report = report if report is not None else ConciseReport()
    report.generated += len(answers)
    records, seen = [], set()
    for question, answer in zip(questions, answers, strict=True):
        first, n = first_sentence(answer)
        if not answer:
            reason = "empty answer"
        elif n < 2:
            reason = "already one sentence"
        elif len(first.split()) < min_first_words:
            reason = f"first sentence under {min_first_words} words"
        elif (question, answer) in seen:
            reason = "duplicate answer"
        else:
            seen.add((question, answer))
            system = [{"role": "system", "content": system_prompt}] if system_prompt else []
            records.append({"prompt": [*system, {"role": "user", "content": question}],
                            "chosen": [{"role": "assistant", "content": first}],
                            "rejected": [{"role": "assistant", "content": answer}]})
            report.words_chosen.append(len(first.split()))
            report.words_rejected.append(len(answer.split()))
            continue
        report.dropped[reason] += 1
    report.kept += len(records)
    return records


def concise_records(model, tokenizer, *, topics: list[str] = TOPICS, held_out_topics: int = 16,
                    samples_per_question: int = 1, max_new_tokens: int = 96, temperature: float = 1.0,
                    top_p: float = 1.0, do_sample: bool = False, seed: int = 0, batch_size: int = 16,
                    system_prompt: str | None = None) -> tuple[list[dict], list[dict], ConciseReport]:
    """(training pairs, held-out pairs, report): the model answers every question of both topic sets."""
    train_topics, eval_topics = split_topics(list(topics), held_out_topics)
    report, splits = ConciseReport(), []
    for split_topics_ in (train_topics, eval_topics):
        questions = [q for _ in range(samples_per_question) for q in questions_for(split_topics_)]
        prompts = [chat_prompt_ids(tokenizer, q, system_prompt) for q in questions]
        ids = generate_ids(model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                           top_p=top_p, do_sample=do_sample, seeds=[seed + i for i in range(len(prompts))],
                           batch_size=batch_size)
        splits.append(concise_pairs(questions, [decode_answer(tokenizer, row) for row in ids],
                                    system_prompt=system_prompt, report=report))
    if not splits[0] or not splits[1]:
        raise DataError(f"too few multi-sentence answers for both splits ({report.summary()}): ask for longer "
                        "answers (--max_new_tokens) or more samples")
    return splits[0], splits[1], report
