"""Per-sequence log-probs of preference pairs: the forward of each batch layout (concatenated, padding-free,
shared-prefix).

A DPO step needs, for every pair, log pi(chosen | prompt) and log pi(rejected | prompt) summed over
the completion tokens only. `concatenated_forward` runs chosen and rejected rows through the model
in ONE forward (2B rows, as the original DPO code's `concatenated_inputs` does), so the policy's
weights are read once and, under FSDP/ZeRO-3, gathered once per step.

Batch layout (`dpo_core.batches.collate_concat`): `input_ids`, `attention_mask`, `completion_mask`,
each `[2B, T]`, rows `0..B-1` = prompt + chosen, rows `B..2B-1` = prompt + rejected.

Other batch layouts have their own forward, all with the signature
`(model, batch, *, ld_alpha, wpo, chunk_size) -> ForwardOutput` and the same numbers (float32 rounding):
`padding_free` (the 2B sequences packed without per-sequence padding) and `shared_prefix` (prompt + chosen +
rejected as one sequence per pair). Each forward is declared with its collator in `dpo_core.layouts.LAYOUTS`.

Every layout scores only the positions that predict a completion token, and by default chunk by chunk from
the final hidden states (`dpo_core.chunked_head.completion_token_stats`): the `[2B, T, V]` float32 logits
never exist.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .batches import Example, collate_padding_free
from .chunked_head import (  # noqa: F401  (re-exported: callers import the scoring through this module)
    DEFAULT_CHUNK_SIZE,
    LogitTransform,
    completion_token_stats,
    logit_transform,
    token_logps,
    unwrap_model,
)
from .errors import ConfigError


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


def assemble_output(per_token: Tensor, mean_logits: Tensor, log_sum_sq: Tensor | None, sequence: Tensor,
                    num_sequences: int, *, ld_alpha: float | None = None, wpo: bool = False) -> ForwardOutput:
    """Per-token stats of the completion tokens of 2B sequences -> `ForwardOutput`; the same math in every mode.

    Args:
        per_token, mean_logits, log_sum_sq: `(M,)` from `completion_token_stats`.
        sequence: `(M,)` long, the sequence of each token (0..B-1 chosen, B..2B-1 rejected), tokens sorted by
            sequence and, within one, by position.
        num_sequences: 2B.
    """
    lengths = torch.bincount(sequence, minlength=num_sequences)
    starts = lengths.cumsum(0) - lengths
    index = (sequence, torch.arange(sequence.numel(), device=sequence.device) - starts[sequence])
    width = int(lengths.max()) if lengths.numel() else 0
    mask_f = torch.zeros(num_sequences, width, dtype=torch.float32, device=per_token.device).index_put(
        index, torch.ones_like(per_token))

    def dense(values):  # [2B, longest completion], zeros past each completion; differentiable
        return torch.zeros(num_sequences, width, dtype=values.dtype, device=values.device).index_put(index, values)

    per_token_d, mean_d = dense(per_token), dense(mean_logits)
    logps = sequence_logps(per_token_d, mask_f, ld_alpha)
    chosen_mask, rejected_mask = mask_f.chunk(2)
    chosen_mean, rejected_mean = mean_d.chunk(2)
    chosen_logps, rejected_logps = logps.chunk(2)
    chosen_lengths, rejected_lengths = lengths.chunk(2)
    out = ForwardOutput(
        chosen_logps=chosen_logps, rejected_logps=rejected_logps,
        chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths,
        chosen_nll=-(per_token_d.chunk(2)[0] * chosen_mask).sum(-1),
        chosen_mean_logits=(chosen_mean * chosen_mask).sum() / chosen_mask.sum().clamp(min=1),
        rejected_mean_logits=(rejected_mean * rejected_mask).sum() / rejected_mask.sum().clamp(min=1),
    )
    if wpo:
        with torch.no_grad():
            aligned = ((per_token_d - dense(log_sum_sq)) * mask_f).sum(-1) / lengths.clamp(min=1)
        out.chosen_wpo_log_weights, out.rejected_wpo_log_weights = aligned.chunk(2)
    return out


def concatenated_forward(model, batch: dict[str, Tensor], *, ld_alpha: float | None = None,
                         wpo: bool = False, chunk_size: int = DEFAULT_CHUNK_SIZE) -> ForwardOutput:
    """One forward of the 2B chosen+rejected rows; per-sequence completion log-probs and statistics.

    Args:
        model: a causal LM returning `.logits` `[2B, T, V]` (plain, DDP- or DeepSpeed-wrapped, PEFT).
        batch: `input_ids`, `attention_mask`, `completion_mask`, each `[2B, T]`.
        ld_alpha: LD-DPO weight of the longer completion's tail; None for plain sums.
        wpo: also compute WPO's per-sequence log-weights.
        chunk_size: completion tokens per chunk of the log-softmax (see `completion_token_stats`); 0: plain
            path (the model's full logits).
    """
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    # Position t predicts token t+1; the first token has no prediction and is never a completion token.
    mask = batch["completion_mask"][:, 1:] * attention_mask[:, 1:]
    rows, cols = mask.nonzero(as_tuple=True)  # row-major: sorted by sequence, then position
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask,
                  position_ids=position_ids_from_mask(attention_mask), use_cache=False)
    stats = completion_token_stats(model, inputs, rows * input_ids.shape[1] + cols, input_ids[rows, cols + 1],
                                   chunk_size=chunk_size, with_wpo=wpo)
    return assemble_output(*stats, rows, input_ids.shape[0], ld_alpha=ld_alpha, wpo=wpo)


# --------------------------------------------------------------------------------- packed batch layouts

def attn_implementation(model) -> str:
    return str(getattr(unwrap_model(model).config, "_attn_implementation", None) or "eager")


def padding_free_forward(model, batch: dict[str, Tensor], *, ld_alpha: float | None = None, wpo: bool = False,
                         chunk_size: int = DEFAULT_CHUNK_SIZE) -> ForwardOutput:
    """The 2B sequences packed without per-sequence padding (`dpo_core.batches.collate_padding_free`).

    No attention mask is passed: transformers then reads the sequence boundaries from the restarting
    `position_ids` (`masking_utils.find_packed_sequence_indices`) and gives SDPA/eager/flex a block-diagonal
    causal mask per row; flash-attn gets the varlen boundaries `cu_seq_lens_*` of the one-row layout.
    """
    stats = _padding_free_stats(model, batch, chunk_size=chunk_size, wpo=wpo)
    if _needs_layout_check(model, "padding_free"):
        # Checked on a one-row batch of this batch's first pair, where the rejected sequence follows the chosen
        # one in the row (this batch may have packed nothing).
        pair = _first_pair(batch)
        one_row = {k: v.to(batch["input_ids"].device) for k, v in
                   collate_padding_free([pair], pad_token_id=0, one_row=True).items()}
        with torch.no_grad():
            per_token = _padding_free_stats(unwrap_model(model), one_row, chunk_size=chunk_size, wpo=False)[0]
        check_packed_layout(model, one_row, per_token, "padding_free")
    return assemble_output(*stats, batch["logp_sequence"], 2 * batch["ids"].numel(), ld_alpha=ld_alpha, wpo=wpo)


def _padding_free_stats(model, batch: dict[str, Tensor], *, chunk_size: int, wpo: bool):
    inputs = dict(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
    if "flash" in attn_implementation(model):
        if "cu_seq_lens" not in batch:
            raise ConfigError("forward_mode padding_free with flash-attn needs the one-row layout (varlen "
                             "boundaries): build the collator with dpo_core.layouts.make_collator(mode, pad, model)")
        cu = batch["cu_seq_lens"].to(torch.int32)
        inputs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=int(batch["max_seq_len"]),
                      max_length_k=int(batch["max_seq_len"]))
    return completion_token_stats(model, inputs, batch["logp_positions"], batch["logp_labels"],
                                  chunk_size=chunk_size, with_wpo=wpo)


def _first_pair(batch: dict[str, Tensor]):
    """The first pair of a packed batch as an `Example` (prompt from the chosen sequence's row, completions from
    the scored labels)."""
    flat_ids, flat_pos = batch["input_ids"].reshape(-1), batch["position_ids"].reshape(-1)
    completions = []
    for seq in (0, batch["ids"].numel()):
        completions.append(batch["logp_labels"][batch["logp_sequence"] == seq].tolist())
    first = int(batch["logp_positions"][0])  # sequence 0's first scored position: the last prompt token
    prompt = flat_ids[first - int(flat_pos[first]):first + 1].tolist()
    return Example(int(batch["ids"][0]), prompt, *completions)


def shared_prefix_mask_mod(pair: Tensor, segment: Tensor, position: Tensor | None = None,
                           window: int | None = None):
    """FlexAttention `mask_mod` of shared-prefix rows: causal within a pair; rejected tokens do not see chosen ones;
    with `window` (sliding-window layers), only keys fewer than `window` positions back.

    `pair`/`segment`/`position` are `[R, L]` (pair index, -1 for padding; 0 prompt, 1 chosen, 2 rejected;
    position ids).
    """
    def mask_mod(b, h, q, kv):
        same = pair[b, q] == pair[b, kv]
        allowed = same & (kv <= q) & ~((segment[b, q] == 2) & (segment[b, kv] == 1))
        if window is not None:
            allowed = allowed & (position[b, q] - position[b, kv] < window)
        return allowed

    return mask_mod


def attention_layer_windows(config) -> dict[str | None, int | None]:
    """`{layer type: sliding window or None}` of a decoder: `{None: w}` for one mask for all layers (w None when
    no layer slides; Mistral-style models slide everywhere), or one entry per `config.layer_types` type, for
    models that take a mask per layer type (Gemma-2/3, Qwen-2/3 with sliding layers...)."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if not types:
        return {None: window if isinstance(window, int) else None}
    unknown = set(types) - {"full_attention", "sliding_attention"}
    if unknown:
        raise ConfigError(f"forward_mode shared_prefix: layer types {sorted(unknown)} of {type(config).__name__} take "
                         "masks this mode cannot build; use --forward_mode concat or padding_free")
    return {t: (window if t == "sliding_attention" else None) for t in set(types)}


def shared_prefix_attention_mask(batch: dict[str, Tensor], implementation: str, dtype: torch.dtype,
                                 window: int | None = None):
    """The shared-prefix mask in the form the attention implementation takes: a BlockMask (flex_attention),
    a boolean `[R, 1, L, L]` mask (sdpa: True attends) or an additive float one (eager). `window`: a sliding
    window over position ids (what transformers' `sliding_window_overlay` does over indices)."""
    pair, segment, position = batch["pair_index"], batch["segment"], batch["position_ids"]
    rows, length = pair.shape
    if implementation == "flex_attention":
        from torch.nn.attention.flex_attention import create_block_mask

        return create_block_mask(shared_prefix_mask_mod(pair, segment, position, window), B=rows, H=None,
                                 Q_LEN=length, KV_LEN=length, device=pair.device)
    if "flash" in implementation:
        raise ConfigError("forward_mode shared_prefix needs a custom attention mask, which flash-attn cannot take; "
                         "use --attn_implementation sdpa or flex_attention (or another --forward_mode)")
    q = torch.arange(length, device=pair.device)
    allowed = (pair[:, :, None] == pair[:, None, :]) & (q[None, None, :] <= q[None, :, None])
    allowed &= ~((segment[:, :, None] == 2) & (segment[:, None, :] == 1))
    if window is not None:
        allowed &= (position[:, :, None] - position[:, None, :]) < window
    allowed = allowed.unsqueeze(1)
    if implementation == "eager":
        return torch.zeros(allowed.shape, dtype=dtype, device=pair.device).masked_fill(~allowed, torch.finfo(dtype).min)
    return allowed


def shared_prefix_forward(model, batch: dict[str, Tensor], *, ld_alpha: float | None = None, wpo: bool = False,
                          chunk_size: int = DEFAULT_CHUNK_SIZE) -> ForwardOutput:
    """prompt + chosen + rejected as ONE sequence per pair (`dpo_core.batches.collate_shared_prefix`).

    The prompt runs once per pair. Rejected tokens see the prompt and themselves but not the chosen tokens, and
    their positions continue from the prompt length, so each rejected token computes exactly what it computes
    in a prompt+rejected row (arXiv 2410.20305). The first chosen AND the first rejected token are both
    predicted by the last prompt position: `logp_positions` holds it twice. Models with sliding-window layers
    get the window on top (a mask per layer type where the model takes one).
    """
    base = unwrap_model(model)
    implementation, dtype = attn_implementation(model), next(base.parameters()).dtype
    masks = {layer_type: shared_prefix_attention_mask(batch, implementation, dtype, window)
             for layer_type, window in attention_layer_windows(base.config).items()}
    inputs = dict(input_ids=batch["input_ids"], attention_mask=masks[None] if None in masks else masks,
                  position_ids=batch["position_ids"], use_cache=False)
    try:
        stats = completion_token_stats(model, inputs, batch["logp_positions"], batch["logp_labels"],
                                       chunk_size=chunk_size, with_wpo=wpo)
    except (ValueError, RuntimeError, TypeError) as e:
        if "shared_prefix" in _CHECKED_LAYOUTS.get(base, ()):
            raise
        raise ConfigError(f"forward_mode shared_prefix: {type(base).__name__} ({implementation}) failed with the "
                         f"4-D shared-prefix attention mask ({type(e).__name__}: {e}); use --forward_mode concat") from e
    check_packed_layout(model, batch, stats[0], "shared_prefix")
    return assemble_output(*stats, batch["logp_sequence"], 2 * batch["ids"].numel(), ld_alpha=ld_alpha, wpo=wpo)


# (model, layout) pairs whose packed log-probs were checked against a plain one-sequence forward (once each).
_CHECKED_LAYOUTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def check_packed_layout(model, batch: dict[str, Tensor], per_token: Tensor, mode: str) -> None:
    """Once per model and layout: the first rejected sequence of `batch` and the one that starts furthest into its
    row, run alone as plain causal sequences (no mask, no packing), must give the per-token log-probs the packed
    forward gave. (`padding_free_forward` checks a one-row batch of its first pair.)

    A model whose attention does not follow the layout (positions from the mask instead of `position_ids`, as
    ALiBi models do; attention patterns transformers builds per model) would otherwise train on silently
    wrong log-probs. Tolerance: 1e-4 per token in float32, 0.5 + 2% on the sequence's sum in lower precision.
    Skipped while dropout is active (two forwards differ anyway).
    """
    if not _needs_layout_check(model, mode):
        return
    base = unwrap_model(model)
    flat_ids, flat_pos = batch["input_ids"].reshape(-1), batch["position_ids"].reshape(-1)
    width = batch["input_ids"].shape[-1]
    per_token = per_token.detach().float()
    float32 = next(base.parameters()).dtype == torch.float32
    # Each sequence's first scored position, and where the sequence starts in the flat layout.
    sequences = batch["logp_sequence"].tolist()
    first_index = {}
    for i, seq in enumerate(sequences):
        first_index.setdefault(seq, i)
    starts = {seq: int(batch["logp_positions"][i]) - int(flat_pos[batch["logp_positions"][i]])
              for seq, i in first_index.items()}
    # The first rejected sequence (after its chosen one in shared_prefix rows), and the sequence that starts
    # furthest into its row (the one most exposed to whatever precedes it in the row).
    packed = max(starts, key=lambda seq: starts[seq] % width)
    for seq in dict.fromkeys(x for x in (batch["ids"].numel(), packed) if x in starts):
        selected = (batch["logp_sequence"] == seq).nonzero().squeeze(-1)
        labels = batch["logp_labels"][selected]
        first, start = int(batch["logp_positions"][selected[0]]), starts[seq]
        ids = torch.cat([flat_ids[start:first + 1], labels]).unsqueeze(0)
        with torch.no_grad():
            logits = base(input_ids=ids, use_cache=False).logits[0, first - start:-1].float()
        want = logits.log_softmax(-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        got = per_token[selected]
        bad = (got - want).abs().max().item() > 1e-4 if float32 else \
            (got.sum() - want.sum()).abs().item() > 0.5 + 0.02 * want.sum().abs().item()
        if bad:
            raise ConfigError(
                f"forward_mode {mode}: {type(base).__name__} ({attn_implementation(model)}) gives packed log-probs "
                f"that differ from a plain forward of the same sequence (max |difference| per token "
                f"{(got - want).abs().max().item():.3g}): this model's attention does not follow the packed "
                "layout; use --forward_mode concat")
    _CHECKED_LAYOUTS.setdefault(base, set()).add(mode)


def _needs_layout_check(model, mode: str) -> bool:
    base = unwrap_model(model)
    if mode in _CHECKED_LAYOUTS.get(base, ()):
        return False
    return not any(isinstance(m, nn.Dropout) and m.p > 0 and m.training for m in base.modules())
