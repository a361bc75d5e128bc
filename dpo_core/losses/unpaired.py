"""Unpaired preference losses (KTO, arXiv 2402.01306; APO-zero unpaired, arXiv 2408.06266): each example is one
completion labelled desirable or undesirable, scored against a reference and a batch-level KL estimate.

A loss is one `@register_unpaired` function `fn(logratios, labels, kl, beta) -> (B,)` (before the desirable /
undesirable weights). `kto_loss` applies it as TRL 1.16's `KTOTrainer._compute_loss` does:

- `logratios = policy - reference` completion log-probs, `(B,)`; `labels` True for desirable completions.
- KL point (`kto` only): `mean(policy - reference)` over the batch's *mismatched* (prompt, completion) pairs,
  averaged over processes, clamped at 0 and detached (`kl_point`).
- `losses = desirable_weight * loss(desirable) ++ undesirable_weight * loss(undesirable)`; the step's loss is
  their mean (TRL: `torch.cat(...).nanmean()`; the order of the examples does not change it).
- rewards `beta * logratios` (detached), as TRL logs them.

`tests/test_kto.py` checks these numbers against TRL's `_compute_loss` itself in float64.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

UnpairedLoss = Callable[[Tensor, Tensor, Tensor, float], Tensor]
UNPAIRED_LOSSES: dict[str, UnpairedLoss] = {}
_USES_KL: set[str] = set()


def register_unpaired(name: str, *, uses_kl: bool):
    """Adds `fn(logratios, labels, kl, beta) -> (B,)` to `UNPAIRED_LOSSES`; `uses_kl`: it reads the KL point (the
    batch then carries mismatched KL completions)."""

    def decorator(fn: UnpairedLoss) -> UnpairedLoss:
        if name in UNPAIRED_LOSSES:
            raise ValueError(f"unpaired loss {name!r} is already registered")
        UNPAIRED_LOSSES[name] = fn
        if uses_kl:
            _USES_KL.add(name)
        return fn

    return decorator


def uses_kl(loss_type: str) -> bool:
    return loss_type in _USES_KL


@register_unpaired("kto", uses_kl=True)
def kto(logratios: Tensor, labels: Tensor, kl: Tensor, beta: float) -> Tensor:
    """KTO Eq. (7): desirable `1 - sigmoid(beta (r - z))`, undesirable `1 - sigmoid(beta (z - r))`."""
    return torch.where(labels, 1 - F.sigmoid(beta * (logratios - kl)), 1 - F.sigmoid(beta * (kl - logratios)))


@register_unpaired("apo_zero_unpaired", uses_kl=False)
def apo_zero_unpaired(logratios: Tensor, labels: Tensor, kl: Tensor, beta: float) -> Tensor:
    """APO-zero, unpaired: desirable `1 - sigmoid(beta r)` (pushed up), undesirable `sigmoid(beta r)` (down)."""
    return torch.where(labels, 1 - F.sigmoid(beta * logratios), F.sigmoid(beta * logratios))


def kl_point(policy_kl_logps: Tensor, ref_kl_logps: Tensor, reduce_mean: Callable[[Tensor], Tensor] | None = None
             ) -> Tensor:
    """KTO's reference point: the batch mean of `policy - reference` log-probs of mismatched pairs, averaged over
    processes by `reduce_mean` (TRL: `gather_for_metrics(kl).mean()`), clamped at 0, detached; a 0-dim tensor."""
    kl = (policy_kl_logps - ref_kl_logps).mean().detach()
    if reduce_mean is not None:
        kl = reduce_mean(kl)
    return kl.clamp(min=0)


def kto_loss(policy_logps: Tensor, ref_logps: Tensor, labels: Tensor, *, loss_type: str = "kto", beta: float = 0.1,
             kl: Tensor | None = None, desirable_weight: float = 1.0, undesirable_weight: float = 1.0
             ) -> tuple[Tensor, Tensor]:
    """Per-example losses (weighted) and rewards `beta * (policy - reference)` (detached), each `(B,)`.

    Args:
        policy_logps, ref_logps: `(B,)` summed completion log-probs.
        labels: `(B,)` bool, True for desirable completions.
        kl: the KL point (`kl_point`); required by `kto`, ignored by `apo_zero_unpaired`.
    """
    if loss_type not in UNPAIRED_LOSSES:
        raise ValueError(f"unknown unpaired loss_type {loss_type!r}; valid: {sorted(UNPAIRED_LOSSES)}")
    if uses_kl(loss_type) and kl is None:
        raise ValueError(f"loss_type {loss_type!r} needs the KL point (kl)")
    labels = labels.to(torch.bool)
    logratios = policy_logps - ref_logps
    kl = torch.zeros((), dtype=logratios.dtype, device=logratios.device) if kl is None else kl.to(logratios.dtype)
    weights = torch.where(labels, desirable_weight, undesirable_weight).to(logratios.dtype)
    losses = weights * UNPAIRED_LOSSES[loss_type](logratios, labels, kl, beta)
    return losses, beta * logratios.detach()
