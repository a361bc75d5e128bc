"""Preference data: loading, validation, chat templates, tokenization, truncation and collation.

    records = load_splits("data/demo", split="train", eval_split="test")       # {"train": [...], "eval": [...]}
    examples, problems = tokenize_records(records["train"], tokenizer, TokenizeSettings(max_length=512))
    check_problems(problems, on_invalid="skip", report_path="run/invalid_records.jsonl")
    batch = collate_concat(examples[:8], tokenizer.pad_token_id)            # 2B rows: chosen, then rejected

Reading raw rows and reporting bad ones lives in `dpo_core.records`; its names are re-exported here.

Tokenization follows TRL 1.16 (`DPOTrainer._prepare_dataset`) token for token, so reference log-probs
computed by either tool agree for the same model and data. The deliberate differences are safety nets
that only fire where TRL would train on something broken: a doubled BOS is dropped, a standard completion
ends in exactly one EOS, and records TRL would drop silently (or crash on) are reported as `Problem`s.
Nothing is dropped silently: every record that does not become an `Example` is either raised in one
`DataValidationError` or written to a JSONL report and counted in a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .records import (  # noqa: F401  (re-exported: the data layer's one import for callers)
    DataValidationError,
    Problem,
    Record,
    check_on_invalid,
    check_problems,
    dataset_fingerprint,
    load_splits,
    problem_counts,
)

logger = logging.getLogger(__name__)



@dataclass(frozen=True)
class TokenizeSettings:
    """Every setting that changes the token ids (its `asdict()` goes into the reference-cache fingerprint)."""

    max_length: int | None = field(default=512, metadata={"help": "Max prompt+completion tokens per sequence."})
    max_prompt_length: int | None = field(default=None, metadata={"help": "Max prompt tokens (truncated first)."})
    max_completion_length: int | None = field(default=None, metadata={
        "help": "Keep this many first tokens of each completion."})
    truncation_mode: str = field(default="keep_start", metadata={
        "help": "keep_start: cut the end (completion tail); keep_end: cut the start (prompt head)."})

    def __post_init__(self):
        if self.truncation_mode not in ("keep_start", "keep_end"):
            raise ValueError(f"truncation_mode must be 'keep_start' or 'keep_end', got {self.truncation_mode!r}")
        for name in ("max_length", "max_prompt_length", "max_completion_length"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")


@dataclass
class Example:
    """One tokenized preference pair; `chosen_ids`/`rejected_ids` hold completion tokens only."""

    id: int
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]


# ------------------------------------------------------------------------------------------ validation

def _check_value(value: Any) -> str | None:
    """Why a prompt/chosen/rejected value is unusable, or None. A value is a string or a message list."""
    if value is None:
        return "is null"
    if isinstance(value, str):
        return "is empty or whitespace-only" if not value.strip() else None
    if not isinstance(value, list):
        return f"must be a string or a list of {{role, content}} messages, got {type(value).__name__}"
    if not value:
        return "is an empty message list"
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            return f"message {i} must be an object with string 'role' and 'content', got {str(m)[:80]}"
    if not any(m["content"].strip() for m in value):
        return "has only empty or whitespace-only message contents"
    return None


def _validate(data: dict) -> list[tuple[str, str]]:
    problems = [(k, "missing") for k in ("chosen", "rejected") if k not in data]
    problems += [(k, reason) for k in ("prompt", "chosen", "rejected")
                 if k in data and (reason := _check_value(data[k])) is not None]
    if problems:
        return problems
    conversational = isinstance(data["chosen"], list)
    for k in ("prompt", "rejected"):
        if k in data and isinstance(data[k], list) != conversational:
            problems.append((k, f"is {'a message list' if isinstance(data[k], list) else 'a string'} but chosen "
                                f"is {'a message list' if conversational else 'a string'}; use one format per record"))
    if data["chosen"] == data["rejected"]:
        problems.append(("rejected", "is identical to chosen"))
    tools = data.get("tools")
    if isinstance(tools, str):
        try:
            json.loads(tools)
        except json.JSONDecodeError as e:
            problems.append(("tools", f"is a string but not valid JSON: {e.msg}"))
    if data.get("chat_template_kwargs") is not None and not isinstance(data["chat_template_kwargs"], dict):
        problems.append(("chat_template_kwargs", "must be an object"))
    return problems


def _extract_prompt(chosen, rejected):
    """The shared leading turns (or characters) of chosen and rejected, as TRL's `extract_prompt`."""
    n = min(len(chosen), len(rejected))
    idx = next((i for i in range(n) if chosen[i] != rejected[i]), None)
    if idx is None:  # one is a prefix of the other: TRL's loop variable ends at n - 1
        idx = n - 1
    elif idx > 0 and chosen[idx - 1] == " ":  # the space goes to the completions
        idx -= 1
    return chosen[:idx], chosen[idx:], rejected[idx:]


