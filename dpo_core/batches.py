"""Batches of tokenized pairs: `Example`, `PairDataset`, and the collator of each batch layout.

    batch = collate_concat(examples[:8], tokenizer.pad_token_id)      # 2B rows: chosen, then rejected

A layout's collator and its forward (`dpo_core.logps`) are declared together in `dpo_core.layouts.LAYOUTS`.
Every collator returns `num_tokens` (real tokens of the logical sequences, the same in every layout) and
`num_positions` (positions the model processes), and `ids` (the pairs' example ids).
"""

from __future__ import annotations

import torch

from .tokenized import Example  # noqa: F401  (re-exported)


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
