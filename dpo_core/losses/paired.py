"""The DPO family: every loss of TRL 1.16's `DPOTrainer`, each a pure function of the policy and reference
log-ratios (`LossInputs`), registered under TRL's name. Formulas follow `DPOTrainer._compute_loss`; deliberate
differences are in the package docstring (`dpo_core.losses`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .registry import LossInputs, _batch_nll, _per_token, _smoothed_logistic, register


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