# -------------------------------------------------------------------------------- tokenize + truncate

def _common_prefix_length(ids: list[int], other: list[int]) -> int:
    n = 0
    for a, b in zip(ids, other):
        if a != b:
            break
        n += 1
    return n


def _encode(tokenizer, value: str | list, template_kwargs: dict, **kwargs) -> list[int]:
    if isinstance(value, list):
        ids = tokenizer.apply_chat_template(value, tokenize=True, return_dict=True, **template_kwargs, **kwargs)
    else:
        ids = tokenizer(text=value)
    ids = [int(i) for i in ids["input_ids"]]
    # A template or text that carries BOS plus a tokenizer that adds it gives two; the model never saw that.
    bos = tokenizer.bos_token_id
    return ids[1:] if bos is not None and ids[:2] == [bos, bos] else ids


def _one_final_eos(ids: list[int], eos: int | None) -> list[int]:
    while eos is not None and len(ids) >= 2 and ids[-1] == ids[-2] == eos:
        ids = ids[:-1]
    return ids


def _tokenize_pair(data: dict, tokenizer) -> tuple[list[int], list[int], list[int], bool]:
    """TRL 1.16's `_prepare_dataset` for one record: (prompt_ids, chosen_ids, rejected_ids, prompt_cut)."""
    if "prompt" in data:
        prompt, chosen, rejected = data["prompt"], data["chosen"], data["rejected"]
    else:
        prompt, chosen, rejected = _extract_prompt(data["chosen"], data["rejected"])
    if not prompt:
        raise _Invalid("prompt", "no 'prompt' field, and chosen/rejected share no leading text or turns")
    conversational, eos = isinstance(chosen, list), tokenizer.eos_token
    if conversational:
        tools = data.get("tools")
        kwargs = {"tools": json.loads(tools) if isinstance(tools, str) else tools,
                  **(data.get("chat_template_kwargs") or {})}
        p = _encode(tokenizer, prompt, kwargs, add_generation_prompt=True)
        pc, pr = _encode(tokenizer, prompt + chosen, kwargs), _encode(tokenizer, prompt + rejected, kwargs)
    else:
        chosen = chosen if chosen.endswith(eos) else chosen + eos
        rejected = rejected if rejected.endswith(eos) else rejected + eos
        p, pc, pr = (_encode(tokenizer, t, {}) for t in (prompt, prompt + chosen, prompt + rejected))
    # The completion starts where prompt and prompt+completion diverge: a template may render the prompt
    # alone differently, or tokens may merge across the boundary (TRL's `common_prefix_length`).
    n = min(_common_prefix_length(p, pc), _common_prefix_length(p, pr))
    chosen_ids, rejected_ids = pc[n:], pr[n:]
    if not conversational:
        chosen_ids = _one_final_eos(chosen_ids, tokenizer.eos_token_id)
        rejected_ids = _one_final_eos(rejected_ids, tokenizer.eos_token_id)
    return p[:n], chosen_ids, rejected_ids, n < len(p)


class _Invalid(Exception):
    def __init__(self, field: str, reason: str):
        super().__init__(reason)
        self.field, self.reason = field, reason


