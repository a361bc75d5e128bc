"""SFT data: which completion of a record is trained on, tokenized exactly as the DPO path, and padded.

Three record formats, told apart per record:

- **preference** (`chosen` and `rejected`, standard or conversational, prompt explicit or implicit): the
  chosen completion. The record goes through `dpo_core.data.tokenize_records` unchanged, so SFT trains on
  exactly the token ids DPO later scores as `logps/chosen` (same validation, same implicit-prompt split,
  same truncation, including `keep_end`'s shared prompt cut).
- **prompt/completion** (`prompt` and `completion`, both strings or both message lists; a record with
  `chosen` but no `rejected` counts as this, `chosen` being the completion).
- **messages** (`messages`: a conversation ending with an assistant turn): the LAST assistant turn is the
  completion and every message before it the prompt. Earlier assistant turns are context only (no loss):
  the model learns the final reply of each conversation, which is what its preference pairs compare.

Single completions are tokenized by the same pair tokenizer (the completion standing in for both sides),
so the prompt/completion boundary, the EOS and the truncation follow the same rules as preference pairs.
Every bad record is reported with its file, line and field (`completion`, `messages`, ...).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .data import Example, Problem, Record, _check_value, _validate, loaded, tokenize_records

if TYPE_CHECKING:
    import torch

_SINGLE_KEYS = ("tools", "chat_template_kwargs")


def _as_pair(data: dict) -> tuple[str, dict | None, list[tuple[str, str]]]:
    """A single-completion record as a pair whose two sides are the completion.

    Returns:
        `(format, pair, problems)`: format is "completion" (its completion field's name is returned in
        place of it: "completion" or "chosen") or "messages"; pair is None when problems were found.
    """
    extra = {k: data[k] for k in _SINGLE_KEYS if k in data}
    if "messages" in data:
        messages = data["messages"]
        reason = _check_value(messages)
        if reason is None and messages[-1]["role"] != "assistant":
            reason = (f"must end with the assistant turn to train on (role 'assistant'), the last message has "
                      f"role {messages[-1]['role']!r}")
        if reason is None and len(messages) < 2:
            reason = "needs at least one message (the prompt) before the final assistant turn"
        if reason is not None:
            return "messages", None, [("messages", reason)]
        return "messages", {"prompt": messages[:-1], "chosen": messages[-1:], "rejected": messages[-1:],
                            **extra}, []
    key = "completion" if "completion" in data else "chosen" if "chosen" in data else None
    if key is None:
        return "completion", None, [("completion", "missing: a record needs chosen and rejected (preference), "
                                                   "prompt and completion, or messages")]
    if "prompt" not in data:
        return key, None, [("prompt", f"missing (a record with {key} but no rejected needs an explicit prompt)")]
    return key, {"prompt": data["prompt"], "chosen": data[key], "rejected": data[key], **extra}, []


def _validate_single(pair: dict) -> list[tuple[str, str]]:
    # `rejected` is a copy of the completion: its problems would repeat chosen's, and they are identical.
    return [(f, reason) for f, reason in _validate(pair) if f != "rejected"]


def tokenize_sft_records(records: list[Record], tokenizer, settings) -> tuple[list[Example], list[Problem]]:
    """Validates, tokenizes and truncates every record for SFT; the same signature as `tokenize_records`.

    Returns:
        (examples in input order, whose `prompt_ids` + `chosen_ids` is the sequence trained on and
        `chosen_ids` its completion; problems of the other records, naming their own fields).
    """
    pairs, singles, problems, renames = [], [], [], {}
    for record in loaded(records):
        if record.data is None or ("chosen" in record.data and "rejected" in record.data):
            pairs.append(record)  # preference records (and unparsable rows, reported there)
            continue
        kind, pair, found = _as_pair(record.data)
        if found:
            problems += [Problem(record.source, record.location, f, reason) for f, reason in found]
            continue
        singles.append(Record(record.id, record.source, record.location, pair))
        renames[(record.source, record.location)] = (
            {"prompt": "messages", "chosen": "messages"} if kind == "messages" else {"chosen": kind})
    examples, pair_problems = tokenize_records(pairs, tokenizer, settings)
    single_examples, single_problems = tokenize_records(singles, tokenizer, settings, validate=_validate_single)
    for p in single_problems:  # speak of the record's own fields, not of the stand-in pair's
        p.field = renames[(p.source, p.location)].get(p.field, p.field)
    order = {r.id: i for i, r in enumerate(records)}
    examples = sorted(examples + single_examples, key=lambda e: order[e.id])
    return examples, problems + pair_problems + single_problems


def collate_sft(examples: list[Example], pad_token_id: int, pad_to_multiple_of: int | None = None
                ) -> dict[str, torch.Tensor]:
    """Pads B prompt + completion sequences (the chosen side of each example), right-padded (to a multiple of
    `pad_to_multiple_of` tokens when given).

    Returns:
        input_ids, attention_mask, completion_mask: [B, T] long; completion_mask is 1 exactly on the
        completion tokens. ids: [B]. num_tokens: scalar, non-padding tokens; num_positions: scalar, B * T.
    """
    import torch  # here: the tokenizing worker processes import this module without torch (`dpo_core.tokenized`)

    rows = [e.prompt_ids + e.chosen_ids for e in examples]
    width = max(len(r) for r in rows)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    completion_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (e, row) in enumerate(zip(examples, rows)):
        input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, : len(row)] = 1
        completion_mask[i, len(e.prompt_ids): len(row)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask,
            "ids": torch.tensor([e.id for e in examples], dtype=torch.long),
            "num_tokens": attention_mask.sum(), "num_positions": torch.tensor(input_ids.numel())}
