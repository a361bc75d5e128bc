"""The reference-free relatives of DPO: SimPO (with AlphaPO's reward), CPO and ORPO, as TRL 1.16's
`trl.experimental` `CPOTrainer` and `ORPOTrainer` compute them; functions of the policy log-probs alone.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .registry import LossInputs, _batch_nll, _per_token, _smoothed_logistic, register

# ---------------------------------------------------------------------------------------------------------
# Reference-free relatives (TRL 1.16 ``trl.experimental.cpo`` / ``trl.experimental.orpo``): functions of the
# policy log-probs alone. Their NLL term, like ``sft``'s, is TRL's token mean over the batch's chosen completion
# tokens, ``sum(chosen_nll) / sum(chosen_lengths)``, repeated as a (B,) vector: its mean is TRL's number and its
# gradient TRL's gradient (a per-pair split ``chosen_nll * B / sum(chosen_lengths)`` has the same mean; the
# repeated form keeps one convention with ``sft``).


def _alphapo_reward(logps: Tensor, alpha: float) -> Tensor:
    """AlphaPO's reward (arXiv 2501.03884 Eq. 6 up to beta): ``(1 - p^(-alpha)) / alpha``, ``p = exp(logps)``,
    written ``-expm1(-alpha logps) / alpha`` (TRL: ``(1 - exp(logps).pow(-alpha)) / alpha``; equal in float64 up to
    rounding, and finite where ``exp(logps)`` underflows); ``alpha = 0`` is its limit, ``logps`` itself.
    """
    if alpha == 0.0:
        return logps
    return -torch.expm1(-alpha * logps) / alpha


def _simpo_rewards(x: LossInputs) -> tuple[Tensor, Tensor]:
    """``beta * r`` on mean token log-probs, as TRL's CPO logs them for ``loss_type="simpo"``."""
    chosen = _alphapo_reward(_per_token(x.policy_chosen_logps, x.chosen_lengths), x.alphapo_alpha)
    rejected = _alphapo_reward(_per_token(x.policy_rejected_logps, x.rejected_lengths), x.alphapo_alpha)
    return x.beta * chosen.detach(), x.beta * rejected.detach()


def _cpo_rewards(x: LossInputs) -> tuple[Tensor, Tensor]:
    """``beta * r`` on summed log-probs, as TRL's CPO logs them for ``loss_type="sigmoid"``."""
    chosen = _alphapo_reward(x.policy_chosen_logps, x.alphapo_alpha)
    rejected = _alphapo_reward(x.policy_rejected_logps, x.alphapo_alpha)
    return x.beta * chosen.detach(), x.beta * rejected.detach()


def _orpo_rewards(x: LossInputs) -> tuple[Tensor, Tensor]:
    """``beta * mean token log-prob``, as TRL's ORPO logs them."""
    chosen = _per_token(x.policy_chosen_logps, x.chosen_lengths)
    rejected = _per_token(x.policy_rejected_logps, x.rejected_lengths)
    return x.beta * chosen.detach(), x.beta * rejected.detach()


@register("simpo", requires=("chosen_lengths", "rejected_lengths", "chosen_nll"), needs_reference=False,
          rewards=_simpo_rewards)
def simpo_loss(x: LossInputs) -> Tensor:
    """SimPO, arXiv 2405.14734 Eq. 6 (TRL CPO ``loss_type="simpo"``), plus TRL's ``cpo_alpha`` NLL, ``(B,)``.

    With ``r = mean token log-prob`` (AlphaPO's ``(1 - p^-alpha) / alpha`` of it for ``alphapo_alpha != 0``,
    arXiv 2501.03884; TRL ``CPOConfig.alpha``) and ``z = beta (r_c - r_r) - gamma``:
    ``-(1 - ls) log sigma(z) - ls log sigma(-z) + cpo_alpha * NLL`` (``cpo_alpha = 0``: pure SimPO, TRL's
    default 1.0 is CPO-SimPO). An empty completion averages to 0 (``_per_token``); TRL divides 0 by 0 (nan).
    """
    chosen = _alphapo_reward(_per_token(x.policy_chosen_logps, x.chosen_lengths), x.alphapo_alpha)
    rejected = _alphapo_reward(_per_token(x.policy_rejected_logps, x.rejected_lengths), x.alphapo_alpha)
    losses = _smoothed_logistic(x.beta * (chosen - rejected) - x.simpo_gamma, x.label_smoothing)
    return losses + x.cpo_alpha * _batch_nll(x) if x.cpo_alpha else losses