def truncate_pair(prompt_ids: list[int], chosen_ids: list[int], rejected_ids: list[int],
                  settings: TokenizeSettings) -> tuple[list[int], list[int], list[int]]:
    """Applies `max_prompt_length`, then `max_completion_length`, then `max_length`, in that order.

    `max_prompt_length` keeps the prompt's first (keep_start) or last (keep_end) tokens;
    `max_completion_length` keeps each completion's first tokens; `max_length` bounds prompt+completion
    per sequence: keep_start cuts the completion's tail, keep_end cuts the prompt's head (as TRL's collator
    slices `ids[-max_length:]`). Chosen and rejected share one prompt, so under keep_end the prompt is cut
    for the longer completion (TRL cuts each row separately and may keep more prompt for the shorter one).

    Returns:
        (prompt_ids, chosen_ids, rejected_ids); a part comes back empty when the bounds leave it nothing.
    """
    p, c, r = list(prompt_ids), list(chosen_ids), list(rejected_ids)
    keep_start = settings.truncation_mode == "keep_start"
    if settings.max_prompt_length is not None and len(p) > settings.max_prompt_length:
        p = p[: settings.max_prompt_length] if keep_start else p[len(p) - settings.max_prompt_length:]
    if settings.max_completion_length is not None:
        c, r = c[: settings.max_completion_length], r[: settings.max_completion_length]
    if settings.max_length is not None:
        if keep_start:
            room = max(0, settings.max_length - len(p))
            c, r = c[:room], r[:room]
        else:
            c, r = c[len(c) - min(len(c), settings.max_length):], r[len(r) - min(len(r), settings.max_length):]
            room = max(0, settings.max_length - max(len(c), len(r)))
            p = p[len(p) - min(len(p), room):]
    return p, c, r


def _length_problems(full: list[list[int]], cut: tuple[list[int], ...], s: TokenizeSettings):
    """Why a pair has an empty part after tokenization or truncation, naming the setting to change."""
    if all(cut):
        return []
    empty = [(name, "has no tokens after tokenization") for name, ids in zip(("prompt", "chosen", "rejected"), full)
             if not ids]
    if empty:
        return empty
    # Otherwise only max_length can have emptied a part (the other limits are >= 1).
    if s.truncation_mode == "keep_start":
        n = min(len(full[0]), s.max_prompt_length or len(full[0]))
        return [("prompt", f"the prompt ({n} tokens) fills max_length={s.max_length}, leaving no completion "
                           "token (truncation_mode='keep_start'); raise max_length or set max_prompt_length "
                           f"below {s.max_length}")]
    return [("prompt", f"no prompt token left: a completion alone fills max_length={s.max_length} "
                       "(truncation_mode='keep_end'); raise max_length or set max_completion_length "
                       f"below {s.max_length}")]


def tokenize_records(records: list[Record], tokenizer, settings: TokenizeSettings, *, validate=None
                     ) -> tuple[list[Example], list[Problem]]:
    """Validates, tokenizes (as TRL 1.16) and truncates every record; never stops at the first bad one.

    `validate(data) -> [(field, reason)]` replaces the preference checks (SFT's single completions).

    Returns:
        (examples of the valid records in input order, problems of the others: one or more per bad record).
    """
    usable = [r for r in records if r.data is not None and "chosen" in r.data]
    if getattr(tokenizer, "chat_template", None) is None and any(isinstance(r.data["chosen"], list) for r in usable):
        raise ValueError("the data is conversational (message lists) but the tokenizer has no chat_template; "
                         "set tokenizer.chat_template or use a tokenizer that has one")
    if tokenizer.eos_token is None and any(isinstance(r.data["chosen"], str) for r in usable):
        raise ValueError("standard (string) completions need an EOS token, but the tokenizer has no eos_token")
    examples, problems, n_prompt_cut = [], [], 0
    for record in records:
        found = [("json", record.error)] if record.data is None else (validate or _validate)(record.data)
        if not found:
            try:
                *full, prompt_cut = _tokenize_pair(record.data, tokenizer)
            except _Invalid as e:
                found = [(e.field, e.reason)]
            except Exception as e:  # a chat template may reject a record (roles, tools): report, don't crash
                culprit = "chat_template" if isinstance(record.data["chosen"], list) else "tokenizer"
                found = [(culprit, f"tokenization failed: {type(e).__name__}: {e}")]
            else:
                n_prompt_cut += prompt_cut
                cut = truncate_pair(*full, settings)
                found = _length_problems(full, cut, settings)
        if found:
            problems += [Problem(record.source, record.location, f, reason) for f, reason in found]
        else:
            examples.append(Example(record.id, *cut))
    if n_prompt_cut:  # TRL warns about this too: training context != inference context
        logger.warning("%d record(s): the tokenized prompt is not a prefix of prompt+completion (the chat "
                       "template renders the prompt alone differently, or tokens merge across the boundary); "
                       "the completion starts where they diverge and the prompt's differing end is left out",
                       n_prompt_cut)
    return examples, problems


