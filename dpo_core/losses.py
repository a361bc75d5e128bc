"""Preference losses as pure functions of per-sequence log-probs.

Each loss TRL's ``DPOTrainer`` offers is one small function in the ``LOSSES`` registry, mapping a
:class:`LossInputs` of ``(B,)`` tensors to the ``(B,)`` per-pair loss. :func:`dpo_loss` builds the inputs
once (f-divergence scores included), applies optional WPO weights, sums the requested losses with their
weights and returns ``(losses, chosen_rewards, rejected_rewards)``; the caller reduces (``losses.mean()``
is TRL's scalar loss). The formulas follow TRL 1.16 ``DPOTrainer._compute_loss``; ``tests/test_losses.py``
checks them against it in float64. Deliberate differences, each repeated where it applies:

- ``sigmoid`` honours ``label_smoothing`` (conservative DPO); TRL ignores it there.
- Errors instead of nan or warnings: ``robust`` needs label_smoothing in [0, 0.5) (TRL warns),
  ``exo_pair`` in (0, 1) (TRL rejects only 0), ``beta`` must be > 0.
- ``alpha_divergence`` works in float64 (TRL raises ``KeyError``); ``sft`` works with WPO (TRL raises).
- ``exo_pair`` takes ``log(epsilon)`` in double precision (TRL: float32, ~1e-7 relative apart).

The reference-free relatives ``simpo``, ``cpo`` and ``orpo`` follow TRL 1.16's ``trl.experimental``
``CPOTrainer`` and ``ORPOTrainer`` instead (their ``needs_reference`` is False: see :func:`needs_reference`);
their differences are in their docstrings.

LD-DPO (``ld_alpha``, arXiv 2409.06411) is not here: it down-weights the completion tokens beyond the
shorter completion of a pair in the log-probs themselves (policy and reference alike), so it lives in
``dpo_core/logps.py``, and the log-probs passed here already include it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import ConfigError


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


@register("sigmoid", f_divergence=True)
def sigmoid_loss(x: LossInputs) -> Tensor:
    """DPO, arXiv 2305.18290 Eq. 7, with conservative-DPO (cDPO, Mitchell 2023) label smoothing, ``(B,)``.

    ``-(1 - ls) log sigma(beta d) - ls log sigma(-beta d)``, ``d = delta_score``, as in the original DPO
    repo's ``preference_loss``. TRL 1.16 ignores ``label_smoothing`` here; at 0 the two are identical.
    """
    return _smoothed_logistic(x.beta * x.delta_score, x.label_smoothing)


@register("hinge", f_divergence=True)
def hinge_loss(x: LossInputs) -> Tensor:
    """SLiC-HF calibration loss, arXiv 2305.10425 Sec. 2, on reference-normalised scores (as in RSO,
    arXiv 2309.06657): ``relu(1 - beta d)``, i.e. margin ``1/beta`` on ``d = delta_score``, ``(B,)``.
    """
    return torch.relu(1 - x.beta * x.delta_score)


@register("ipo", requires=("chosen_lengths", "rejected_lengths"), f_divergence=True)
def ipo_loss(x: LossInputs) -> Tensor:
    """IPO, arXiv 2310.12036 Eq. 17 (beta is tau): ``(h - 1/(2 beta))^2``, ``(B,)``, where ``h`` is the
    margin of per-token averaged scores (TRL's normalisation, confirmed with the IPO authors).
    """
    h = _per_token(x.chosen_scores, x.chosen_lengths) - _per_token(x.rejected_scores, x.rejected_lengths)
    return (h - 1 / (2 * x.beta)) ** 2


@register("exo_pair", f_divergence=True)
def exo_pair_loss(x: LossInputs) -> Tensor:
    """EXO-pref, arXiv 2402.00856 Eq. 16 with K = 2: ``KL(q || p)``, ``(B,)``, with ``q = softmax(beta *
    scores)`` over {chosen, rejected} and ``p = [1 - eps, eps]``, ``eps = label_smoothing`` in (0, 1).
    TRL computes ``log(eps)`` in float32; we use double precision.
    """
    z = x.beta * x.delta_score
    eps = x.label_smoothing
    chosen_term = torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps))
    rejected_term = torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(eps))
    return chosen_term + rejected_term


@register("nca_pair")
def nca_pair_loss(x: LossInputs) -> Tensor:
    """Pairwise NCA, arXiv 2402.05369 Sec. 4.1, on rewards ``r = beta * logratio``, ``(B,)``:
    ``-log sigma(r_c) - 0.5 log sigma(-r_c) - 0.5 log sigma(-r_r)``.
    """
    chosen, rejected = x.beta * x.chosen_logratios, x.beta * x.rejected_logratios
    return -F.logsigmoid(chosen) - 0.5 * F.logsigmoid(-chosen) - 0.5 * F.logsigmoid(-rejected)


@register("robust", f_divergence=True)
def robust_loss(x: LossInputs) -> Tensor:
    """Robust DPO, arXiv 2403.00409 Sec. 3.1, ``(B,)``: ``(-(1 - ls) log sigma(beta d) + ls log sigma(-beta d))
    / (1 - 2 ls)``, unbiased under label flips with rate ``ls`` in [0, 0.5) (TRL only warns outside it).
    """
    z, ls = x.beta * x.delta_score, x.label_smoothing
    return (-(1 - ls) * F.logsigmoid(z) + ls * F.logsigmoid(-z)) / (1 - 2 * ls)


@register("bco_pair")
def bco_pair_loss(x: LossInputs) -> Tensor:
    """Paired BCO, arXiv 2404.04656 Sec. 4, without its running reward shift (as in TRL), ``(B,)``:
    ``-log sigma(beta r_c) - log sigma(-beta r_r)`` on the log-ratios.
    """
    return -F.logsigmoid(x.beta * x.chosen_logratios) - F.logsigmoid(-x.beta * x.rejected_logratios)


@register("sppo_hard")
def sppo_hard_loss(x: LossInputs) -> Tensor:
    """SPPO, arXiv 2405.00675 Eq. 4.7 with hard probabilities (P = 1 winner, 0 loser), ``(B,)``:
    ``(r_c - 1/(2 beta))^2 + (r_r + 1/(2 beta))^2`` on the log-ratios.
    """
    return (x.chosen_logratios - 0.5 / x.beta) ** 2 + (x.rejected_logratios + 0.5 / x.beta) ** 2


@register("aot", wpo=False)
def aot_loss(x: LossInputs) -> Tensor:
    """AOT (paired), arXiv 2406.05882 Sec. 3, ``(B,)``: the label-smoothed logistic loss of ``beta * delta``,
    ``delta_i = sort(pi_c - pi_r)_i - sort(ref_c - ref_r)_i``. Entry ``i`` is the i-th quantile, not pair
    ``i``: only the batch mean is meaningful (hence no WPO).
    """
    policy_margins, _ = torch.sort(x.policy_chosen_logps - x.policy_rejected_logps, dim=0)
    ref_margins, _ = torch.sort(x.ref_chosen_logps - x.ref_rejected_logps, dim=0)
    return _smoothed_logistic(x.beta * (policy_margins - ref_margins), x.label_smoothing)


@register("aot_unpaired", wpo=False)
def aot_unpaired_loss(x: LossInputs) -> Tensor:
    """AOT (unpaired), arXiv 2406.05882 Sec. 3: ``aot`` with ``delta_i = sort(r_c)_i - sort(r_r)_i``, ``(B,)``."""
    chosen, _ = torch.sort(x.chosen_logratios, dim=0)
    rejected, _ = torch.sort(x.rejected_logratios, dim=0)
    return _smoothed_logistic(x.beta * (chosen - rejected), x.label_smoothing)


@register("apo_zero")
def apo_zero_loss(x: LossInputs) -> Tensor:
    """APO-zero, arXiv 2408.06266 Eq. 7: ``1 - sigma(beta r_c) + sigma(beta r_r)``, ``(B,)``. For chosen
    answers better than the model's own: raise chosen, lower rejected likelihood.
    """
    return 1 - torch.sigmoid(x.beta * x.chosen_logratios) + torch.sigmoid(x.beta * x.rejected_logratios)


@register("apo_down")
def apo_down_loss(x: LossInputs) -> Tensor:
    """APO-down, arXiv 2408.06266 Eq. 8: ``sigma(beta r_c) + 1 - sigma(beta (r_c - r_r))``, ``(B,)``. For
    chosen answers worse than the model's own: lower both, the rejected one more.
    """
    chosen = x.beta * x.chosen_logratios
    return torch.sigmoid(chosen) + 1 - torch.sigmoid(chosen - x.beta * x.rejected_logratios)


@register("discopop", f_divergence=True)
def discopop_loss(x: LossInputs) -> Tensor:
    """DiscoPOP (log-ratio modulated loss), arXiv 2406.08414 Eq. 5, ``(B,)``: with ``z = beta d`` and
    ``m = sigma(z / tau)``, ``(1 - m) * (-log sigma(z)) + m * exp(-z)``.
    """
    z = x.beta * x.delta_score
    modulation = torch.sigmoid(z / x.discopop_tau)
    return -F.logsigmoid(z) * (1 - modulation) + torch.exp(-z) * modulation


@register("sft", requires=("chosen_nll", "chosen_lengths"), f_divergence=True)
def sft_loss(x: LossInputs) -> Tensor:
    """NLL of the chosen completions, the SFT term of RPO (arXiv 2404.19733 Sec. 2) and MPO (2411.10442).

    Token-averaged over the batch like TRL, ``sum(chosen_nll) / sum(chosen_lengths)``, repeated as ``(B,)``.
    TRL gives nan for a batch without chosen tokens; we divide by at least 1.
    """
    return _batch_nll(x)


@register("sigmoid_norm", requires=("chosen_lengths", "rejected_lengths"), f_divergence=True)
def sigmoid_norm_loss(x: LossInputs) -> Tensor:
    """Length-normalised DPO: DPO (arXiv 2305.18290 Eq. 7) on per-token averaged scores, the averaging of
    SimPO's reward (arXiv 2405.14734 Sec. 2) but keeping the reference: ``-log sigma(beta (s_c/|y_c| -
    s_r/|y_r|))``, ``(B,)``.
    """
    margin = _per_token(x.chosen_scores, x.chosen_lengths) - _per_token(x.rejected_scores, x.rejected_lengths)
    return -F.logsigmoid(x.beta * margin)


# ---------------------------------------------------------------------------------------------------------
# Reference-free relatives (TRL 1.16 ``trl.experimental.cpo`` / ``trl.experimental.orpo``): functions of the
# policy log-probs alone. Their NLL term, like ``sft``'s, is TRL's token mean over the batch's chosen completion
# tokens, ``sum(chosen_nll) / sum(chosen_lengths)``, repeated as a (B,) vector: its mean is TRL's number and its
# gradient TRL's gradient (a per-pair split ``chosen_nll * B / sum(chosen_lengths)`` has the same mean; the
# repeated form keeps one convention with ``sft``).


def _batch_nll(x: LossInputs) -> Tensor:
    """TRL's ``nll_loss``: cross-entropy mean over all chosen completion tokens of the batch, as ``(B,)``.

    TRL gives nan for a batch without chosen tokens; we divide by at least 1. A materialised tensor, not an
    ``expand()`` view (WPO multiplies it).
    """
    return (x.chosen_nll.sum() / x.chosen_lengths.sum().clamp(min=1)) * torch.ones_like(x.chosen_nll)


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


# ---------------------------------------------------------------------------------------------------------


def _validate(loss_types: list[str], weights: list[float], tensors: dict[str, Tensor | None], beta: float,
              label_smoothing: float, f_divergence_type: str, simpo_gamma: float, cpo_alpha: float) -> None:
    """Raise ``ValueError`` for any combination TRL rejects, or that would give nan or a wrong shape."""
    if not loss_types or len(weights) != len(loss_types):
        raise ConfigError(f"loss_weights has {len(weights)} entries for {len(loss_types)} loss types {loss_types}; "
                         "give at least one loss_type and one weight per loss_type")
    if f_divergence_type not in F_DIVERGENCES:
        raise ConfigError(f"unknown f_divergence_type {f_divergence_type!r}; valid: {sorted(F_DIVERGENCES)}")
    if beta <= 0:
        raise ConfigError(f"beta must be > 0, got {beta}")
    use_wpo = tensors["chosen_wpo_log_weights"] is not None or tensors["rejected_wpo_log_weights"] is not None
    for name in loss_types:
        if name not in LOSSES:
            raise ConfigError(f"unknown loss_type {name!r}; valid: {sorted(LOSSES)}")
        spec = _SPECS[name]
        missing = [arg for arg in spec.requires if tensors[arg] is None]
        if missing:
            raise ConfigError(f"loss_type {name!r} needs {', '.join(missing)}")
        if f_divergence_type != "reverse_kl" and not spec.f_divergence:
            raise ConfigError(f"loss_type {name!r} does not support f_divergence_type {f_divergence_type!r}; "
                             f"only {sorted(n for n, s in _SPECS.items() if s.f_divergence)} do")
        if use_wpo and not spec.wpo:
            raise ConfigError(f"WPO weights are not supported for loss_type {name!r}: it sorts the batch")
    if "robust" in loss_types and not 0.0 <= label_smoothing < 0.5:
        raise ConfigError(f"'robust' needs label_smoothing (the flip rate) in [0, 0.5), got {label_smoothing}")
    if "exo_pair" in loss_types and not 0.0 < label_smoothing < 1.0:
        # log(eps) and log(1 - eps) must be finite; the EXO paper recommends eps = 1e-3.
        raise ConfigError(f"'exo_pair' needs label_smoothing (epsilon) in (0, 1), got {label_smoothing}; try 1e-3")
    if cpo_alpha < 0:
        raise ConfigError(f"cpo_alpha (the weight of the chosen NLL) must be >= 0, got {cpo_alpha}")
    if simpo_gamma < 0:
        raise ConfigError(f"simpo_gamma (SimPO's target reward margin) must be >= 0, got {simpo_gamma}")
    if tensors["ref_chosen_logps"] is None or tensors["ref_rejected_logps"] is None:
        raise ValueError("ref_chosen_logps and ref_rejected_logps are required unless reference_free=True")
    if use_wpo and (tensors["chosen_wpo_log_weights"] is None or tensors["rejected_wpo_log_weights"] is None):
        raise ValueError("WPO needs both chosen_wpo_log_weights and rejected_wpo_log_weights")
    shape = tensors["policy_chosen_logps"].shape
    for arg, value in tensors.items():
        if value is not None and (value.dim() != 1 or value.shape != shape):
            raise ValueError(f"{arg} has shape {tuple(value.shape)}; every input must be (B,) with the same B")


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    *,
    loss_type: str | Sequence[str] = "sigmoid",
    loss_weights: Sequence[float] | None = None,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    reference_free: bool = False,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    discopop_tau: float = 0.05,
    simpo_gamma: float = 0.5,
    cpo_alpha: float = 1.0,
    alphapo_alpha: float = 0.0,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    chosen_nll: Tensor | None = None,
    chosen_wpo_log_weights: Tensor | None = None,
    rejected_wpo_log_weights: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair preference loss: ``sum_k w_k * LOSSES[loss_type[k]]``, plus the implicit rewards.

    Args:
        policy_chosen_logps, policy_rejected_logps: ``(B,)`` summed completion log-probs of the policy.
        ref_chosen_logps, ref_rejected_logps: ``(B,)`` the same under the reference (ignored, may be None,
            when ``reference_free`` or when no loss needs one (:func:`needs_reference`): they are then zero).
        loss_type: a name in ``LOSSES`` or a list of them; ``loss_weights`` (default all 1.0) weights each.
        beta: inverse temperature (IPO's tau); label_smoothing: cDPO/rDPO flip rate, EXO's epsilon.
        f_divergence_type, f_alpha_divergence_coef: f-DPO regulariser, see ``F_DIVERGENCES``.
        discopop_tau: DiscoPOP temperature.
        simpo_gamma: SimPO's target margin; cpo_alpha: weight of the chosen NLL in ``cpo``/``simpo`` (TRL's
            ``CPOConfig``); alphapo_alpha: AlphaPO's reward shape for ``simpo``/``cpo`` (0: log-prob reward).
        chosen_lengths, rejected_lengths: ``(B,)`` completion token counts (``ipo``, ``sigmoid_norm``, ``sft``,
            ``simpo``, ``cpo``, ``orpo``).
        chosen_nll: ``(B,)`` ``-sum log p`` over the chosen completion tokens (``sft``, ``simpo``, ``cpo``,
            ``orpo``).
        chosen_wpo_log_weights, rejected_wpo_log_weights: ``(B,)`` WPO log-weights (arXiv 2406.11827
            Eq. 2), the per-sequence mean of ``log p_t - logsumexp_v(2 log p_v)`` over completion tokens;
            when given, every loss is multiplied by ``exp(chosen + rejected)``, detached.

    Returns:
        ``(losses, chosen_rewards, rejected_rewards)``, each ``(B,)``; ``losses.mean()`` is TRL's loss and
        the rewards ``beta * (policy - reference)`` are detached. When no loss needs the reference, the
        rewards are those TRL logs for the first loss (e.g. ``beta * mean token log-prob`` for ``simpo``).
    """
    loss_types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    weights = [1.0] * len(loss_types) if loss_weights is None else list(loss_weights)
    if reference_free or not needs_reference(loss_types):
        ref_chosen_logps = torch.zeros_like(policy_chosen_logps)
        ref_rejected_logps = torch.zeros_like(policy_rejected_logps)
    tensors = dict(
        policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps,
        ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps,
        chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths, chosen_nll=chosen_nll,
        chosen_wpo_log_weights=chosen_wpo_log_weights, rejected_wpo_log_weights=rejected_wpo_log_weights,
    )
    _validate(loss_types, weights, tensors, beta, label_smoothing, f_divergence_type, simpo_gamma, cpo_alpha)

    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    f_prime = F_DIVERGENCES[f_divergence_type]
    inputs = LossInputs(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
        chosen_logratios, rejected_logratios,
        chosen_scores=f_prime(chosen_logratios, f_alpha_divergence_coef),
        rejected_scores=f_prime(rejected_logratios, f_alpha_divergence_coef),
        beta=beta, label_smoothing=label_smoothing, discopop_tau=discopop_tau,
        chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths, chosen_nll=chosen_nll,
        simpo_gamma=simpo_gamma, cpo_alpha=cpo_alpha, alphapo_alpha=alphapo_alpha,
    )
    wpo = 1.0
    if chosen_wpo_log_weights is not None:  # exp(c) * exp(r) in TRL, computed under no_grad
        wpo = torch.exp(chosen_wpo_log_weights + rejected_wpo_log_weights).detach()
    losses = sum(weight * LOSSES[name](inputs) * wpo for name, weight in zip(loss_types, weights))
    if needs_reference(loss_types):
        chosen_rewards = beta * chosen_logratios.detach()
        rejected_rewards = beta * rejected_logratios.detach()
    else:
        chosen_rewards, rejected_rewards = _SPECS[loss_types[0]].rewards(inputs)
    return losses, chosen_rewards, rejected_rewards


