"""Scoring completion tokens from a causal LM's final hidden states: the chunked LM head.

Only the positions that predict a completion token matter to any DPO statistic. `completion_token_stats` runs
the model once with its output-embeddings module swapped for `_ChunkedHead`, which computes log p(label), the
mean logit and WPO's log sum_v p_v^2 `chunk_size` positions at a time (lm_head, float32 log-softmax, gather;
recomputed in backward), so the `[N, T, V]` logits never exist. What a model's forward does to the head's
output (softcapping, logit scaling) is applied as `LogitTransform` and checked once per model against the
model's own output. The batch layouts that call this are in `dpo_core.logps`.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .errors import ConfigError

DEFAULT_CHUNK_SIZE = 1024
# At most this many logits per chunk (64 MiB in float32): at a 32k vocabulary a chunk holds 512 positions, at
# 128k 128; the chunk's log-softmax and its backward keep a few tensors of this size alive.
MAX_CHUNK_LOGITS = 2 ** 24


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


def unwrap_model(model: nn.Module) -> nn.Module:
    """The transformers model inside DDP / DeepSpeed / torch.compile / PEFT wrappers (for its config and head).

    Only for reading and for locating the output head: the forward itself always goes through `model`, so
    that DDP's and DeepSpeed's forward hooks (gradient synchronisation, ZeRO-3 gathering) run.
    """
    while True:
        if isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile
            model = model._orig_mod
        elif isinstance(getattr(model, "module", None), nn.Module):  # DDP, DeepSpeedEngine
            model = model.module
        elif hasattr(model, "get_base_model") and hasattr(model, "peft_config"):  # PeftModel
            model = model.get_base_model()
        else:
            return model


def _output_head(base: nn.Module) -> tuple[nn.Module, str, nn.Module]:
    """`(parent, attribute, head)` of the module that maps final hidden states to logits (`lm_head`)."""
    head = base.get_output_embeddings()
    if head is None:
        raise ConfigError(f"{type(base).__name__} has no output embeddings (lm_head): chunked log-probs need one; "
                         "set --logps_chunk_size 0")
    for name, module in base.named_modules():
        if module is head:
            parent_name, _, attr = name.rpartition(".")
            return base.get_submodule(parent_name), attr, head
    raise ConfigError(f"{type(base).__name__}: the output embeddings are not a submodule")


@dataclass(frozen=True)
class LogitTransform:
    """What a model's forward does to the LM head's output before returning it as logits:
    `softcap * tanh(scale * x / softcap)` (no softcap: `scale * x`). The chunked head bypasses that code, so it
    applies this itself; `completion_token_stats` checks it once per model against the model's own output."""

    scale: float = 1.0
    softcap: float | None = None

    def __call__(self, logits: Tensor) -> Tensor:
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def logit_transform(config) -> LogitTransform:
    """The post-head transform the transformers model of `config` applies, from the config fields that the
    library's forwards read: Gemma-2/3/4's `final_logit_softcapping`, Cohere's `logit_scale` (times),
    Granite's `logits_scaling` (divided by; HyperCLOVA X multiplies), `output_multiplier` (times)."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    scale = 1.0
    for name in ("logit_scale", "output_multiplier"):
        value = getattr(config, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            scale *= value
    value = getattr(config, "logits_scaling", None)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value:
        scale = scale * value if str(getattr(config, "model_type", "")).startswith("hyperclovax") else scale / value
    softcap = getattr(config, "final_logit_softcapping", None)
    return LogitTransform(float(scale), float(softcap) if softcap else None)


def _token_stats(head: nn.Module, hidden: Tensor, labels: Tensor, transform: LogitTransform, with_wpo: bool):
    """log p(label), mean logit and (WPO) log sum_v p_v^2 of `hidden` `[n, H]` rows; the log-softmax in float32."""
    logits = transform(head(hidden).float())
    log_norm = logits.logsumexp(-1)
    logp = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - log_norm
    with torch.no_grad():
        mean = logits.mean(-1)
        sq = (2 * (logits - log_norm.unsqueeze(-1))).logsumexp(-1) if with_wpo else None
    return logp, mean, sq


class _ChunkedHead(nn.Module):
    """Stands in for `lm_head` during one forward: computes the completion-token stats chunk by chunk from the
    final hidden states, keeps them in `self.result`, and returns empty logits `[N, T, 0]`.

    Each chunk runs under `torch.utils.checkpoint`: only `[chunk, V]` logits exist at a time, in forward and
    again in backward (recomputed there). The real head is *called* (never its weight read directly), inside
    the wrapped model's forward, so ZeRO-3 / FSDP gather its weight as they would for the plain path, and
    LoRA or modules_to_save on lm_head apply.

    With `probe`, it returns the head's raw output for the first scored position instead (`[1, 1, V]`, also
    kept in `self.raw`), so that the caller sees what the model's forward made of it.
    """

    def __init__(self, head: nn.Module, positions: Tensor, labels: Tensor, chunk_size: int,
                 transform: LogitTransform, with_wpo: bool, probe: bool = False):
        super().__init__()
        object.__setattr__(self, "head", head)  # not a submodule: the model's parameters stay as they are
        self.positions, self.labels, self.chunk_size = positions, labels, chunk_size
        self.transform, self.with_wpo, self.probe, self.result, self.raw = transform, with_wpo, probe, None, None

    def forward(self, hidden: Tensor) -> Tensor:
        selected = hidden.reshape(-1, hidden.shape[-1]).index_select(0, self.positions)
        recompute = torch.is_grad_enabled() and (selected.requires_grad or any(
            p.requires_grad for p in self.head.parameters()))
        parts = []
        for start in range(0, selected.shape[0], self.chunk_size):
            args = (self.head, selected[start:start + self.chunk_size],
                    self.labels[start:start + self.chunk_size], self.transform, self.with_wpo)
            parts.append(checkpoint(_token_stats, *args, use_reentrant=False) if recompute else _token_stats(*args))
        if not parts:
            empty = hidden.new_zeros(0, dtype=torch.float32)
            parts = [(empty, empty, empty if self.with_wpo else None)]
        logp, mean, sq = zip(*parts)
        self.result = (torch.cat(logp), torch.cat(mean), torch.cat(sq) if self.with_wpo else None)
        # Empty "logits" that still depend on the head: DDP(find_unused_parameters=True) walks the graph from
        # the forward's outputs, and must find the head's parameters used.
        out = hidden[..., :0]
        if self.probe and selected.shape[0]:
            with torch.no_grad():
                self.raw = self.head(selected[:1])
            out = self.raw.unsqueeze(0)
        return out + 0 * self.result[0].sum().to(out.dtype)


# Models whose post-head transform has been checked against their own forward's output (once per model).
_CHECKED_HEADS: weakref.WeakSet = weakref.WeakSet()


def _check_transform(base: nn.Module, transform: LogitTransform, raw: Tensor | None, returned: Tensor | None):
    """Raises unless the model's forward turned the head's raw output into `transform(raw)`: a model that
    changes its logits in some other way would otherwise get silently wrong log-probs from the chunked head."""
    if raw is None:
        return
    got = None if returned is None else returned.detach().float().reshape(-1)
    want = transform(raw.float()).reshape(-1)
    tol = 1e-5 if raw.dtype == torch.float32 else 2e-2
    if got is None or got.shape != want.shape or not torch.allclose(
            got, want, rtol=tol, atol=tol * float(want.abs().max().clamp_min(1e-30))):
        diff = "shape differs" if got is None or got.shape != want.shape else \
            f"max |difference| {(got - want).abs().max().item():.3g} of max |logit| {want.abs().max().item():.3g}"
        raise ConfigError(
            f"{type(base).__name__}'s forward changes the logits after its output embeddings in a way the chunked "
            f"log-probs do not reproduce ({transform}; {diff}): set --logps_chunk_size 0 (full logits)")
    _CHECKED_HEADS.add(base)


def completion_token_stats(model, inputs: dict, positions: Tensor, labels: Tensor, *,
                           chunk_size: int = DEFAULT_CHUNK_SIZE, with_wpo: bool = False
                           ) -> tuple[Tensor, Tensor, Tensor | None]:
    """Runs `model(**inputs)` and scores the completion tokens only.

    Only positions that predict a completion token matter to any DPO statistic, so only those go through the
    log-softmax (prompts are often most of a sequence). With `chunk_size > 0` the model's lm_head is swapped,
    for this one call, for `_ChunkedHead`: the `[N, T, V]` logits are never formed, and the float32 ones only
    `chunk_size` rows at a time. The call still goes through `model` itself (DDP / DeepSpeed forward hooks
    run; do not unwrap it for the forward). With `chunk_size == 0` the plain path: the model's full logits.

    Args:
        inputs: keyword arguments of the model's forward (the batch layout's ids, masks, positions).
        positions: `(M,)` long, flat indices into the `[N * T]` positions of the final hidden states whose
            next-token prediction is scored (a position may repeat).
        labels: `(M,)` long, the token each of them predicts.
    Returns:
        `(log p(label) (M,) float32, mean logit over V (M,) no grad, WPO log sum_v p_v^2 (M,) or None)`.
    """
    if not chunk_size:
        logits = model(**inputs).logits
        selected = logits.reshape(-1, logits.shape[-1]).index_select(0, positions)
        logp, mean, sq = token_logps(selected.unsqueeze(0), labels.unsqueeze(0), with_wpo=with_wpo)
        return logp[0], mean[0], (sq[0] if with_wpo else None)
    base = unwrap_model(model)
    parent, attr, head = _output_head(base)
    transform = logit_transform(base.config)
    text_config = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    vocab = getattr(text_config, "vocab_size", None)
    if vocab:
        chunk_size = min(chunk_size, max(16, MAX_CHUNK_LOGITS // vocab))
    probe = base not in _CHECKED_HEADS  # the first call: compare `transform` with what the forward does
    chunked = _ChunkedHead(head, positions, labels, chunk_size, transform, with_wpo, probe=probe)
    setattr(parent, attr, chunked)
    try:
        output = model(**inputs)
    finally:
        setattr(parent, attr, head)
    if chunked.result is None:
        raise ConfigError(f"{type(base).__name__}'s forward did not call its output embeddings module; "
                           "set --logps_chunk_size 0")
    if probe:
        _check_transform(base, transform, chunked.raw, getattr(output, "logits", None))
    return chunked.result
