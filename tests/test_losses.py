"""Tests for dpo_core/losses/.

Two kinds of evidence: (1) the same per-token batch fed to TRL 1.16's real ``DPOTrainer._compute_loss``
(float64, skipped without trl) and (2) expectations derived by hand or by a naive scalar loop.
"""

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from dpo_core.config import DPOArguments
from dpo_core.errors import ConfigError
from dpo_core.losses import (
    F_DIVERGENCES,
    LOSSES,
    LossInputs,
    dpo_loss,
    needs_reference,
    orpo_metrics,
    preference_metrics,
)

TRL_LOSSES = ["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"]
F_DIVERGENCE_LOSSES = ["sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"]
SORTING_LOSSES = ["aot", "aot_unpaired"]
REFERENCE_FREE_LOSSES = ["simpo", "cpo", "orpo"]  # TRL's experimental CPOTrainer / ORPOTrainer
B, T, V = 5, 10, 11


def test_registry_holds_exactly_trls_losses():
    assert sorted(LOSSES) == sorted(TRL_LOSSES + REFERENCE_FREE_LOSSES)
    assert sorted(F_DIVERGENCES) == ["alpha_divergence", "forward_kl", "js_divergence", "reverse_kl"]


# ---------------------------------------------------------------------------------------------------------
# Cross-check against TRL: one per-token batch, TRL reads it through a fake model, we read per-sequence sums.


def make_batch(seed: int = 0, dtype: torch.dtype = torch.float64, empty: bool = True) -> SimpleNamespace:
    """Random ``[2B, T]`` batch (chosen rows first) with prompt/completion/padding and a real softmax."""
    g = torch.Generator().manual_seed(seed)
    pos = torch.arange(T)
    prompt_len = torch.randint(1, 4, (2 * B, 1), generator=g)  # >= 1, so completion_mask[:, 0] == 0
    completion_len = torch.randint(1, T - 3, (2 * B, 1), generator=g)
    if empty:  # empty chosen and rejected completions exercise the clamp(min=1) on lengths
        completion_len[[1, B]] = 0
    completion_mask = ((pos >= prompt_len) & (pos < prompt_len + completion_len)).long()
    input_ids = torch.randint(0, V, (2 * B, T), generator=g)
    logp_vocab = (2 * torch.randn(2 * B, T - 1, V, generator=g, dtype=dtype)).log_softmax(-1)
    shift_mask = completion_mask[:, 1:]
    per_token = logp_vocab.gather(-1, input_ids[:, 1:, None]).squeeze(-1) * shift_mask
    log_sum_sq = torch.logsumexp(2 * logp_vocab, dim=-1)
    sums = per_token.sum(1)
    ref = (sums + 1.5 * torch.randn(2 * B, generator=g, dtype=dtype)).chunk(2)
    lengths = shift_mask.sum(1)
    assert torch.equal(lengths, completion_mask.sum(1))  # TRL uses both masks for lengths; keep them equal
    wpo = ((per_token - log_sum_sq) * shift_mask).sum(1) / lengths.clamp(min=1)
    return SimpleNamespace(
        input_ids=input_ids, attention_mask=(pos < prompt_len + completion_len).long(),
        completion_mask=completion_mask, per_token=per_token, log_sum_sq=log_sum_sq, logp_vocab=logp_vocab,
        # our per-sequence inputs, derived from the same per-token tensors
        policy=sums.chunk(2), ref=ref, lengths=lengths.chunk(2), chosen_nll=-per_token[:B].sum(1),
        wpo=wpo.chunk(2),
    )


def trl_loss(batch, *, loss_type, loss_weights=None, beta=0.1, label_smoothing=0.0, f_divergence_type="reverse_kl",
             f_alpha_divergence_coef=0.5, discopop_tau=0.05, wpo=False) -> torch.Tensor:
    """TRL 1.16's scalar loss from the unbound ``DPOTrainer._compute_loss`` with a fake trainer and model."""
    dpo_trainer = pytest.importorskip("trl.trainer.dpo_trainer")
    identity = lambda x: x  # noqa: E731
    fake_self = SimpleNamespace(
        beta=beta, loss_types=list(loss_type), loss_weights=loss_weights or [1.0] * len(loss_type),
        label_smoothing=label_smoothing, f_divergence_type=f_divergence_type,
        f_alpha_divergence_coef=f_alpha_divergence_coef, ld_alpha=None, use_weighting=wpo,
        precompute_ref_logps=True, aux_loss_enabled=False, model=SimpleNamespace(training=True),
        args=SimpleNamespace(discopop_tau=discopop_tau),
        accelerator=SimpleNamespace(device=torch.device("cpu"), gather=identity, gather_for_metrics=identity),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _tp_size=1, _total_train_tokens=0,
    )
    shape = batch.per_token.shape

    def fake_model(**kwargs):
        return SimpleNamespace(log_probs=batch.per_token, entropy=torch.rand(shape), mean_logits=torch.randn(shape),
                               is_top1=torch.rand(shape) > 0.5, log_sum_sq_probs=batch.log_sum_sq)

    inputs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                  completion_mask=batch.completion_mask, ref_chosen_logps=batch.ref[0], ref_rejected_logps=batch.ref[1])
    return dpo_trainer.DPOTrainer._compute_loss(fake_self, fake_model, inputs, False)


