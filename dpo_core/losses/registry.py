"""The loss registry: `LossInputs` (what a loss may read), the f-divergences of f-DPO, `register` and `LOSSES`.

A loss is a pure function `fn(x: LossInputs) -> (B,) Tensor` registered with what it needs; the families live
in `paired.py` (DPO and its variants, against a reference) and `reference_free.py` (SimPO, CPO, ORPO).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class LossInputs:
    """Everything a loss may read; every tensor is ``(B,)`` (one entry per preference pair).

    ``*_logratios`` are ``policy - reference`` log-probs; ``*_scores`` are the same after the f-divergence
    (equal to the log-ratios for ``reverse_kl``). ``*_lengths`` count completion tokens (may be 0) and
    ``chosen_nll`` is ``-sum log p`` over the chosen completion; they are ``None`` when not given.
    ``simpo_gamma``, ``cpo_alpha`` and ``alphapo_alpha`` are read by ``simpo``/``cpo`` (TRL's ``CPOConfig``).
    """

    policy_chosen_logps: Tensor
    policy_rejected_logps: Tensor
    ref_chosen_logps: Tensor
    ref_rejected_logps: Tensor
    chosen_logratios: Tensor
    rejected_logratios: Tensor
    chosen_scores: Tensor
    rejected_scores: Tensor
    beta: float
    label_smoothing: float
    discopop_tau: float
    chosen_lengths: Tensor | None = None
    rejected_lengths: Tensor | None = None
    chosen_nll: Tensor | None = None
    simpo_gamma: float = 0.5
    cpo_alpha: float = 1.0
    alphapo_alpha: float = 0.0

    @property
    def delta_score(self) -> Tensor:
        """``chosen_scores - rejected_scores``: the implicit reward margin divided by beta, ``(B,)``."""
        return self.chosen_scores - self.rejected_scores


# ---------------------------------------------------------------------------------------------------------
# f-divergences (f-DPO, arXiv 2309.16240, Table 1): the score is f'(pi/pi_ref) written in the log-ratio.
# ``alpha`` is read only by alpha_divergence.


def _reverse_kl(logratios: Tensor, alpha: float) -> Tensor:
    return logratios  # f'(t) = log t + 1; the constant cancels in the chosen - rejected difference


def _forward_kl(logratios: Tensor, alpha: float) -> Tensor:
    return 1 - torch.exp(-logratios)  # f'(t) = 1 - 1/t (shifted by a constant, like TRL)


def _js_divergence(logratios: Tensor, alpha: float) -> Tensor:
    return math.log(2) + F.logsigmoid(logratios)  # f'(t) = log(2t / (t + 1))


# exp() must stay finite after casting back to the input dtype. TRL's values; float64 is ours (exp(709) < max).
_ALPHA_CLAMP_MAX = {torch.float16: 11.0, torch.bfloat16: 80.0, torch.float32: 80.0, torch.float64: 700.0}


def _alpha_divergence(logratios: Tensor, alpha: float) -> Tensor:
    # f'(t) = (t^(alpha-1) - 1) / (alpha - 1); its alpha -> 1 limit is log t, i.e. reverse KL.
    if abs(alpha - 1.0) < 1e-6:
        return logratios
    dtype = logratios.dtype
    # Like TRL, half precision is computed in float32; float64 keeps its precision (TRL raises KeyError).
    t = ((alpha - 1.0) * logratios).to(torch.float64 if dtype == torch.float64 else torch.float32)
    return (torch.exp(t.clamp(max=_ALPHA_CLAMP_MAX[dtype])) - 1.0).to(dtype) * (1.0 / (alpha - 1.0))


F_DIVERGENCES: dict[str, Callable[[Tensor, float], Tensor]] = {
    "reverse_kl": _reverse_kl, "forward_kl": _forward_kl,
    "js_divergence": _js_divergence, "alpha_divergence": _alpha_divergence,
}


# ---------------------------------------------------------------------------------------------------------
# The registry. A loss declares the optional inputs it needs, whether it is defined on f-divergence scores
# (TRL's list: the reparameterisation's log Z(x) only cancels in the chosen - rejected score difference)
# whether WPO weights make sense for it (not for the losses that sort the batch), and whether it reads the
# reference at all. A reference-free loss names the ``(chosen, rejected)`` rewards TRL logs for it
# (``rewards``); the default is DPO's implicit reward ``beta * (policy - reference)``.

RewardFn = Callable[[LossInputs], tuple[Tensor, Tensor]]


class _LossSpec(NamedTuple):
    requires: tuple[str, ...]
    f_divergence: bool
    wpo: bool
    needs_reference: bool = True
    rewards: RewardFn | None = None


LOSSES: dict[str, Callable[[LossInputs], Tensor]] = {}
_SPECS: dict[str, _LossSpec] = {}


def register(name: str, *, requires: tuple[str, ...] = (), f_divergence: bool = False, wpo: bool = True,
             needs_reference: bool = True, rewards: RewardFn | None = None):
    """Decorator adding ``fn(inputs: LossInputs) -> (B,) Tensor`` to ``LOSSES`` under ``name``.

    ``needs_reference=False``: the loss never reads the reference log-probs (no reference is loaded when every
    chosen loss is so); ``rewards(inputs) -> (chosen, rejected)`` are then the rewards TRL logs for it.
    """

    def decorator(fn: Callable[[LossInputs], Tensor]) -> Callable[[LossInputs], Tensor]:
        if name in LOSSES:
            raise ValueError(f"loss {name!r} is already registered")
        LOSSES[name] = fn
        _SPECS[name] = _LossSpec(tuple(requires), f_divergence, wpo, needs_reference, rewards)
        return fn

    return decorator


def needs_reference(loss_types: str | Sequence[str]) -> bool:
    """Whether any of ``loss_types`` reads the reference log-probs (unknown names count as needing it)."""
    loss_types = [loss_types] if isinstance(loss_types, str) else loss_types
    return any(name not in _SPECS or _SPECS[name].needs_reference for name in loss_types)


def _per_token(scores: Tensor, lengths: Tensor) -> Tensor:
    """Average a summed score over the completion tokens; like TRL, an empty completion counts as one."""
    return scores / lengths.clamp(min=1)


def _smoothed_logistic(logits: Tensor, label_smoothing: float) -> Tensor:
    """``-(1 - ls) log sigma(z) - ls log sigma(-z)``: logistic loss whose label is flipped with prob. ``ls``."""
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def _batch_nll(x: LossInputs) -> Tensor:
    """TRL's ``nll_loss``: cross-entropy mean over all chosen completion tokens of the batch, as ``(B,)``.

    TRL gives nan for a batch without chosen tokens; we divide by at least 1. A materialised tensor, not an
    ``expand()`` view (WPO multiplies it).
    """
    return (x.chosen_nll.sum() / x.chosen_lengths.sum().clamp(min=1)) * torch.ones_like(x.chosen_nll)
