"""dpo_core/logps.py against independent computations: separate forwards, a naive per-token loop.

Tolerance: float32, atol 1e-5 plus rtol 1e-6 (sums of ~100 in magnitude carry ~1e-5 of fp32 rounding).
"""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from dpo_core.batches import Example, collate_concat
from dpo_core.layouts import LAYOUTS, make_collator
from dpo_core.logps import (
    concatenated_forward,
    padding_free_forward,
    sequence_logps,
    shared_prefix_forward,
)

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
    assert LAYOUTS["concat"].forward is concatenated_forward


# ------------------------------------------------------------------ forward modes and chunked log-probs
#
# Every layout (concat, padding_free, shared_prefix) with and without chunked log-probs must give the plain
# concat path's numbers: all ForwardOutput fields to atol 1e-5 + rtol 1e-6 (sums of ~100 carry ~1e-5 of
# float32 rounding), and gradients w.r.t. every parameter to 1e-5 of the largest gradient entry. The plain
# concat path itself is checked against a float64 per-token loop over separate forwards.

# Every registered layout (a new one is tested here by itself), and padding_free in both of its layouts: rows as
# long as the longest sequence (sdpa/eager), and one row (flash).
MODES = [*LAYOUTS, "padding_free_one_row"]


def collate(mode, examples):
    if mode == "padding_free_one_row":
        return LAYOUTS["padding_free"].collate(examples, pad_token_id=PAD, one_row=True)
    return LAYOUTS[mode].collate(examples, pad_token_id=PAD)


def forward_of(mode):
    return LAYOUTS[mode.removesuffix("_one_row")].forward


FIELDS = ["chosen_logps", "rejected_logps", "chosen_lengths", "rejected_lengths", "chosen_nll",
          "chosen_mean_logits", "rejected_mean_logits", "chosen_wpo_log_weights", "rejected_wpo_log_weights"]


def load_scaled(model_dir, attn, dtype=torch.float32):
    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation=attn)
    with torch.no_grad():
        m.lm_head.weight.mul_(50)
    return m.eval()


def run_mode(model, examples, mode, chunk_size, **kwargs):
    """ForwardOutput and the gradient of a loss that touches every output, w.r.t. the trainable parameters."""
    model.zero_grad(set_to_none=True)
    out = forward_of(mode)(model, collate(mode, examples), chunk_size=chunk_size, **kwargs)
    loss = out.chosen_logps.sum() - 0.7 * out.rejected_logps.sum() + 0.1 * out.chosen_nll.sum()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out, grads


def assert_same(out, ref, grads, ref_grads):
    for name in FIELDS:
        a, b = getattr(out, name), getattr(ref, name)
        if b is None:
            assert a is None, name
            continue
        assert a.dtype == b.dtype, name
        torch.testing.assert_close(a.detach(), b.detach(), atol=1e-5, rtol=1e-6, msg=name)
    scale = max(g.abs().max().item() for g in ref_grads.values())
    assert set(grads) == set(ref_grads)
    for name, g in ref_grads.items():
        assert (grads[name] - g).abs().max().item() <= 1e-5 * scale, name


@pytest.fixture(scope="module", params=["eager", "sdpa"])
def attn_model(request, tiny_model_dir):
    return load_scaled(tiny_model_dir, request.param)


def test_every_mode_and_chunking_equals_plain_concat_values_and_gradients(attn_model):
    # Odd lengths, a one-token completion, prompts longer than completions; chunk 3 splits sequences.
    examples = make_examples(5, seed=4) + [Example(9, [7, 8, 9, 10, 11, 12, 13], [14], [15, 16, 17])]
    assert collate("padding_free", examples)["input_ids"].shape[0] < 12  # rows holding several sequences
    for kwargs in ({"wpo": True, "ld_alpha": 0.5},):
        ref, ref_grads = run_mode(attn_model, examples, "concat", 0, **kwargs)
        for mode in MODES:
            for chunk_size in (0, 3):
                if (mode, chunk_size) != ("concat", 0):
                    out, grads = run_mode(attn_model, examples, mode, chunk_size, **kwargs)
                    assert_same(out, ref, grads, ref_grads)


