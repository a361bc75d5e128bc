"""`dpo_loss`: the registered losses a run asks for, validated, weighted and summed over one batch; the
preference metrics and the tie tolerance of reward margins.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..errors import ConfigError
from . import paired as _paired  # noqa: F401  (importing a family registers its losses)
from . import reference_free as _reference_free  # noqa: F401
from .registry import _SPECS, F_DIVERGENCES, LOSSES, LossInputs, needs_reference


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