def prepare_examples(dataset_name: str, tokenizer, settings: TokenizeSettings, *, split: str = "train",
                     eval_split: str | None = None, eval_fraction: float = 0.0, seed: int = 0,
                     dataset_config: str | None = None, on_invalid: str = "error",
                     report_path: str | Path | None = None, tokenize=None
                     ) -> tuple[dict[str, list[Record]], dict[str, list[Example]]]:
    """`load_splits` + `tokenize_records` (or `tokenize`, same signature) per split + one `check_problems`.

    Returns:
        `(records, examples)`, each `{"train": [...][, "eval": [...]]}`; the records are kept for
        fingerprinting the data (the reference cache).
    """
    check_on_invalid(on_invalid, report_path)  # fail before the (possibly long) tokenization
    records = load_splits(dataset_name, split=split, eval_split=eval_split, eval_fraction=eval_fraction,
                          seed=seed, dataset_config=dataset_config)
    examples, all_problems = {}, []
    for name, split_records in records.items():
        examples[name], problems = (tokenize or tokenize_records)(split_records, tokenizer, settings)
        all_problems += problems
        logger.info("%s: %d of %d records tokenized", name, len(examples[name]), len(split_records))
    check_problems(all_problems, on_invalid=on_invalid, report_path=report_path)
    return records, examples


def prepare_from_args(data_args, tokenizer, *, seed: int, report_path: str | Path | None, tokenize=None):
    """`prepare_examples` from a `DataArguments`: what every script runs, so they tokenize identically."""
    settings = TokenizeSettings(max_length=data_args.max_length, max_prompt_length=data_args.max_prompt_length,
                                max_completion_length=data_args.max_completion_length,
                                truncation_mode=data_args.truncation_mode)
    return prepare_examples(data_args.dataset_name, tokenizer, settings, split=data_args.dataset_split,
                            eval_split=data_args.eval_split, eval_fraction=data_args.eval_fraction, seed=seed,
                            dataset_config=data_args.dataset_config, on_invalid=data_args.on_invalid,
                            report_path=report_path, tokenize=tokenize)


# ---------------------------------------------------------------------------------------- fingerprints