def naive_logps_f64(model64, prompt, completion):
    """sum_t log p(completion_t | ...) from a float64 copy of the model, one sequence alone, one token at a time."""
    with torch.no_grad():
        logits = model64(torch.tensor([prompt + completion])).logits[0]
    return sum((logits[len(prompt) + t - 1].log_softmax(-1)[tok]).item() for t, tok in enumerate(completion))


def test_every_mode_equals_float64_per_token_loop(attn_model):
    model64 = AutoModelForCausalLM.from_pretrained(attn_model.name_or_path, dtype=torch.float64,
                                                   attn_implementation="eager")
    model64.load_state_dict({k: v.double() for k, v in attn_model.state_dict().items()})
    examples = make_examples(4, seed=5)
    expected = [(naive_logps_f64(model64, e.prompt_ids, e.chosen_ids), naive_logps_f64(model64, e.prompt_ids,
                                                                                       e.rejected_ids))
                for e in examples]
    for mode in MODES:
        for subset in (examples, examples[2:3]):  # and a batch of one
            with torch.no_grad():
                out = forward_of(mode)(attn_model, collate(mode, subset), chunk_size=2)
            want = expected if len(subset) > 1 else expected[2:3]
            torch.testing.assert_close(out.chosen_logps.double(), torch.tensor([c for c, _ in want],
                                       dtype=torch.float64), atol=1e-5, rtol=1e-6)
            torch.testing.assert_close(out.rejected_logps.double(), torch.tensor([r for _, r in want],
                                       dtype=torch.float64), atol=1e-5, rtol=1e-6)


def test_the_masks_really_apply(attn_model):
    """Negative controls: without restarting positions the padding-free row is one long sequence, and without
    the shared-prefix mask rejected tokens see chosen ones; either changes the numbers by far more than 1e-5."""
    examples = make_examples(3, seed=6)
    with torch.no_grad():
        ref = concatenated_forward(attn_model, collate_concat(examples, PAD))
        batch = LAYOUTS["padding_free"].collate(examples, pad_token_id=PAD, one_row=True)
        batch["position_ids"] = torch.arange(batch["input_ids"].shape[1]).unsqueeze(0)
        leaky = padding_free_forward(attn_model, batch)
        batch = LAYOUTS["shared_prefix"].collate(examples, pad_token_id=PAD)
        batch["segment"] = torch.zeros_like(batch["segment"])  # plain causal within each pair
        seeing = shared_prefix_forward(attn_model, batch)
    assert (leaky.chosen_logps - ref.chosen_logps).abs().max() > 1e-2
    assert (seeing.rejected_logps - ref.rejected_logps).abs().max() > 1e-2
    torch.testing.assert_close(seeing.chosen_logps, ref.chosen_logps, atol=1e-5, rtol=1e-6)  # chosen unaffected


def test_shared_prefix_packs_pairs_into_rows():
    examples = [Example(0, [5] * 10, [6] * 4, [7] * 3), Example(1, [5] * 2, [6], [7]), Example(2, [5] * 3, [6], [7])]
    batch = LAYOUTS["shared_prefix"].collate(examples, pad_token_id=PAD)
    assert batch["input_ids"].shape == (1, 17) or batch["input_ids"].shape[0] == 2
    assert batch["input_ids"].shape[1] == 17  # the longest pair
    assert batch["input_ids"].shape[0] == 2  # pairs 1 and 2 (4 + 5 tokens) share the second row
    assert batch["num_tokens"].item() == 2 * 10 + 4 + 3 + 2 * 2 + 2 + 2 * 3 + 2
    assert batch["num_positions"].item() == 2 * 17
    # pair 0: positions restart after the prompt for the rejected part
    assert batch["position_ids"][0].tolist() == list(range(14)) + [10, 11, 12]
    pf = LAYOUTS["padding_free"].collate(examples, pad_token_id=PAD, one_row=True)
    assert pf["num_tokens"].item() == batch["num_tokens"].item() == collate_concat(examples, PAD)["num_tokens"].item()
    assert pf["cu_seq_lens"].tolist() == [0, 14, 17, 21, 34, 37, 41] and pf["input_ids"].shape == (1, 41)
    # rows as long as the longest sequence (14), first-fit decreasing: [14], [13], [4, 4, 3, 3]
    rows = LAYOUTS["padding_free"].collate(examples, pad_token_id=PAD)
    assert rows["input_ids"].shape == (3, 14) and rows["num_positions"].item() == 42
    assert rows["num_tokens"].item() == 41 and "cu_seq_lens" not in rows
    assert rows["position_ids"][1].tolist() == list(range(13)) + [0]  # the padding position: a sequence of its own
    assert rows["position_ids"][2].tolist() == [0, 1, 2, 3] * 2 + [0, 1, 2] * 2
    assert rows["input_ids"][1, 13].item() == PAD


