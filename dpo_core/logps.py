"""Per-sequence log-probs of preference pairs: the concatenated chosen/rejected forward.

A DPO step needs, for every pair, log pi(chosen | prompt) and log pi(rejected | prompt) summed over
the completion tokens only. `concatenated_forward` runs chosen and rejected rows through the model
in ONE forward (2B rows, as the original DPO code's `concatenated_inputs` does), so the policy's
weights are read once and, under FSDP/ZeRO-3, gathered once per step.

Batch layout (`dpo_core.data.collate_concat`): `input_ids`, `attention_mask`, `completion_mask`,
each `[2B, T]`, rows `0..B-1` = prompt + chosen, rows `B..2B-1` = prompt + rejected.

Other batch layouts (padding-free, shared prompt prefix) register their own forward in `FORWARDS`
with the same signature `(model, batch, *, ld_alpha, wpo) -> ForwardOutput`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class ForwardOutput:
    """What one forward over a batch of B pairs gives the loss and the metrics. All `(B,)` unless noted."""

    chosen_logps: Tensor  # sum of completion-token log-probs (LD-DPO weighted when ld_alpha is set)
    rejected_logps: Tensor
    chosen_lengths: Tensor  # completion token counts (long)
    rejected_lengths: Tensor
    chosen_nll: Tensor  # -sum of chosen completion-token log-probs (never LD-weighted); for the "sft" loss
    chosen_mean_logits: Tensor  # scalar: mean logit over the vocabulary and the chosen completion tokens
    rejected_mean_logits: Tensor  # scalar
    chosen_wpo_log_weights: Tensor | None = None  # WPO (arXiv 2406.11827 Eq. 2), detached; only if asked
    rejected_wpo_log_weights: Tensor | None = None


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Positions that count only real tokens, so left- and right-padded rows give the same numbers."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def token_logps(logits: Tensor, labels: Tensor, *, with_wpo: bool = False) -> tuple[Tensor, Tensor, Tensor | None]:
    """log p(label) per position, the mean logit per position and (optionally) WPO's log sum_v p_v^2.

    The log-softmax runs in float32 even when the model runs in bf16/fp16 (a bf16 log-softmax over a
    large vocabulary loses ~2 decimal digits). It runs one row at a time: without autograd (reference
    forward, precompute) only one `[T, V]` float32 copy exists at once; with autograd each row's copy
    is kept for the backward, as the plain path does.

    Args:
        logits: `[N, T, V]` next-token logits (any float dtype).
        labels: `[N, T]` token ids whose log-probs to gather.
    Returns:
        `([N, T] float32 log-probs, [N, T] float32 mean logits (no grad), [N, T] log sum p^2 or None)`.
    """
    logps, means, sq = [], [], []
    for row_logits, row_labels in zip(logits, labels):
        row = row_logits.float()
        log_norm = row.logsumexp(-1)
        logps.append(row.gather(-1, row_labels.unsqueeze(-1)).squeeze(-1) - log_norm)
        with torch.no_grad():
            means.append(row.mean(-1))
            if with_wpo:
                sq.append((2 * (row - log_norm.unsqueeze(-1))).logsumexp(-1))
    return torch.stack(logps), torch.stack(means), (torch.stack(sq) if with_wpo else None)


def sequence_logps(per_token: Tensor, mask: Tensor, ld_alpha: float | None = None) -> Tensor:
    """Sums `per_token` log-probs over `mask`, for a `[2B, T]` chosen-then-rejected batch.

    With `ld_alpha` (LD-DPO, arXiv 2409.06411 Eq. 8), tokens past the shorter completion of the pair
    are weighted by `ld_alpha`: logp = shared + ld_alpha * tail. It changes the log-probs themselves, so
    the reference (and the reference cache) must be computed with the same `ld_alpha`.
    Returns:
        `(2B,)`.
    """
    mask = mask.to(per_token.dtype)
    if ld_alpha is None:
        return (per_token * mask).sum(-1)
    position = mask.cumsum(-1)  # 1, 2, ... along each completion
    chosen_len, rejected_len = mask.sum(-1).chunk(2)
    shared = torch.minimum(chosen_len, rejected_len).repeat(2).unsqueeze(-1)
    shared_mask = mask * (position <= shared)
    tail_mask = mask * (position > shared)
    return (per_token * shared_mask).sum(-1) + ld_alpha * (per_token * tail_mask).sum(-1)


def concatenated_forward(model, batch: dict[str, Tensor], *, ld_alpha: float | None = None,
                         wpo: bool = False) -> ForwardOutput:
    """One forward of the 2B chosen+rejected rows; per-sequence completion log-probs and statistics.

    Args:
        model: a causal LM returning `.logits` `[2B, T, V]` (plain, DDP- or DeepSpeed-wrapped, PEFT).
        batch: `input_ids`, `attention_mask`, `completion_mask`, each `[2B, T]`.
        ld_alpha: LD-DPO weight of the longer completion's tail; None for plain sums.
        wpo: also compute WPO's per-sequence log-weights.
    """
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    logits = model(input_ids=input_ids, attention_mask=attention_mask,
                   position_ids=position_ids_from_mask(attention_mask), use_cache=False).logits
    # Position t predicts token t+1; the first token has no prediction and is never a completion token.
    labels, mask = input_ids[:, 1:], batch["completion_mask"][:, 1:] * attention_mask[:, 1:]
    per_token, mean_logits, log_sum_sq = token_logps(logits[:, :-1], labels, with_wpo=wpo)
    mask_f = mask.to(per_token.dtype)
    logps = sequence_logps(per_token, mask_f, ld_alpha)
    lengths = mask.sum(-1)
    chosen_logps, rejected_logps = logps.chunk(2)
    chosen_lengths, rejected_lengths = lengths.chunk(2)
    chosen_mask, rejected_mask = mask_f.chunk(2)
    chosen_mean, rejected_mean = mean_logits.chunk(2)
    out = ForwardOutput(
        chosen_logps=chosen_logps, rejected_logps=rejected_logps,
        chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths,
        chosen_nll=-(per_token.chunk(2)[0] * chosen_mask).sum(-1),
        chosen_mean_logits=(chosen_mean * chosen_mask).sum() / chosen_mask.sum().clamp(min=1),
        rejected_mean_logits=(rejected_mean * rejected_mask).sum() / rejected_mask.sum().clamp(min=1),
    )
    if wpo:
        with torch.no_grad():
            aligned = ((per_token - log_sum_sq) * mask_f).sum(-1) / lengths.clamp(min=1)
        out.chosen_wpo_log_weights, out.rejected_wpo_log_weights = aligned.chunk(2)
    return out


FORWARDS = {"concat": concatenated_forward}