def our_loss(batch, *, wpo=False, **kwargs):
    return dpo_loss(*batch.policy, *batch.ref, chosen_lengths=batch.lengths[0], rejected_lengths=batch.lengths[1],
                    chosen_nll=batch.chosen_nll, chosen_wpo_log_weights=batch.wpo[0] if wpo else None,
                    rejected_wpo_log_weights=batch.wpo[1] if wpo else None, **kwargs)


def _case(loss_type, **kwargs):
    loss_type = [loss_type] if isinstance(loss_type, str) else loss_type
    if "exo_pair" in loss_type:
        kwargs.setdefault("label_smoothing", 0.1)  # exo_pair needs epsilon > 0
    name = "+".join(loss_type) + "".join(f"-{k}={v}" for k, v in kwargs.items())
    return pytest.param(dict(loss_type=loss_type, **kwargs), id=name)


TRL_CASES = (
    [_case(name) for name in TRL_LOSSES]
    + [_case(name, f_divergence_type=f) for name in F_DIVERGENCE_LOSSES for f in ("forward_kl", "js_divergence")]
    + [_case(name, f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1.0) for name in ("sigmoid", "ipo")]
    + [_case("robust", label_smoothing=0.1), _case("robust", label_smoothing=0.3),
       _case("exo_pair", label_smoothing=1e-3), _case("exo_pair", label_smoothing=0.25),
       _case("aot", label_smoothing=0.2), _case("aot_unpaired", label_smoothing=0.2),
       _case("discopop", discopop_tau=0.3), _case("sigmoid", beta=0.7), _case("ipo", beta=0.02)]
    # TRL 1.16 crashes on sft + WPO (in-place multiply of an expanded tensor): tested by hand below
    + [_case(name, wpo=True) for name in TRL_LOSSES if name not in SORTING_LOSSES + ["sft"]]
    + [_case(["sigmoid", "sft"], loss_weights=[1.0, 0.2]),
       _case(["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0]),
       _case(["ipo", "hinge"], loss_weights=[0.5, 2.0], f_divergence_type="js_divergence"),
       _case(["sigmoid", "ipo", "apo_zero"], loss_weights=[1.0, 0.5, 0.1], wpo=True)]
)


@pytest.mark.parametrize("case", TRL_CASES)
def test_matches_trl_float64(case):
    batch = make_batch(seed=1)
    expected = trl_loss(batch, **case)
    losses, _, _ = our_loss(batch, **case)
    assert losses.shape == (B,) and losses.dtype == torch.float64
    # Relative tolerance: WPO weights shrink losses ~100x. TRL builds exo_pair's epsilon as a float32 tensor,
    # so its log(epsilon) is only float32-accurate (observed differences ~5e-8).
    rtol = 1e-6 if "exo_pair" in case["loss_type"] else 1e-10
    torch.testing.assert_close(losses.mean(), expected, rtol=rtol, atol=1e-12)


@pytest.mark.parametrize("coef", [0.5, 2.0, 1.0 + 1e-8])
@pytest.mark.parametrize("name", ["sigmoid", "ipo", "exo_pair", "discopop"])
def test_alpha_divergence_matches_trl_float32(name, coef):
    """TRL's alpha-divergence clamp table has no float64 entry (KeyError), so compare in float32."""
    batch = make_batch(seed=2, dtype=torch.float32)
    batch.ref = tuple(r.float() for r in batch.ref)
    kwargs = dict(loss_type=[name], f_divergence_type="alpha_divergence", f_alpha_divergence_coef=coef,
                  label_smoothing=0.1 if name == "exo_pair" else 0.0)
    losses, _, _ = our_loss(batch, **kwargs)
    assert losses.dtype == torch.float32
    torch.testing.assert_close(losses.mean(), trl_loss(batch, **kwargs), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# Independent expectations.


def _call(loss_type, pc, pr, rc, rr, **kwargs):
    t = lambda v: torch.as_tensor(v, dtype=torch.float64)  # noqa: E731
    kwargs.setdefault("chosen_lengths", torch.ones(len(pc)))
    kwargs.setdefault("rejected_lengths", torch.ones(len(pc)))
    kwargs.setdefault("chosen_nll", -t(pc))
    if loss_type == "exo_pair":
        kwargs.setdefault("label_smoothing", 0.1)
    return dpo_loss(t(pc), t(pr), t(rc), t(rr), loss_type=loss_type, **kwargs)


def _at_reference(beta: float) -> dict[str, float]:
    """Closed forms when policy == reference (every log-ratio and every sorted margin difference is 0, z = 0).

    sigmoid: -log sigma(0) = ln 2, for any cDPO ls: (1-ls) ln 2 + ls ln 2.   hinge: relu(1 - 0) = 1.
    ipo: (0 - 1/(2 beta))^2.   sppo_hard: (1/(2 beta))^2 twice.   nca_pair: (1 + 1/2 + 1/2) ln 2 = 2 ln 2.
    robust: ((1-ls) ln 2 - ls ln 2) / (1 - 2 ls) = ln 2.   bco_pair: 2 ln 2.   aot, aot_unpaired: ln 2.
    exo_pair (eps = 0.1): q = (1/2, 1/2), KL(q || (1-eps, eps)) = -ln 2 - (ln(1-eps) + ln eps) / 2.
    apo_zero: 1 - 1/2 + 1/2 = 1.   apo_down: 1/2 + 1 - 1/2 = 1.   sigmoid_norm: ln 2.
    discopop: m = sigma(0) = 1/2, so (ln 2 + exp(0)) / 2.   sft: sum(nll) / sum(lengths) = (2 + 4) / (1 + 3).
    """
    ln2 = math.log(2)
    return dict(sigmoid=ln2, hinge=1.0, ipo=(1 / (2 * beta)) ** 2, exo_pair=-ln2 - (math.log(0.9) + math.log(0.1)) / 2,
                nca_pair=2 * ln2, robust=ln2, bco_pair=2 * ln2, sppo_hard=2 * (1 / (2 * beta)) ** 2, aot=ln2,
                aot_unpaired=ln2, apo_zero=1.0, apo_down=1.0, discopop=(ln2 + 1) / 2, sft=1.5, sigmoid_norm=ln2)


@pytest.mark.parametrize("name", TRL_LOSSES)
def test_closed_form_at_reference(name):
    beta, ls = 0.2, (0.1 if name in ("exo_pair", "robust", "sigmoid", "aot") else 0.0)
    assert set(_at_reference(beta)) == set(TRL_LOSSES)
    logps = [-3.0, -7.5]
    losses, chosen_rewards, rejected_rewards = _call(
        name, logps, [-4.0, -2.0], logps, [-4.0, -2.0], beta=beta, label_smoothing=ls,
        chosen_lengths=torch.tensor([1, 3]), chosen_nll=torch.tensor([2.0, 4.0], dtype=torch.float64))
    torch.testing.assert_close(losses, torch.full((2,), _at_reference(beta)[name], dtype=torch.float64))
    assert chosen_rewards.abs().max() == 0 and rejected_rewards.abs().max() == 0


def _naive(name: str, pc, pr, rc, rr, lc, lr, beta: float, ls: float) -> float:
    """Scalar re-derivation with math only; log sigma(x) = -log(1 + exp(-x))."""
    logsig = lambda x: -math.log(1 + math.exp(-x))  # noqa: E731
    d = (pc - rc) - (pr - rr)
    if name == "sigmoid":  # cDPO: -(1-ls) log sigma(beta d) - ls log sigma(-beta d)
        return -(1 - ls) * logsig(beta * d) - ls * logsig(-beta * d)
    if name == "hinge":
        return max(0.0, 1 - beta * d)
    if name == "ipo":
        return ((pc - rc) / max(lc, 1) - (pr - rr) / max(lr, 1) - 1 / (2 * beta)) ** 2
    if name == "robust":
        return ((1 - ls) * -logsig(beta * d) + ls * logsig(-beta * d)) / (1 - 2 * ls)
    raise KeyError(name)


@pytest.mark.parametrize("name,ls", [("sigmoid", 0.0), ("sigmoid", 0.15), ("hinge", 0.0), ("ipo", 0.0),
                                     ("robust", 0.0), ("robust", 0.2)])
def test_naive_scalar_loop(name, ls):
    g = torch.Generator().manual_seed(3)
    pc, pr, rc, rr = (-20 * torch.rand(6, generator=g, dtype=torch.float64) for _ in range(4))
    lc, lr = torch.tensor([3, 0, 7, 1, 12, 5]), torch.tensor([4, 2, 0, 9, 1, 5])
    beta = 0.3
    losses, _, _ = dpo_loss(pc, pr, rc, rr, loss_type=name, beta=beta, label_smoothing=ls,
                            chosen_lengths=lc, rejected_lengths=lr)
    expected = [_naive(name, *(float(v[i]) for v in (pc, pr, rc, rr)), int(lc[i]), int(lr[i]), beta, ls)
                for i in range(6)]
    torch.testing.assert_close(losses, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", TRL_LOSSES + REFERENCE_FREE_LOSSES)
def test_gradcheck(name):
    """Analytic vs finite-difference gradients w.r.t. policy logps (and chosen_nll, which sft reads).

    Values are distinct and away from the hinge kink (|1 - beta d| >= 0.2) and from sort ties (aot).
    """
    pc = torch.tensor([-3.1, -7.4, -1.2, -5.5], dtype=torch.float64, requires_grad=True)
    pr = torch.tensor([-4.0, -2.3, -6.6, -5.0], dtype=torch.float64, requires_grad=True)
    nll = torch.tensor([3.1, 7.4, 1.2, 5.5], dtype=torch.float64, requires_grad=True)
    rc = torch.tensor([-2.5, -6.0, -3.3, -4.4], dtype=torch.float64)
    rr = torch.tensor([-3.0, -4.1, -5.2, -6.9], dtype=torch.float64)
    lengths = torch.tensor([2, 5, 1, 3])
    ls = 0.1 if name == "exo_pair" else 0.0

    def fn(pc, pr, nll):
        return dpo_loss(pc, pr, rc, rr, loss_type=name, beta=0.5, label_smoothing=ls, chosen_lengths=lengths,
                        rejected_lengths=lengths, chosen_nll=nll)[0]

    assert torch.autograd.gradcheck(fn, (pc, pr, nll))


def test_rewards_are_detached_and_correct():
    pc = torch.tensor([-1.0, -2.0], requires_grad=True)
    pr = torch.tensor([-3.0, -1.5], requires_grad=True)
    rc, rr = torch.tensor([-1.5, -1.0]), torch.tensor([-2.0, -2.0])
    losses, chosen_rewards, rejected_rewards = dpo_loss(pc, pr, rc, rr, beta=0.5)
    assert losses.requires_grad and not chosen_rewards.requires_grad and not rejected_rewards.requires_grad
    torch.testing.assert_close(chosen_rewards, torch.tensor([0.25, -0.5]))  # 0.5 * (pc - rc)
    torch.testing.assert_close(rejected_rewards, torch.tensor([-0.5, 0.25]))  # 0.5 * (pr - rr)
    metrics = preference_metrics(chosen_rewards, rejected_rewards)
    torch.testing.assert_close(metrics["rewards/accuracies"], torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(metrics["rewards/margins"], torch.tensor([0.75, -0.75]))


def test_wpo_weights_scale_losses_and_get_no_gradient():
    """WPO multiplies each loss by exp(c + r) and is a constant for autograd (TRL computes it under no_grad).

    sft + WPO is checked here by hand because TRL 1.16 raises on that combination.
    """
    pc, pr = torch.tensor([-1.0, -2.0], dtype=torch.float64), torch.tensor([-3.0, -1.5], dtype=torch.float64)
    c = torch.tensor([-0.3, -1.1], dtype=torch.float64, requires_grad=True)
    r = torch.tensor([-0.7, 0.2], dtype=torch.float64, requires_grad=True)
    lengths, nll = torch.tensor([2, 3]), torch.tensor([1.0, 2.0], dtype=torch.float64)
    for name in ("sigmoid", "ipo", "sft"):
        kwargs = dict(loss_type=name, chosen_lengths=lengths, rejected_lengths=lengths, chosen_nll=nll)
        plain, _, _ = dpo_loss(pc, pr, pc + 0.5, pr - 0.5, **kwargs)
        weighted, _, _ = dpo_loss(pc, pr, pc + 0.5, pr - 0.5, chosen_wpo_log_weights=c,
                                  rejected_wpo_log_weights=r, **kwargs)
        torch.testing.assert_close(weighted, plain * torch.exp(c + r).detach())
        assert not weighted.requires_grad
    torch.testing.assert_close(plain, torch.full((2,), 3.0 / 5.0, dtype=torch.float64))  # sft: (1 + 2) / (2 + 3)


def test_reference_free_equals_zero_reference():
    pc, pr = torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-3.0, -1.5, -0.7])
    zeros = torch.zeros(3)
    for name in ("sigmoid", "aot", "apo_down", "nca_pair"):
        free = dpo_loss(pc, pr, None, None, loss_type=name, reference_free=True)
        zero = dpo_loss(pc, pr, zeros, zeros, loss_type=name)
        for a, b in zip(free, zero):
            torch.testing.assert_close(a, b)


def test_weighted_list_equals_sum_of_single_calls():
    g = torch.Generator().manual_seed(4)
    pc, pr, rc, rr = (-10 * torch.rand(5, generator=g, dtype=torch.float64) for _ in range(4))
    extra = dict(chosen_lengths=torch.arange(1, 6), rejected_lengths=torch.arange(5, 0, -1), chosen_nll=-pc)
    names, weights = ["sigmoid", "ipo", "sft", "apo_zero"], [1.0, 0.5, 0.2, 3.0]
    combined, _, _ = dpo_loss(pc, pr, rc, rr, loss_type=names, loss_weights=weights, **extra)
    singles = sum(w * dpo_loss(pc, pr, rc, rr, loss_type=n, **extra)[0] for n, w in zip(names, weights))
    torch.testing.assert_close(combined, singles)
    default, _, _ = dpo_loss(pc, pr, rc, rr, loss_type=["sigmoid", "hinge"])
    torch.testing.assert_close(default, dpo_loss(pc, pr, rc, rr)[0] + dpo_loss(pc, pr, rc, rr, loss_type="hinge")[0])


def test_dtype_is_kept():
    for dtype in (torch.float32, torch.float64):
        x = torch.tensor([-1.0, -2.0], dtype=dtype)
        losses, chosen_rewards, _ = dpo_loss(x, x - 1, x, x, loss_type=["ipo", "sigmoid"],
                                             chosen_lengths=torch.tensor([3, 4]), rejected_lengths=torch.tensor([1, 0]))
        assert losses.dtype == chosen_rewards.dtype == dtype


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_same_numbers_on_cuda():
    cpu = make_batch(seed=5)
    kwargs = dict(loss_type=TRL_LOSSES, label_smoothing=0.1, chosen_lengths=cpu.lengths[0],
                  rejected_lengths=cpu.lengths[1], chosen_nll=cpu.chosen_nll)
    expected, _, _ = dpo_loss(*cpu.policy, *cpu.ref, **kwargs)
    to_cuda = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    losses, chosen_rewards, _ = dpo_loss(*(t.cuda() for t in cpu.policy + cpu.ref), **to_cuda)
    assert losses.device.type == chosen_rewards.device.type == "cuda"
    torch.testing.assert_close(losses.cpu(), expected)


def test_alpha_divergence_float64_limit_and_clamp():
    """TRL has no float64 clamp; ours computes in float64 and clamps the exponent at 700 (finite)."""
    logratios = torch.tensor([-1.0, 0.0, 2.0, 1e4], dtype=torch.float64)
    alpha = F_DIVERGENCES["alpha_divergence"]
    torch.testing.assert_close(alpha(logratios[:3], 0.5), (torch.exp(-0.5 * logratios[:3]) - 1) / -0.5)
    torch.testing.assert_close(alpha(logratios, 1.0), logratios)  # alpha -> 1 falls back to reverse KL
    assert torch.isfinite(alpha(logratios, 2.0)).all()


def test_loss_functions_are_pure_and_read_loss_inputs():
    x = torch.tensor([-1.0, -2.0])
    inputs = LossInputs(x, x, x, x, *(torch.zeros(2),) * 4, beta=0.1, label_smoothing=0.0, discopop_tau=0.05)
    torch.testing.assert_close(LOSSES["sigmoid"](inputs), torch.full((2,), math.log(2)))


@pytest.mark.parametrize("kwargs,match", [
    (dict(loss_type="dpo"), "unknown loss_type 'dpo'.*sigmoid"),
    (dict(loss_type=["sigmoid", "ipo"], loss_weights=[1.0]), "loss_weights has 1 entries for 2"),
    (dict(loss_type=[]), "at least one"),
    (dict(loss_type="ipo"), "'ipo' needs chosen_lengths, rejected_lengths"),
    (dict(loss_type="sigmoid_norm", chosen_lengths=torch.ones(2)), "needs rejected_lengths"),
    (dict(loss_type="sft"), "'sft' needs chosen_nll, chosen_lengths"),
    (dict(loss_type="nca_pair", f_divergence_type="js_divergence"), "'nca_pair'.*'js_divergence'"),
    (dict(f_divergence_type="kl"), "unknown f_divergence_type"),
    (dict(loss_type="aot", chosen_wpo_log_weights=torch.zeros(2), rejected_wpo_log_weights=torch.zeros(2)),
     "WPO.*'aot'"),
    (dict(chosen_wpo_log_weights=torch.zeros(2)), "both chosen_wpo_log_weights and rejected"),
    (dict(loss_type="robust", label_smoothing=0.5), "robust"),
    (dict(loss_type="exo_pair"), "exo_pair"),
    (dict(loss_type="exo_pair", label_smoothing=1.0), "exo_pair"),
    (dict(beta=0.0), "beta"),
    (dict(chosen_lengths=torch.ones(3)), r"chosen_lengths has shape \(3,\)"),
    (dict(chosen_nll=torch.ones(2, 1)), r"chosen_nll has shape \(2, 1\)"),
    (dict(loss_type="cpo", chosen_nll=torch.ones(2), chosen_lengths=torch.ones(2), cpo_alpha=-1.0), "cpo_alpha"),
    (dict(loss_type="simpo", chosen_nll=torch.ones(2), chosen_lengths=torch.ones(2), rejected_lengths=torch.ones(2),
          simpo_gamma=-0.5), "simpo_gamma"),
    (dict(loss_type="orpo", chosen_lengths=torch.ones(2)), "'orpo' needs rejected_lengths, chosen_nll"),
])
def test_errors(kwargs, match):
    x = torch.tensor([-1.0, -2.0])
    with pytest.raises(ValueError, match=match):
        dpo_loss(x, x, x, x, **kwargs)


def test_errors_on_missing_reference_and_bad_rank():
    x = torch.tensor([-1.0, -2.0])
    with pytest.raises(ValueError, match="reference_free"):
        dpo_loss(x, x, None, None)
    with pytest.raises(ValueError, match=r"policy_chosen_logps has shape \(1, 2\)"):
        dpo_loss(x[None], x[None], x[None], x[None])


# ---------------------------------------------------------------------------------------------------------
# Reference-free relatives against TRL 1.16's experimental CPOTrainer (simpo, cpo) and ORPOTrainer (orpo),
# their unbound methods called on a fake trainer and a fake model whose logits are the batch's log-softmax.


def _trl_reference_free(batch, name, *, beta=0.1, label_smoothing=0.0, simpo_gamma=0.5, cpo_alpha=1.0,
                        alphapo_alpha=0.0):
    """TRL's ``(scalar loss, metrics, per-pair losses, chosen_rewards, rejected_rewards)`` for ``name``.

    ORPO's NLL in TRL counts the chosen prompt tokens too (labels from the attention mask): the fake batch's
    attention mask is the completion mask, so TRL's NLL counts exactly the completion tokens ours counts.
    """
    if name == "orpo":
        cls = pytest.importorskip("trl.experimental.orpo.orpo_trainer").ORPOTrainer
    else:
        cls = pytest.importorskip("trl.experimental.cpo.cpo_trainer").CPOTrainer
    identity = lambda x: x  # noqa: E731
    # Position t predicts token t + 1; the last position predicts nothing (any finite row).
    logits = torch.cat([batch.logp_vocab, torch.zeros_like(batch.logp_vocab[:, :1])], dim=1)
    labels = torch.where(batch.completion_mask == 1, batch.input_ids, -100)
    concatenated = dict(concatenated_input_ids=batch.input_ids, concatenated_attention_mask=batch.completion_mask,
                        concatenated_labels=labels)
    fake = SimpleNamespace(
        beta=beta, label_smoothing=label_smoothing, simpo_gamma=simpo_gamma, cpo_alpha=cpo_alpha, alpha=alphapo_alpha,
        loss_type="simpo" if name == "simpo" else "sigmoid", is_encoder_decoder=False, aux_loss_enabled=False,
        pad_token_id=0, padding_value=0, get_batch_logps=cls.get_batch_logps,
        concatenated_inputs=lambda batch, **kwargs: concatenated,
        accelerator=SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=identity),
    )
    fake.concatenated_forward = lambda model, batch: cls.concatenated_forward(fake, model, batch)
    pair_loss = cls.odds_ratio_loss if name == "orpo" else cls.cpo_loss
    setattr(fake, pair_loss.__name__, lambda c, r: pair_loss(fake, c, r))
    model = lambda input_ids, attention_mask=None, use_cache=False, **kwargs: SimpleNamespace(logits=logits)  # noqa: E731
    trl_batch = {"chosen_labels": labels[:B]}
    loss, metrics = cls.get_batch_loss_metrics(fake, model, trl_batch, "train")
    chosen_logps, rejected_logps = cls.concatenated_forward(fake, model, trl_batch)[:2]
    losses, chosen_rewards, rejected_rewards = pair_loss(fake, chosen_logps, rejected_logps)[:3]
    return loss, metrics, losses, chosen_rewards, rejected_rewards


def _ref_free_case(name, **kwargs):
    return pytest.param(name, kwargs, id=name + "".join(f"-{k}={v}" for k, v in kwargs.items()))


REFERENCE_FREE_CASES = [
    _ref_free_case("simpo"), _ref_free_case("simpo", cpo_alpha=0.0),
    _ref_free_case("simpo", beta=2.0, simpo_gamma=1.2, label_smoothing=0.1, cpo_alpha=0.3),
    _ref_free_case("simpo", alphapo_alpha=0.25, cpo_alpha=0.0), _ref_free_case("simpo", alphapo_alpha=-0.5),
    _ref_free_case("cpo"), _ref_free_case("cpo", cpo_alpha=0.0),
    _ref_free_case("cpo", beta=0.5, label_smoothing=0.2, cpo_alpha=0.3), _ref_free_case("cpo", alphapo_alpha=0.05),
    _ref_free_case("orpo"), _ref_free_case("orpo", beta=1.0),
]


def _ours_reference_free(batch, name, **kwargs):
    return dpo_loss(*batch.policy, None, None, loss_type=name, chosen_lengths=batch.lengths[0],
                    rejected_lengths=batch.lengths[1], chosen_nll=batch.chosen_nll, **kwargs)


@pytest.mark.parametrize("name,kwargs", REFERENCE_FREE_CASES)
def test_reference_free_matches_trl_float64(name, kwargs):
    """The scalar loss (``losses.mean()`` vs TRL's ``get_batch_loss_metrics``) and the per-pair rewards.

    No empty completion here: TRL averages 0 log-probs over 0 tokens (nan) for simpo and orpo (see below).
    TRL's ORPO casts the mean log-probs to float32 in ``odds_ratio_loss``, so orpo agrees to float32 only.
    """
    batch = make_batch(seed=6, empty=False)
    trl_scalar, trl_metrics, _, trl_chosen, trl_rejected = _trl_reference_free(batch, name, **kwargs)
    losses, chosen_rewards, rejected_rewards = _ours_reference_free(batch, name, **kwargs)
    assert losses.shape == (B,) and losses.dtype == torch.float64
    tol = dict(rtol=1e-6, atol=1e-6) if name == "orpo" else dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(losses.mean(), trl_scalar.to(torch.float64), **tol)
    torch.testing.assert_close(chosen_rewards, trl_chosen.to(torch.float64), **tol)
    torch.testing.assert_close(rejected_rewards, trl_rejected.to(torch.float64), **tol)
    if name == "orpo":
        ours = orpo_metrics(*batch.policy, *batch.lengths, batch.chosen_nll)
        for key in ("log_odds_ratio", "log_odds_chosen", "nll_loss"):
            torch.testing.assert_close(ours[key].mean().item(), trl_metrics[key], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", REFERENCE_FREE_LOSSES)
def test_reference_free_empty_completions(name):
    """Pairs 0 (empty rejected) and 1 (empty chosen) have an empty completion. cpo sums log-probs: TRL agrees
    everywhere. simpo and orpo average them: TRL gives nan (0 / 0) there; ours is finite (mean 0, orpo's odds
    clamped) and equal to TRL's on every other pair."""
    batch = make_batch(seed=7)
    kwargs = dict(cpo_alpha=0.0) if name != "orpo" else {}  # per-pair losses without the batch-wide NLL
    trl_scalar, _, trl_losses, trl_chosen, _ = _trl_reference_free(batch, name, **kwargs)
    losses, chosen_rewards, _ = _ours_reference_free(batch, name, **kwargs)
    assert torch.isfinite(losses).all() and torch.isfinite(chosen_rewards).all()
    if name == "cpo":
        torch.testing.assert_close(losses.mean(), trl_scalar, rtol=1e-10, atol=1e-12)
        return
    assert torch.isnan(trl_losses[:2]).any() and torch.isnan(trl_scalar)
    if name == "orpo":  # TRL's per-pair value is beta * log sigma(log_odds); ours adds the NLL, minus that
        nll = batch.chosen_nll.sum() / batch.lengths[0].sum()
        torch.testing.assert_close(losses[2:], nll - trl_losses[2:].double(), rtol=1e-6, atol=1e-6)
    else:
        torch.testing.assert_close(losses[2:], trl_losses[2:], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(chosen_rewards[2:], trl_chosen[2:], rtol=1e-10, atol=1e-12)


# Mean token log-probs near 0 (probability ~1), around -ln 2 (log1mexp's branch) and very negative.
EXTREME_LOGPS = torch.tensor([-1e-15, -1e-8, -0.3, -0.6931, -0.6932, -2.0, -40.0, -700.0], dtype=torch.float64)


def _extreme_pairs():
    c = EXTREME_LOGPS.repeat_interleave(len(EXTREME_LOGPS))
    return c, EXTREME_LOGPS.repeat(len(EXTREME_LOGPS))  # every (chosen, rejected) combination


@pytest.mark.parametrize("alphapo_alpha", [0.0, 0.25, -0.1])
@pytest.mark.parametrize("name", ["simpo", "cpo"])
def test_simpo_cpo_extreme_logps_match_trl(name, alphapo_alpha):
    """TRL's ``cpo_loss`` on extreme log-probs (lengths 1: mean = sum; cpo_alpha = 0: no NLL), float64."""
    cls = pytest.importorskip("trl.experimental.cpo.cpo_trainer").CPOTrainer
    c, r = _extreme_pairs()
    beta, ls, gamma = 0.3, 0.1, 0.7
    fake = SimpleNamespace(beta=beta, label_smoothing=ls, simpo_gamma=gamma, alpha=alphapo_alpha,
                           loss_type="simpo" if name == "simpo" else "sigmoid",
                           accelerator=SimpleNamespace(device=torch.device("cpu")))
    trl_losses, trl_chosen, trl_rejected = cls.cpo_loss(fake, c, r)
    ones = torch.ones_like(c)
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        c, r, None, None, loss_type=name, beta=beta, label_smoothing=ls, simpo_gamma=gamma, cpo_alpha=0.0,
        alphapo_alpha=alphapo_alpha, chosen_lengths=ones, rejected_lengths=ones, chosen_nll=-c)
    for ours, theirs in ((losses, trl_losses), (chosen_rewards, trl_chosen), (rejected_rewards, trl_rejected)):
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)


def _mp_orpo(c: float, r: float, beta: float) -> float:
    """-beta log sigma(log odds(c) - log odds(r)) in 60-digit arithmetic; odds(l) = p / (1 - p), p = exp(l)."""
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 60
    log_odds = lambda lp: mpmath.mpf(lp) - mpmath.log(-mpmath.expm1(mpmath.mpf(lp)))  # noqa: E731
    z = log_odds(c) - log_odds(r)
    return float(beta * mpmath.log1p(mpmath.exp(-z)))


def test_orpo_extreme_logps_match_mpmath_and_trl():
    """float64: ours vs a 60-digit evaluation at 1e-12; TRL's ``odds_ratio_loss`` computes in float32 (it
    casts its inputs), so ours vs TRL only to float32 accuracy."""
    orpo = pytest.importorskip("trl.experimental.orpo.orpo_trainer").ORPOTrainer
    c, r = _extreme_pairs()
    beta, ones = 0.2, torch.ones_like(c)
    losses, chosen_rewards, _ = dpo_loss(c, r, None, None, loss_type="orpo", beta=beta, chosen_lengths=ones,
                                         rejected_lengths=ones, chosen_nll=torch.zeros_like(c))
    expected = torch.tensor([_mp_orpo(float(a), float(b), beta) for a, b in zip(c, r)], dtype=torch.float64)
    torch.testing.assert_close(losses, expected, rtol=1e-12, atol=1e-300)
    fake = SimpleNamespace(beta=beta, accelerator=SimpleNamespace(device=torch.device("cpu")))
    trl_losses, trl_chosen, _, trl_ratio, trl_log_odds = orpo.odds_ratio_loss(fake, c, r)
    torch.testing.assert_close(losses, -trl_losses.double(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(chosen_rewards, trl_chosen.double(), rtol=1e-6, atol=1e-6)
    metrics = orpo_metrics(c, r, ones, ones, torch.zeros_like(c))
    torch.testing.assert_close(metrics["log_odds_ratio"].mean(), trl_ratio.double(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(metrics["log_odds_chosen"].mean(), trl_log_odds.double(), rtol=1e-6, atol=1e-5)


def test_orpo_probability_one_is_finite_with_finite_gradients():
    """A mean log-prob of exactly 0 (empty completion, or p = 1 in the dtype) gives TRL inf/nan; ours clamps."""
    c = torch.tensor([0.0, -1.0, 0.0], dtype=torch.float64, requires_grad=True)
    r = torch.tensor([-1.0, 0.0, 0.0], dtype=torch.float64, requires_grad=True)
    ones = torch.ones(3, dtype=torch.float64)
    losses, _, _ = dpo_loss(c, r, None, None, loss_type="orpo", chosen_lengths=ones, rejected_lengths=ones,
                            chosen_nll=-c)
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(c.grad).all() and torch.isfinite(r.grad).all()


def test_needs_reference():
    assert not needs_reference(["simpo"]) and not needs_reference("orpo")
    assert not needs_reference(["simpo", "cpo", "orpo"])
    assert needs_reference(["sigmoid", "simpo"]) and needs_reference("sigmoid")
    assert all(needs_reference(name) for name in TRL_LOSSES)


def test_reference_free_losses_ignore_the_reference():
    g = torch.Generator().manual_seed(8)
    pc, pr, rc, rr = (-10 * torch.rand(4, generator=g, dtype=torch.float64) for _ in range(4))
    extra = dict(chosen_lengths=torch.tensor([1, 4, 2, 3]), rejected_lengths=torch.tensor([2, 2, 5, 1]), chosen_nll=-pc)
    for name in REFERENCE_FREE_LOSSES:
        free = dpo_loss(pc, pr, None, None, loss_type=name, **extra)
        given = dpo_loss(pc, pr, rc, rr, loss_type=name, **extra)
        for a, b in zip(free, given):
            torch.testing.assert_close(a, b)
    # Mixed with a reference loss: the reference is needed and the rewards are DPO's implicit ones.
    with pytest.raises(ValueError, match="reference_free"):
        dpo_loss(pc, pr, None, None, loss_type=["sigmoid", "simpo"], **extra)
    _, chosen_rewards, _ = dpo_loss(pc, pr, rc, rr, loss_type=["simpo", "sigmoid"], **extra)
    torch.testing.assert_close(chosen_rewards, 0.1 * (pc - rc))


def test_simpo_cpo_alpha_adds_the_batch_token_mean_nll():
    """cpo_alpha * sum(chosen_nll) / sum(chosen_lengths) on every pair (TRL's scalar nll_loss, repeated)."""
    pc, pr = torch.tensor([-2.0, -6.0], dtype=torch.float64), torch.tensor([-3.0, -1.0], dtype=torch.float64)
    extra = dict(chosen_lengths=torch.tensor([2, 3]), rejected_lengths=torch.tensor([1, 4]),
                 chosen_nll=torch.tensor([2.0, 6.0], dtype=torch.float64))
    for name in ("simpo", "cpo"):
        pure, _, _ = dpo_loss(pc, pr, None, None, loss_type=name, cpo_alpha=0.0, **extra)
        mixed, _, _ = dpo_loss(pc, pr, None, None, loss_type=name, cpo_alpha=0.5, **extra)
        torch.testing.assert_close(mixed - pure, torch.full((2,), 0.5 * 8.0 / 5.0, dtype=torch.float64))
    # pure SimPO by hand: beta * (mean_c - mean_r) - gamma
    z = 0.1 * (torch.tensor([-1.0, -2.0]) - torch.tensor([-3.0, -0.25])) - 0.5
    simpo, _, _ = dpo_loss(pc, pr, None, None, loss_type="simpo", cpo_alpha=0.0, **extra)
    torch.testing.assert_close(simpo, -torch.nn.functional.logsigmoid(z.double()))


@pytest.mark.parametrize("kwargs,match", [
    (dict(simpo_gamma=-0.1), "--simpo_gamma"),
    (dict(cpo_alpha=-1.0), "--cpo_alpha"),
    (dict(loss_type=["simpo"], ref_logprobs="cache"), "--ref_logprobs is unused"),
    (dict(loss_type=["orpo"], sync_ref_model=True), "--sync_ref_model needs a reference"),
])
def test_dpo_arguments_reject_bad_reference_free_settings(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        DPOArguments(**kwargs)


def test_dpo_arguments_pass_reference_free_settings():
    args = DPOArguments(loss_type=["simpo"], simpo_gamma=1.0, cpo_alpha=0.0, alphapo_alpha=0.2)
    assert not args.uses_reference() and DPOArguments(loss_type=["sigmoid", "cpo"]).uses_reference()
    assert not DPOArguments(reference_free=True).uses_reference()
    kwargs = args.loss_kwargs()
    assert (kwargs["simpo_gamma"], kwargs["cpo_alpha"], kwargs["alphapo_alpha"]) == (1.0, 0.0, 0.2)
    x = torch.tensor([-1.0, -2.0])
    dpo_loss(x, x - 1, None, None, **kwargs, chosen_lengths=torch.ones(2), rejected_lengths=torch.ones(2),
             chosen_nll=-x)


def test_dpo_step_runs_nothing_on_a_reference_for_reference_free_losses():
    """`make_dpo_step` with orpo: the reference model is never called, TRL's ORPO metrics are in the stats."""
    from dpo_core.dpo import make_dpo_step

    pc, pr = torch.tensor([-4.0, -9.0]), torch.tensor([-6.0, -3.0])
    out = SimpleNamespace(chosen_logps=pc, rejected_logps=pr, chosen_lengths=torch.tensor([2, 3]),
                          rejected_lengths=torch.tensor([3, 1]), chosen_nll=-pc, chosen_wpo_log_weights=None,
                          rejected_wpo_log_weights=None, chosen_mean_logits=pc, rejected_mean_logits=pr)
    calls = []

    def forward(model, batch, **kwargs):
        calls.append(model)
        return out

    step = make_dpo_step(DPOArguments(loss_type=["orpo"]), forward=forward, ref_model="reference")
    loss, stats = step("policy", {})
    assert calls == ["policy"] and torch.isfinite(loss)
    assert {"log_odds_ratio", "log_odds_chosen", "nll_loss"} <= set(stats)
    torch.testing.assert_close(stats["nll_loss"], torch.full((2,), 13.0 / 5.0))


@pytest.mark.slow
@pytest.mark.parametrize("loss_type", ["simpo", "cpo", "orpo"])
def test_reference_free_losses_learn_the_demo_preference(tiny_model_dir, tmp_path, loss_type):
    """Each reference-free relative, 30 steps on the shipped demo pairs without any reference: held-out preference
    accuracy (chosen gains more log-prob over the base model than rejected) from 0 (the base itself) to >= 0.9."""
    from helpers import DEMO_DATA, heldout_preference_accuracy, run_script

    out = tmp_path / loss_type
    run_script("dpo.py", ["--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(DEMO_DATA),
                                 "--max_length", "96", "--per_device_train_batch_size", "8", "--loss_type", loss_type,
                                 "--learning_rate", "1e-3", "--max_steps", "30", "--output_dir", str(out),
                                 "--report_to", "none"])
    assert heldout_preference_accuracy(out, tiny_model_dir) >= 0.9