def test_flex_block_mask_equals_the_dense_mask():
    """The FlexAttention mask_mod (a BlockMask on GPU) is the dense sdpa/eager mask, and uncompiled
    flex_attention under it computes what SDPA computes under the dense one. (transformers compiles flex
    attention inside the model, minutes on CPU: the model-level flex forward runs in the GPU test.)"""
    from torch.nn.attention.flex_attention import create_block_mask, create_mask, flex_attention

    from dpo_core.logps import shared_prefix_attention_mask, shared_prefix_mask_mod

    examples = make_examples(5, seed=7)
    batch = LAYOUTS["shared_prefix"].collate(examples, pad_token_id=PAD)
    rows, length = batch["input_ids"].shape
    dense = shared_prefix_attention_mask(batch, "sdpa", torch.float32)
    mod = shared_prefix_mask_mod(batch["pair_index"], batch["segment"])
    assert torch.equal(create_mask(mod, rows, None, length, length, device="cpu"), dense)
    eager = shared_prefix_attention_mask(batch, "eager", torch.float32)
    assert torch.equal(eager == 0, dense)
    q, k, v = torch.randn(3, rows, 2, length, 8).unbind(0)
    block_mask = create_block_mask(mod, rows, None, length, length, device="cpu")
    torch.testing.assert_close(flex_attention(q, k, v, block_mask=block_mask),
                               torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flex_attention inside the model needs torch.compile "
                    "(minutes on CPU) and has no CPU backward; runs on a GPU")
