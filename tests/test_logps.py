"""dpo_core/logps.py against independent computations: separate forwards, a naive per-token loop.

Tolerance: float32, atol 1e-5 plus rtol 1e-6 (sums of ~100 in magnitude carry ~1e-5 of fp32 rounding).
"""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from dpo_core.data import Example, collate_concat
from dpo_core.logps import FORWARDS, concatenated_forward, sequence_logps

PAD = 0


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    # Random weights of std 0.02 give nearly uniform log-probs; scale them so differences show.
    with torch.no_grad():
        m.lm_head.weight.mul_(50)
    return m.eval()


def make_examples(n=5, seed=0, vocab=1000):
    g = torch.Generator().manual_seed(seed)

    def ids(lo, hi):
        return torch.randint(5, vocab, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()

    return [Example(id=i, prompt_ids=ids(2, 9), chosen_ids=ids(1, 7), rejected_ids=ids(1, 7)) for i in range(n)]


def naive_logps(model, prompt, completion):
    """sum_t log p(completion_t | prompt, completion_<t) in float64, one position at a time."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(ids).logits[0].double()
    total = 0.0
    for t, token in enumerate(completion):
        row = logits[len(prompt) + t - 1]
        total += (row[token] - torch.logsumexp(row, 0)).item()
    return total


def test_equals_naive_loop_and_separate_forwards(model):
    examples = make_examples()
    with torch.no_grad():
        out = concatenated_forward(model, collate_concat(examples, PAD))
    for i, ex in enumerate(examples):
        assert out.chosen_logps[i].item() == pytest.approx(naive_logps(model, ex.prompt_ids, ex.chosen_ids), abs=1e-4)
        assert out.rejected_logps[i].item() == pytest.approx(
            naive_logps(model, ex.prompt_ids, ex.rejected_ids), abs=1e-4)
        assert out.chosen_lengths[i] == len(ex.chosen_ids)
        assert out.rejected_lengths[i] == len(ex.rejected_ids)
    # Chosen alone and rejected alone (each its own forward, own padding) give the same numbers.
    alone_c = [Example(e.id, e.prompt_ids, e.chosen_ids, e.chosen_ids) for e in examples]
    alone_r = [Example(e.id, e.prompt_ids, e.rejected_ids, e.rejected_ids) for e in examples]
    with torch.no_grad():
        c = concatenated_forward(model, collate_concat(alone_c, PAD)).chosen_logps
        r = concatenated_forward(model, collate_concat(alone_r, PAD)).chosen_logps
    torch.testing.assert_close(out.chosen_logps, c, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(out.rejected_logps, r, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(out.chosen_nll, -out.chosen_logps)


def test_invariant_to_batch_size_padding_side_and_extra_padding(model):
    examples = make_examples(6, seed=1)
    batch = collate_concat(examples, PAD)
    with torch.no_grad():
        full = concatenated_forward(model, batch)
        singles = [concatenated_forward(model, collate_concat([e], PAD)) for e in examples]
        torch.testing.assert_close(full.chosen_logps, torch.cat([s.chosen_logps for s in singles]), atol=1e-5, rtol=1e-6)
        # Extra right padding.
        padded = {k: torch.nn.functional.pad(v, (0, 7), value=PAD if k == "input_ids" else 0)
                  for k, v in batch.items() if v.dim() == 2}
        extra = concatenated_forward(model, padded)
        torch.testing.assert_close(full.chosen_logps, extra.chosen_logps, atol=1e-5, rtol=1e-6)
        # Left padding: move every row's padding to the front (positions come from the mask).
        left = {k: torch.stack([torch.roll(row, int((batch["attention_mask"][i] == 0).sum())) for i, row in enumerate(v)])
                for k, v in batch.items() if v.dim() == 2}
        flipped = concatenated_forward(model, left)
        torch.testing.assert_close(full.rejected_logps, flipped.rejected_logps, atol=1e-5, rtol=1e-6)


def test_log_softmax_in_float32_for_bf16_model(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        out = concatenated_forward(model, collate_concat(make_examples(2), PAD))
    assert out.chosen_logps.dtype == torch.float32


def test_mean_logits_and_wpo_weights_match_naive(model):
    examples = make_examples(3, seed=2)
    batch = collate_concat(examples, PAD)
    with torch.no_grad():
        out = concatenated_forward(model, batch, wpo=True)
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    mask = batch["completion_mask"][:, 1:].bool()
    B = len(examples)
    sel = logits[:, :-1][mask[:, :]]  # [n_tokens, V] over all rows
    chosen_sel = logits[:B, :-1][mask[:B]]
    assert out.chosen_mean_logits.item() == pytest.approx(chosen_sel.mean().item(), abs=1e-5)
    assert sel.numel() > 0
    # WPO: mean over completion tokens of log p(y_t) - log sum_v p_v^2 (arXiv 2406.11827 Eq. 2).
    for row in range(2 * B):
        logp = torch.log_softmax(logits[row, :-1], -1)
        labels = batch["input_ids"][row, 1:]
        terms = [logp[t, labels[t]] - torch.logsumexp(2 * logp[t], 0) for t in range(len(labels)) if mask[row, t]]
        expected = sum(terms) / len(terms)
        got = (out.chosen_wpo_log_weights if row < B else out.rejected_wpo_log_weights)[row % B]
        assert got.item() == pytest.approx(expected.item(), abs=1e-4)


def test_ld_alpha_weights_the_tail_of_the_longer_completion():
    """chosen has 4 completion tokens, rejected 2: tokens 3-4 of chosen are the 'verbose' tail."""
    per_token = torch.tensor([[-1.0, -2.0, -3.0, -4.0], [-5.0, -6.0, 0.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.float64)
    got = sequence_logps(per_token, mask, ld_alpha=0.25)
    assert got.tolist() == [-1 - 2 + 0.25 * (-3 - 4), -11.0]
    assert sequence_logps(per_token, mask, ld_alpha=1.0).tolist() == sequence_logps(per_token, mask).tolist()
    assert math.isclose(sequence_logps(per_token, mask, ld_alpha=0.0)[0].item(), -3.0)


def test_padding_token_values_do_not_matter(model):
    examples = make_examples(4, seed=3)
    with torch.no_grad():
        a = concatenated_forward(model, collate_concat(examples, PAD))
        b = concatenated_forward(model, collate_concat(examples, 777))
    torch.testing.assert_close(a.chosen_logps, b.chosen_logps, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(a.rejected_logps, b.rejected_logps, atol=1e-5, rtol=1e-6)
    assert FORWARDS["concat"] is concatenated_forward