@register("cpo", requires=("chosen_nll", "chosen_lengths"), needs_reference=False, rewards=_cpo_rewards)
def cpo_loss(x: LossInputs) -> Tensor:
    """CPO, arXiv 2401.08417 Eq. 3 (TRL CPO ``loss_type="sigmoid"``), ``(B,)``: ``-(1 - ls) log sigma(z)
    - ls log sigma(-z) + cpo_alpha * NLL`` with ``z = beta (r_c - r_r)`` on summed log-probs ``r`` (AlphaPO's
    transform of them for ``alphapo_alpha != 0``, as TRL's ``alpha``).
    """
    chosen = _alphapo_reward(x.policy_chosen_logps, x.alphapo_alpha)
    rejected = _alphapo_reward(x.policy_rejected_logps, x.alphapo_alpha)
    losses = _smoothed_logistic(x.beta * (chosen - rejected), x.label_smoothing)
    return losses + x.cpo_alpha * _batch_nll(x) if x.cpo_alpha else losses


def _log1mexp(x: Tensor) -> Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``, branching at ``-ln 2`` (Maechler 2012), exactly TRL's ``log1mexp``."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def _orpo_log_odds(x: LossInputs) -> Tensor:
    """``log odds(y_c) - log odds(y_r)`` on mean token log-probs, ``odds = p / (1 - p)`` (ORPO Eq. 5), ``(B,)``.

    Computed in at least float32 (TRL casts to float32; float64 stays float64). A mean log-prob of 0 (an empty
    completion, or probability 1 in the dtype) would give ``log(1 - p) = -inf`` and a nan gradient (TRL: nan
    already in the mean); it is clamped to ``-tiny``: finite, and no gradient through the odds of that pair.
    """
    dtype = torch.promote_types(x.policy_chosen_logps.dtype, torch.float32)
    tiny = torch.finfo(dtype).tiny
    chosen = _per_token(x.policy_chosen_logps.to(dtype), x.chosen_lengths).clamp(max=-tiny)
    rejected = _per_token(x.policy_rejected_logps.to(dtype), x.rejected_lengths).clamp(max=-tiny)
    return (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))


@register("orpo", requires=("chosen_lengths", "rejected_lengths", "chosen_nll"), needs_reference=False,
          rewards=_orpo_rewards)
def orpo_loss(x: LossInputs) -> Tensor:
    """ORPO, arXiv 2403.07691 Eq. 6-7 (TRL ``ORPOTrainer``), ``(B,)``: ``NLL - beta log sigma(log_odds)``,
    ``beta`` being ORPO's lambda. NLL: TRL's ORPO also counts the chosen prompt tokens (labels from the
    attention mask); ours, as the paper's L_SFT and TRL's CPO, only the chosen completion tokens.
    """
    return (_batch_nll(x) - x.beta * F.logsigmoid(_orpo_log_odds(x))).to(x.policy_chosen_logps.dtype)


def orpo_metrics(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, chosen_lengths: Tensor,
                 rejected_lengths: Tensor, chosen_nll: Tensor) -> dict[str, Tensor]:
    """The extra metrics TRL's ORPO logs, as ``(B,)`` tensors whose means are TRL's numbers (detached):
    ``log_odds_ratio`` (``log sigma(log_odds)``), ``log_odds_chosen`` (``log_odds``) and ``nll_loss``."""
    zeros = torch.zeros_like(policy_chosen_logps)
    x = LossInputs(policy_chosen_logps.detach(), policy_rejected_logps.detach(), zeros, zeros, zeros, zeros,
                   zeros, zeros, beta=1.0, label_smoothing=0.0, discopop_tau=1.0, chosen_lengths=chosen_lengths,
                   rejected_lengths=rejected_lengths, chosen_nll=chosen_nll.detach())
    log_odds = _orpo_log_odds(x)
    return {"log_odds_ratio": F.logsigmoid(log_odds), "log_odds_chosen": log_odds, "nll_loss": _batch_nll(x)}