def test_flex_attention_model_forward_on_gpu(tiny_model_dir):
    model = load_scaled(tiny_model_dir, "flex_attention").cuda()
    examples = make_examples(3, seed=7)

    def on_gpu(batch):
        return {k: v.cuda() for k, v in batch.items()}

    ref = concatenated_forward(model, on_gpu(collate_concat(examples, PAD)), chunk_size=0)
    for mode in ("padding_free", "shared_prefix"):
        out = LAYOUTS[mode].forward(model, on_gpu(make_collator(mode, PAD, model)(examples)))
        torch.testing.assert_close(out.chosen_logps, ref.chosen_logps, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(out.rejected_logps, ref.rejected_logps, atol=1e-4, rtol=1e-5)
        (out.chosen_logps.sum() - out.rejected_logps.sum()).backward()  # flex backward exists on GPU


def test_bf16_weights_give_float32_logps_in_every_mode(tiny_model_dir):
    model = load_scaled(tiny_model_dir, "sdpa", torch.bfloat16)
    examples = make_examples(3, seed=8)
    with torch.no_grad():
        ref = concatenated_forward(model, collate_concat(examples, PAD), chunk_size=0)
        for mode in MODES:
            out = forward_of(mode)(model, collate(mode, examples), chunk_size=4)
            assert out.chosen_logps.dtype == out.chosen_nll.dtype == torch.float32
            # bf16 hidden states differ with the layout (other kernels); the log-softmax itself is float32.
            torch.testing.assert_close(out.chosen_logps, ref.chosen_logps, atol=0.5, rtol=2e-2)


def test_lora_policy_chunked_equals_plain(tiny_model_dir):
    """LoRA on attention and on lm_head itself: the chunked head calls the LoRA-wrapped lm_head."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    model = get_peft_model(load_scaled(tiny_model_dir, "sdpa"), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "lm_head"], init_lora_weights=False))
    examples = make_examples(3, seed=9)
    ref, ref_grads = run_mode(model, examples, "concat", 0, wpo=True)
    assert ref_grads and all("lora" in n for n in ref_grads) and any("lm_head" in n for n in ref_grads)
    for mode in MODES:
        out, grads = run_mode(model, examples, mode, 2, wpo=True)
        assert_same(out, ref, grads, ref_grads)


class _LargestTensor(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the largest tensor any op creates (forward and backward) while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


def test_chunked_logps_never_allocate_full_logits(tmp_path):
    """vocab 32768: the plain path creates [2B, T, V] float32 logits; the chunked one nothing near that size."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32768, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, attn_implementation="sdpa")
    model = LlamaForCausalLM(config)
    examples = make_examples(4, seed=10, vocab=32768)
    examples = [Example(e.id, e.prompt_ids * 6, e.chosen_ids * 3, e.rejected_ids * 3) for e in examples]
    batch = collate_concat(examples, PAD)
    logits_bytes = batch["input_ids"].numel() * config.vocab_size * 4
    sizes = {}
    for chunk_size in (0, 16):
        with _LargestTensor() as watch:
            out = concatenated_forward(model, batch, chunk_size=chunk_size)
            (out.chosen_logps.sum() - out.rejected_logps.sum()).backward()
        sizes[chunk_size] = watch.largest
    weight_bytes = max(p.numel() * p.element_size() for p in model.parameters())  # embeddings, lm_head (+grads)
    assert sizes[0] >= logits_bytes  # the watch sees the plain path's logits (the test can fail)
    assert sizes[16] <= max(16 * config.vocab_size * 4, weight_bytes) < logits_bytes / 10


def test_make_collator_picks_the_padding_free_layout_of_the_attention(tiny_model_dir):
    """flash-attn gets the one-row varlen layout; a mask-taking implementation gets packed rows, and the
    flash forward refuses packed rows instead of attending across sequences."""
    model = load_scaled(tiny_model_dir, "sdpa")
    examples = make_examples(4, seed=3)
    assert "cu_seq_lens" not in make_collator("padding_free", PAD, model)(examples)
    assert make_collator("padding_free", PAD, model)(examples)["input_ids"].shape[0] > 1
    assert set(make_collator("shared_prefix", PAD, model)(examples)) == set(LAYOUTS["shared_prefix"].collate(examples, PAD))
    model.config._attn_implementation = "flash_attention_2"  # what the collator reads (flash-attn not needed)
    batch = make_collator("padding_free", PAD, model)(examples)
    assert batch["input_ids"].shape[0] == 1 and batch["cu_seq_lens"][-1].item() == batch["input_ids"].shape[1]
    with pytest.raises(ValueError, match="one-row layout"):
        padding_free_forward(model, LAYOUTS["padding_free"].collate(examples, PAD))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash-attn varlen needs a GPU")
def test_flash_varlen_padding_free_equals_concat_on_gpu(tiny_model_dir):
    pytest.importorskip("flash_attn")
    model = load_scaled(tiny_model_dir, "flash_attention_2", torch.bfloat16).cuda()
    examples = make_examples(4, seed=3)
    batch = {k: v.cuda() for k, v in make_collator("padding_free", PAD, model)(examples).items()}
    assert batch["input_ids"].shape[0] == 1
    with torch.no_grad():
        out = padding_free_forward(model, batch)
        ref = concatenated_forward(model, {k: v.cuda() for k, v in collate_concat(examples, PAD).items()})
    torch.testing.assert_close(out.chosen_logps, ref.chosen_logps, atol=0.5, rtol=2e-2)  # bf16 kernels differ