def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of everything that decides token ids here: vocabulary, merges, normalizer, pre-tokenizer and
    post-processor (the fast backend's JSON), chat template, bos/eos/pad tokens and padding/truncation side."""
    if getattr(tokenizer, "is_fast", False):
        backend = tokenizer.backend_tokenizer.to_str()
    else:
        backend = json.dumps(sorted(tokenizer.get_vocab().items()))
    state = {"backend": backend, "chat_template": tokenizer.chat_template,
             "special": [str(tokenizer.bos_token), str(tokenizer.eos_token), str(tokenizer.pad_token)],
             "sides": [tokenizer.padding_side, tokenizer.truncation_side]}
    return hashlib.sha256(json.dumps(state, sort_keys=True, default=str).encode("utf-8")).hexdigest()


# ------------------------------------------------------------------------------------------ collation

class PairDataset(torch.utils.data.Dataset):
    """A map-style dataset over tokenized pairs, for a `DataLoader` with `collate_fn=collate_concat`."""

    def __init__(self, examples: list[Example]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> Example:
        return self.examples[index]


def collate_concat(examples: list[Example], pad_token_id: int, pad_to_multiple_of: int | None = None
                   ) -> dict[str, torch.Tensor]:
    """Pads B pairs into one batch of 2B right-padded rows (TRL's `DataCollatorForPreference` layout).

    Returns:
        input_ids, attention_mask, completion_mask: [2B, T] long; rows 0..B-1 are prompt+chosen and rows
        B..2B-1 prompt+rejected; completion_mask is 1 exactly on completion tokens.
        ids: [B] long, the examples' ids.
        num_tokens: scalar long, non-padding tokens of the 2B sequences (the same in every batch layout, so
            tokens/s compares layouts); num_positions: scalar long, positions the model processes (with padding).
    """
    rows = [(e.prompt_ids, e.chosen_ids) for e in examples] + [(e.prompt_ids, e.rejected_ids) for e in examples]
    width = max(len(p) + len(c) for p, c in rows)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    completion_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (p, c) in enumerate(rows):
        input_ids[i, : len(p) + len(c)] = torch.tensor(p + c, dtype=torch.long)
        attention_mask[i, : len(p) + len(c)] = 1
        completion_mask[i, len(p): len(p) + len(c)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask,
            "ids": torch.tensor([e.id for e in examples], dtype=torch.long),
            "num_tokens": attention_mask.sum(), "num_positions": torch.tensor(input_ids.numel())}


def _scored_tokens(examples: list[Example], starts: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
    """Which positions of a packed layout predict which completion token, sequence by sequence.

    `starts[s]` = (flat position of the first completion token's predecessor, flat position of the second
    completion token's predecessor) of sequence s (0..B-1 chosen, B..2B-1 rejected); the completion tokens
    after the first are predicted by consecutive positions from the second value on.
    """
    completions = [e.chosen_ids for e in examples] + [e.rejected_ids for e in examples]
    positions, labels, sequence = [], [], []
    for s, (completion, (first, rest)) in enumerate(zip(completions, starts)):
        positions += [first, *range(rest, rest + len(completion) - 1)]
        labels += completion
        sequence += [s] * len(completion)
    return {"logp_positions": torch.tensor(positions, dtype=torch.long),
            "logp_labels": torch.tensor(labels, dtype=torch.long),
            "logp_sequence": torch.tensor(sequence, dtype=torch.long)}


def collate_padding_free(examples: list[Example], pad_token_id: int, pad_to_multiple_of: int | None = None,
                         one_row: bool = False) -> dict[str, torch.Tensor]:
    """The 2B sequences (chosen ones, then rejected ones) packed without per-sequence padding.

    `one_row=True` (flash-attn varlen): all of them in ONE row, nothing padded. Otherwise (sdpa, eager, flex,
    which take a mask): packed into rows as long as the longest sequence (rounded up to `pad_to_multiple_of`),
    first-fit decreasing, each row padded at its end: attention then stays within row-sized blocks instead of
    one `[N, N]` mask over the whole batch, and little is padded. Padding positions get position 0, so each
    is a sequence of its own to transformers and no real token attends to it.

    Returns:
        input_ids, position_ids: [R, L] long ([1, N] with `one_row`); positions restart at 0 for each
            sequence (transformers reads the sequence boundaries from them). With `one_row`: cu_seq_lens,
            [2B + 1] int32 boundaries, and max_seq_len, a scalar (for flash-attn varlen).
        logp_positions, logp_labels, logp_sequence: [M] long, the flat positions (into R * L) that predict
            the M completion tokens, those tokens, and their sequence (see `_scored_tokens`).
        ids, num_tokens, num_positions (R * L), sequence_lengths: [2B], as in `collate_shared_prefix`.
    """
    rows = [(e.prompt_ids, e.chosen_ids) for e in examples] + [(e.prompt_ids, e.rejected_ids) for e in examples]
    lengths = [len(p) + len(c) for p, c in rows]
    width, packing = (sum(lengths), [list(range(len(rows)))]) if one_row else \
        _pack_rows(lengths, pad_to_multiple_of)
    input_ids = torch.full((len(packing), width), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((len(packing), width), dtype=torch.long)
    starts = [None] * len(rows)
    for r, members in enumerate(packing):
        offset = 0
        for i in members:
            p, c = rows[i]
            input_ids[r, offset:offset + lengths[i]] = torch.tensor(p + c, dtype=torch.long)
            position_ids[r, offset:offset + lengths[i]] = torch.arange(lengths[i])
            flat = r * width + offset
            starts[i] = (flat + len(p) - 1, flat + len(p))
            offset += lengths[i]
    batch = {"input_ids": input_ids, "position_ids": position_ids, **_scored_tokens(examples, starts),
             "ids": torch.tensor([e.id for e in examples], dtype=torch.long),
             "num_tokens": torch.tensor(sum(lengths)), "num_positions": torch.tensor(input_ids.numel()),
             "sequence_lengths": torch.tensor(lengths)}  # for the attention term of the model FLOPs
    if one_row:
        batch["cu_seq_lens"] = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)
        batch["max_seq_len"] = torch.tensor(max(lengths))
    return batch


def _pack_rows(lengths: list[int], pad_to_multiple_of: int | None = None) -> tuple[int, list[list[int]]]:
    """Rows as long as the longest item (rounded up to `pad_to_multiple_of`), and the item indices of each row,
    grouped first-fit decreasing so that each row's lengths sum to at most that width."""
    width = max(lengths)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        slot = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
        if slot is None:
            rows.append([])
            room.append(width)
            slot = len(rows) - 1
        rows[slot].append(i)
        room[slot] -= lengths[i]
    return width, rows


def collate_shared_prefix(examples: list[Example], pad_token_id: int, pad_to_multiple_of: int | None = None
                          ) -> dict[str, torch.Tensor]:
    """Each pair as ONE sequence prompt + chosen + rejected; pairs packed into rows where they fit.

    Positions: prompt 0..P-1, chosen P..P+C-1, rejected P..P+R-1 (restarting after the prompt). Rows are as
    long as the longest pair (rounded up to `pad_to_multiple_of`); shorter pairs share rows (first-fit
    decreasing), so attention stays within row-sized blocks and little is padded.

    Returns:
        input_ids, position_ids: [R, L] long. pair_index: [R, L] long, the pair of each position (-1: padding).
        segment: [R, L] long, 0 prompt, 1 chosen, 2 rejected (padding 0). logp_positions, logp_labels,
        logp_sequence: [M] long (flat indices into R * L; see `_scored_tokens`). ids, num_tokens (of the 2B
        logical prompt+completion sequences, as in every layout), num_positions (R * L).
    """
    sizes = [len(e.prompt_ids) + len(e.chosen_ids) + len(e.rejected_ids) for e in examples]
    width, packing = _pack_rows(sizes, pad_to_multiple_of)
    input_ids = torch.full((len(packing), width), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((len(packing), width), dtype=torch.long)
    pair_index = torch.full((len(packing), width), -1, dtype=torch.long)
    segment = torch.zeros((len(packing), width), dtype=torch.long)
    starts = [None] * (2 * len(examples))
    for r, members in enumerate(packing):
        offset = 0
        for i in members:
            e = examples[i]
            p, c, k = len(e.prompt_ids), len(e.chosen_ids), len(e.rejected_ids)
            sl = slice(offset, offset + p + c + k)
            input_ids[r, sl] = torch.tensor(e.prompt_ids + e.chosen_ids + e.rejected_ids, dtype=torch.long)
            position_ids[r, sl] = torch.cat([torch.arange(p + c), torch.arange(p, p + k)])
            pair_index[r, sl] = i
            segment[r, sl] = torch.tensor([0] * p + [1] * c + [2] * k)
            flat = r * width + offset
            starts[i] = (flat + p - 1, flat + p)  # the last prompt position predicts both first tokens
            starts[len(examples) + i] = (flat + p - 1, flat + p + c)
            offset += p + c + k
    num_tokens = sum(2 * len(e.prompt_ids) + len(e.chosen_ids) + len(e.rejected_ids) for e in examples)
    pair_lengths = [len(e.prompt_ids) + len(e.chosen_ids) + len(e.rejected_ids) for e in examples]
    processed = sum(pair_lengths)
    return {"input_ids": input_ids, "position_ids": position_ids, "pair_index": pair_index, "segment": segment,
            **_scored_tokens(examples, starts), "ids": torch.tensor([e.id for e in examples], dtype=torch.long),
            "num_tokens": torch.tensor(num_tokens), "num_positions": torch.tensor(input_ids.numel()),
            # what the model really processes (the prompt once per pair), for padding ratio and model FLOPs
            "num_processed_tokens": torch.tensor(processed), "sequence_lengths": torch.tensor(pair_lengths)}


# Batch layouts by `--forward_mode`: each collator pairs with `dpo_core.logps.FORWARDS[mode]`; build one with
# `dpo_core.logps.make_collator`, which picks the layout the model's attention implementation takes.
COLLATORS = {"concat": collate_concat, "padding_free": collate_padding_free, "shared_prefix": collate_shared_prefix}
