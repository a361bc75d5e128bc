"""Every forward mode on decoder families other than Llama, against the plain path (full logits, one padded
row per sequence): logit scaling after lm_head (Cohere, Granite), final-logit softcapping and sliding-window
layers (Gemma-2, Mistral), and models whose attention does not follow a packed layout (ALiBi: Bloom, MPT),
which must get a clear error instead of silently wrong log-probs.

Tolerance: float32, atol 1e-5 on per-sequence sums (the same as tests/test_logps.py).
"""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from dpo_core.batches import Example, collate_concat
from dpo_core.layouts import AUTO, LAYOUTS, LayoutSlot, _mean_lengths, choose_layout, make_collator
from dpo_core.logps import concatenated_forward, logit_transform

SMALL = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0)


def make_model(model_type, attn="eager", **overrides):
    config = AutoConfig.for_model(model_type, **{**SMALL, **overrides})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()
    with torch.no_grad():  # weights large enough that every position's logits differ clearly
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


def examples(n=5, seed=1):
    g = torch.Generator().manual_seed(seed)

    def ids(lo, hi):
        return torch.randint(5, 290, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()

    # prompts of 8-19 tokens and completions of 2-8: longer than the sliding windows below
    return [Example(i, ids(8, 20), ids(2, 9), ids(2, 9)) for i in range(n)]


def assert_every_mode_equals_plain(model, pairs):
    with torch.no_grad():
        ref = concatenated_forward(model, collate_concat(pairs, 0), chunk_size=0)
        for mode in LAYOUTS:
            out = LAYOUTS[mode].forward(model, make_collator(mode, 0, model)(pairs), chunk_size=4)
            torch.testing.assert_close(out.chosen_logps, ref.chosen_logps, atol=1e-5, rtol=1e-6, msg=mode)
            torch.testing.assert_close(out.rejected_logps, ref.rejected_logps, atol=1e-5, rtol=1e-6, msg=mode)


@pytest.mark.parametrize("model_type,overrides,scale", [
    ("cohere", {"logit_scale": 0.25}, 0.25),  # logits * logit_scale after lm_head
    ("granite", {"logits_scaling": 8.0}, 1 / 8),  # logits / logits_scaling
])
def test_logit_scaling_after_the_head(model_type, overrides, scale):
    model = make_model(model_type, **overrides)
    assert logit_transform(model.config).scale == pytest.approx(scale)
    assert_every_mode_equals_plain(model, examples())


@pytest.mark.parametrize("model_type,overrides", [
    ("gemma2", {"head_dim": 16, "sliding_window": 6, "final_logit_softcapping": 5.0}),  # sliding + full layers
    ("mistral", {"sliding_window": 6}),  # every layer slides
    ("qwen2", {"use_sliding_window": True, "sliding_window": 6, "max_window_layers": 1}),
])
def test_sliding_window_layers_in_every_mode(model_type, overrides):
    model = make_model(model_type, **overrides)
    assert_every_mode_equals_plain(model, examples())


def test_an_unknown_change_of_the_logits_is_an_error():
    """A config field the forward does not read: the chunked head's transform disagrees with the model's own
    output on the first call, which raises instead of training on wrong log-probs."""
    model = make_model("llama")
    model.config.logits_scaling = 4.0  # Granite's field; Llama's forward ignores it
    with pytest.raises(ValueError, match="logps_chunk_size 0"):
        concatenated_forward(model, collate_concat(examples(), 0), chunk_size=4)


def test_alibi_models_are_refused_by_the_packed_layouts():
    """Bloom's ALiBi biases come from the attention mask, not from position ids: one packed row mixes its
    sequences. The first packed batch is checked against plain forwards and raises."""
    bloom = make_model("bloom", n_layer=2, n_head=4)
    pairs = examples(3)
    with pytest.raises(ValueError, match="does not follow the packed layout"):
        LAYOUTS["padding_free"].forward(bloom, LAYOUTS["padding_free"].collate(pairs, 0, one_row=True))
    with pytest.raises(ValueError, match="use --forward_mode concat"):
        LAYOUTS["shared_prefix"].forward(bloom, LAYOUTS["shared_prefix"].collate(pairs, 0))
    mpt = make_model("mpt", d_model=64, n_heads=4, n_layers=2)
    with pytest.raises(ValueError, match="does not follow the packed layout"):
        LAYOUTS["shared_prefix"].forward(mpt, LAYOUTS["shared_prefix"].collate(pairs, 0))


DEFAULT_FLAG_FAMILIES = [("llama", {}), ("qwen2", {}), ("qwen3", {"head_dim": 16}), ("mistral", {}),
                         ("gemma", {"head_dim": 16}), ("gemma2", {"head_dim": 16, "sliding_window": 6}),
                         ("gemma3_text", {"head_dim": 16, "sliding_window": 6}), ("phi3", {}), ("gpt2", {}),
                         ("olmo2", {}), ("cohere", {}), ("granite", {})]


@pytest.mark.slow
@pytest.mark.parametrize("model_type,overrides", DEFAULT_FLAG_FAMILIES, ids=[m for m, _ in DEFAULT_FLAG_FAMILIES])
def test_every_family_trains_with_default_flags(model_type, overrides, tmp_path):
    """No --attn_implementation: transformers picks what the model supports (Gemma-2 refuses SDPA), and two DPO
    steps run in the default layout and in shared_prefix (whose mask the chosen backend takes), the loss moving."""
    from helpers import small_dataset

    from dpo_core.config import DPOConfig
    from dpo_core.demo import build_tiny_tokenizer
    from dpo_core.dpo import train_dpo

    tokenizer = build_tiny_tokenizer()
    config = AutoConfig.for_model(model_type, **{**SMALL, "vocab_size": len(tokenizer),
                                                 "pad_token_id": tokenizer.pad_token_id, **overrides})
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    data = small_dataset(tmp_path / "data", n_train=8, n_test=4)
    for mode in ("concat", "shared_prefix"):
        result = train_dpo(DPOConfig(
            model_name_or_path=str(tmp_path / "model"), dataset_name=str(data), output_dir=str(tmp_path / mode),
            max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2, max_length=64, logging_steps=1,
            report_to=["none"], forward_mode=mode))
        assert result.metrics["global_step"] == 2 and result.metrics["skipped_steps"] == 0, (model_type, mode)
        assert torch.isfinite(torch.tensor(result.metrics["train_loss"])), (model_type, mode)


def _pairs(prompt, completion, n=6, seed=2):
    g = torch.Generator().manual_seed(seed)

    def ids(lo, hi):
        return torch.randint(5, 290, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()

    return [Example(i, ids(*prompt), ids(*completion), ids(*completion)) for i in range(n)]


def _slot_logps(model, pairs):
    slot = LayoutSlot(AUTO, 0, model, chunk_size=4)
    mode = slot.resolve(model, pairs, log=lambda line: None)
    with torch.no_grad():
        out = slot.forward(model, slot.collate(pairs))
    return mode, torch.cat([out.chosen_logps, out.rejected_logps])


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_auto_takes_shared_prefix_for_long_prompts_and_equals_every_mode(attn):
    """Prompts of 8-19 tokens and completions of 2-8: shared_prefix saves over a third of concat's tokens."""
    model, pairs = make_model("llama", attn), _pairs((8, 20), (2, 9))
    mode, got = _slot_logps(model, pairs)
    assert mode == "shared_prefix"
    with torch.no_grad():
        for name in LAYOUTS:
            out = LAYOUTS[name].forward(model, make_collator(name, 0, model)(pairs), chunk_size=0)
            torch.testing.assert_close(got, torch.cat([out.chosen_logps, out.rejected_logps]), atol=1e-5,
                                       rtol=1e-6, msg=name)


def test_auto_keeps_concat_when_prompts_are_short():
    model = make_model("llama", "sdpa")
    pairs = _pairs((1, 3), (20, 40))  # prompts ~1/20 of the completions: too little to share
    assert choose_layout(model, pairs, pad_token_id=0)[0] == "concat"
    assert _slot_logps(model, pairs)[0] == "concat"


@pytest.mark.parametrize("model_type,overrides", [("bloom", {"n_layer": 2, "n_head": 4}),
                                                  ("mpt", {"d_model": 64, "n_heads": 4, "n_layers": 2})])
def test_auto_never_picks_a_layout_the_model_fails(model_type, overrides, caplog):
    """ALiBi models fail the packed layouts' check (test above): auto probes, logs why, and takes concat, whose
    numbers are the plain path's."""
    model, pairs = make_model(model_type, **overrides), _pairs((8, 20), (2, 9))
    with caplog.at_level("INFO", logger="dpo_core.layouts"):
        mode, why = choose_layout(model, pairs, pad_token_id=0)
    assert mode == "concat" and "not shared_prefix" in caplog.text and "use --forward_mode concat" in caplog.text
    assert model.training is False  # the probe restores the mode it found
    mode, got = _slot_logps(model, pairs)
    with torch.no_grad():
        ref = concatenated_forward(model, collate_concat(pairs, 0), chunk_size=0)
    torch.testing.assert_close(got, torch.cat([ref.chosen_logps, ref.rejected_logps]), atol=1e-5, rtol=1e-6)


def test_auto_reads_lengths_of_mapped_arrays_and_lists_alike():
    from dpo_core.prepared import ExampleArrays

    pairs = _pairs((8, 20), (2, 9), n=50)
    assert _mean_lengths(ExampleArrays.from_examples(pairs)) == pytest.approx(_mean_lengths(pairs))
    prompt = sum(len(e.prompt_ids) for e in pairs) / 50
    assert _mean_lengths(pairs)[0] == pytest.approx(prompt)
