"""KTO and APO-zero-unpaired (dpo_core/losses/unpaired.py) against TRL 1.16's `KTOTrainer._compute_loss` itself
(a test-only oracle, called with the attributes it reads and a model stand-in returning given log-probs): the
loss, the KL point and the logged rewards, float64, 1e-6, on random, extreme and one-sided batches."""

import types
from collections import defaultdict

import pytest
import torch

from dpo_core.losses.unpaired import UNPAIRED_LOSSES, kl_point, kto_loss

trl_kto = pytest.importorskip("trl.trainer.kto_trainer")


def trl_compute_loss(policy, ref, policy_kl, ref_kl, labels, *, loss_type, beta, desirable_weight=1.0,
                     undesirable_weight=1.0):
    """TRL's `_compute_loss` with precomputed reference log-probs: (loss, its logged metrics)."""
    b, t = len(labels), 4
    log_probs = torch.zeros(b, t - 1, dtype=torch.float64)
    log_probs[:, 0] = policy  # the model's per-token log-probs; TRL sums them over the sequence
    outputs = types.SimpleNamespace(log_probs=log_probs, entropy=torch.zeros(b, t - 1, dtype=torch.float64),
                                    mean_logits=torch.zeros(b, t - 1, dtype=torch.float64))
    calculate_kl = loss_type == "kto"
    fake = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True),
        accelerator=types.SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x),
        precompute_ref_logps=True, calculate_KL=calculate_kl, loss_type=loss_type, beta=beta,
        desirable_weight=desirable_weight, undesirable_weight=undesirable_weight, aux_loss_enabled=False,
        _metrics={"train": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
        _compute_kl_logps=lambda model, batch: policy_kl if calculate_kl else None)
    ones = torch.ones(b, t, dtype=torch.long)
    batch = {"input_ids": torch.zeros(b, t, dtype=torch.long), "attention_mask": ones, "completion_mask": ones,
             "label": labels, "ref_logps": ref, "ref_KL_logps": ref_kl if calculate_kl else None}
    loss = trl_kto.KTOTrainer._compute_loss(fake, lambda **kwargs: outputs, batch, return_outputs=False)
    return loss, {k: v[-1] for k, v in fake._metrics["train"].items()}


def batches():
    g = torch.Generator().manual_seed(0)
    for b, scale in ((8, 5.0), (5, 80.0), (6, 1e-3)):
        policy, ref, pkl, rkl = (-scale * torch.rand(b, generator=g, dtype=torch.float64) for _ in range(4))
        labels = torch.rand(b, generator=g) < 0.5
        labels[0], labels[-1] = True, False
        yield policy, ref, pkl, rkl, labels
    policy = torch.tensor([-1e4, -0.0, -350.0, -2.0], dtype=torch.float64)  # extreme and empty completions
    yield policy, policy.flip(0), policy.roll(1), torch.zeros(4, dtype=torch.float64), torch.tensor([1, 0, 1, 0]).bool()
    yield policy, policy + 3, policy.roll(1), policy, torch.ones(4, dtype=torch.bool)  # only desirable ones
    yield policy, policy - 3, policy - 1, policy, torch.zeros(4, dtype=torch.bool)  # only undesirable ones


@pytest.mark.parametrize("loss_type", sorted(UNPAIRED_LOSSES))
@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.33, 0.5)])
def test_losses_equal_trl_compute_loss(loss_type, weights):
    beta = 0.1 if loss_type == "kto" else 0.3
    for policy, ref, pkl, rkl, labels in batches():
        want, metrics = trl_compute_loss(policy, ref, pkl, rkl, labels, loss_type=loss_type, beta=beta,
                                         desirable_weight=weights[0], undesirable_weight=weights[1])
        kl = kl_point(pkl, rkl) if loss_type == "kto" else None
        losses, rewards = kto_loss(policy, ref, labels, loss_type=loss_type, beta=beta, kl=kl,
                                   desirable_weight=weights[0], undesirable_weight=weights[1])
        assert losses.dtype == torch.float64
        torch.testing.assert_close(losses.mean(), want, atol=1e-6, rtol=1e-6)
        if loss_type == "kto":
            assert kl.item() == pytest.approx(metrics["kl"], abs=1e-6)
        for key, subset in (("rewards/chosen", labels), ("rewards/rejected", ~labels)):
            if subset.any():
                assert rewards[subset].mean().item() == pytest.approx(metrics[key], abs=1e-6), key
            else:
                assert key not in metrics


def test_kl_point_is_averaged_over_processes_clamped_and_detached():
    policy_kl = torch.tensor([-1.0, -3.0], requires_grad=True)
    ref_kl = torch.tensor([-2.0, -2.5])
    kl = kl_point(policy_kl, ref_kl)
    assert kl.item() == pytest.approx(0.25) and not kl.requires_grad
    assert kl_point(policy_kl, ref_kl, reduce_mean=lambda x: (x + torch.tensor(-1.0)) / 2).item() == 0.0  # clamped
    with pytest.raises(ValueError, match="needs the KL point"):
        kto_loss(policy_kl, ref_kl, torch.tensor([True, False]), loss_type="kto")