def preference_metrics(chosen_rewards: Tensor, rejected_rewards: Tensor,
                       tie_tolerance: Tensor | float = 0.0) -> dict[str, Tensor]:
    """Per-pair ``(B,)`` reward metrics under TRL's tag names; gather, then average, in the training loop.

    A margin within `tie_tolerance` (a scalar or ``(B,)``) is a tie: `rewards/accuracies` counts wins
    beyond it (with 0, TRL's strict ``chosen > rejected``), `rewards/ties` the ties and
    `rewards/accuracies_ties_half` counts ties as half (0.5 when policy == reference).
    """
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    margins = chosen_rewards - rejected_rewards
    ties = (margins.abs() <= tie_tolerance).to(margins.dtype)
    wins = (margins > tie_tolerance).to(margins.dtype)
    return {
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/accuracies": wins,
        "rewards/margins": margins,
        "rewards/ties": ties,
        "rewards/accuracies_ties_half": wins + 0.5 * ties,
    }


TIE_RTOL = 1e-5


def tie_tolerance(chosen_logps, rejected_logps, beta: float):
    """Reward margins this small are ties, not wins or losses.

    With policy == reference the margin is 0 up to the float32 noise of differently batched forwards
    (the cache is computed in other batches than training), ~1e-7 of the log-probs compared; TRL's
    strict accuracy then reports the sign of that noise. Returns `(B,)`.
    """
    return TIE_RTOL * beta * (chosen_logps.detach().abs() + rejected_logps.detach().abs()).float()
