"""The KTO step (`--loss_type kto` or `apo_zero_unpaired` in scripts/dpo.py): one code path with DPO.

Everything but the step is DPO's (`dpo_core.dpo.setup_dpo`): data through `dpo_core.kto_data.KTOTokenize`, whose
examples are (prompt, completion, KL completion) "pairs", so every batch layout, the reference cache (it then
holds the KL completions' log-probs too), the online reference, LoRA (adapter-disabled reference), checkpoints
and trackers apply unchanged. The step reads the label of each example from its id (`kto_labels`).

Logged (TRL's names): `loss`, `kl` (the KL point), `rewards/chosen` / `rewards/rejected` and `logps/chosen` /
`logps/rejected` over the desirable / undesirable examples, and `accuracy/desirable` / `accuracy/undesirable`:
the share of desirable completions whose log-ratio is above the KL point, of undesirable ones below it (the
evaluation metric of unpaired data).
"""

from __future__ import annotations

import contextlib
import math

import torch

from .kto_data import kto_labels
from .losses import kl_point, kto_loss, tie_tolerance, uses_kl
from .report import margin_summary


def make_kto_step(dpo_args, *, forward, ref_model=None, ref_context=contextlib.nullcontext, reduce_mean=None):
    """`(model, batch) -> (mean loss, stats)` for an unpaired loss; the reference from the batch (cache) or
    `ref_model` (inside `ref_context()`). `reduce_mean(tensor)`: the mean over the processes of the KL point
    (`accelerator.reduce(..., reduction="mean")`, TRL's `gather_for_metrics(kl).mean()`); None: one process."""
    loss_type = dpo_args.unpaired_loss()

    def step(model, batch):
        out = forward(model, batch)  # chosen_*: the completions; rejected_*: the KL completions
        if "ref_chosen_logps" in batch:
            ref_logps, ref_kl_logps = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        else:
            with torch.no_grad(), ref_context():
                ref = forward(ref_model, batch)
            ref_logps, ref_kl_logps = ref.chosen_logps, ref.rejected_logps
        labels = kto_labels(batch["ids"]).to(out.chosen_logps.device)
        kl = kl_point(out.rejected_logps, ref_kl_logps, reduce_mean) if uses_kl(loss_type) else None
        losses, rewards = kto_loss(out.chosen_logps, ref_logps, labels, loss_type=loss_type, beta=dpo_args.beta,
                                   kl=kl, desirable_weight=dpo_args.desirable_weight,
                                   undesirable_weight=dpo_args.undesirable_weight)
        point = torch.zeros((), device=rewards.device) if kl is None else kl
        logratios, logps = rewards / dpo_args.beta, out.chosen_logps.detach()
        stats = {"loss": losses.detach(), "kl": point.detach().reshape(1),
                 "rewards/chosen": (rewards, labels), "rewards/rejected": (rewards, ~labels),
                 "logps/chosen": (logps, labels), "logps/rejected": (logps, ~labels),
                 "accuracy/desirable": ((logratios > point).float(), labels),
                 "accuracy/undesirable": ((logratios < point).float(), ~labels)}
        return losses.mean(), stats

    return step


def kto_metrics(scores: dict[str, torch.Tensor], beta: float) -> tuple[dict, torch.Tensor]:
    """Held-out metrics of unpaired examples (scripts/evaluate.py) from `evaluate.score_pairs`'s output, whose
    "chosen" rows are the completions and "rejected" rows their KL completions.

    The KL point is the training step's estimate over the whole split: `max(0, mean(log pi - log ref))` of the
    mismatched (prompt, KL completion) rows. An example is on the right side when its log-ratio is above the KL
    point (desirable) or below it (undesirable); its signed margin `beta * (log-ratio - KL point)`, negated for
    undesirable examples, is positive then. Margins within `tie_tolerance` of the two log-probs are ties.

    Returns:
        (metrics, the `(N,)` float64 signed margins): `accuracy` (all examples), `accuracy/desirable`,
        `accuracy/undesirable`, ties, `kl_point`, rewards and log-probs per label, perplexity and token-level KL
        over every completion.
    """
    s = {k: v.double() for k, v in scores.items()}
    labels = kto_labels(scores["ids"])
    logratios = s["chosen_logps"] - s["ref_chosen_logps"]
    point = torch.clamp((s["rejected_logps"] - s["ref_rejected_logps"]).mean(), min=0)
    margins = beta * (logratios - point) * torch.where(labels, 1.0, -1.0).double()
    ties = margins.abs() <= tie_tolerance(s["chosen_logps"], s["ref_chosen_logps"], beta).double()
    right = (margins > 0) & ~ties
    tokens = s["chosen_tokens"].sum().item()

    def share(values, where):
        return values[where].double().mean().item() if bool(where.any()) else None

    metrics = {
        "accuracy": right.double().mean().item(), "ties": ties.double().mean().item(),
        "accuracy_ties_half": (right.double() + 0.5 * ties.double()).mean().item(),
        "accuracy/desirable": share(right, labels), "accuracy/undesirable": share(right, ~labels),
        "kl_point": point.item(),
        "reward_margin": margin_summary(margins),
        "rewards/desirable": share(beta * logratios, labels), "rewards/undesirable": share(beta * logratios, ~labels),
        "logps/desirable": share(s["chosen_logps"], labels), "logps/undesirable": share(s["chosen_logps"], ~labels),
        "perplexity": math.exp(s["chosen_nll"].sum().item() / tokens),
        "kl_token_level": s["kl_sum"].sum().item() / tokens,
        "num_examples": len(margins), "num_desirable": int(labels.sum().item()), "num_completion_tokens": int(tokens),
    }
    return metrics, margins
