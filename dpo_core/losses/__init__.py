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

from .combine import TIE_RTOL, dpo_loss, preference_metrics, tie_tolerance
from .reference_free import orpo_metrics
from .registry import F_DIVERGENCES, LOSSES, LossInputs, needs_reference, register
from .unpaired import UNPAIRED_LOSSES, kl_point, kto_loss, register_unpaired, uses_kl

__all__ = ["F_DIVERGENCES", "LOSSES", "TIE_RTOL", "UNPAIRED_LOSSES", "LossInputs", "dpo_loss", "kl_point", "kto_loss",
           "needs_reference", "orpo_metrics", "preference_metrics", "register", "register_unpaired", "tie_tolerance",
           "uses_kl"]
