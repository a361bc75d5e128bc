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

import torch

from .kto_data import kto_labels
from .losses import kl_point, kto_loss, uses_kl


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
