"""dpo_core/throughput.py: the FLOPs formula against torch's FLOP counter, the peak, and the throughput
scalars that scripts/dpo.py logs to TensorBoard, read back and recomputed from the data."""

import time

import pytest
import torch
from helpers import read_scalars, run_script, small_dataset
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from dpo_core import data as data_lib
from dpo_core.layouts import LAYOUTS
from dpo_core.throughput import (
    dpo_step_flops,
    forward_flops,
    gpu_peak_flops,
    head_params,
    matmul_params,
    measured_matmul_flops,
    peak_flops,
    scored_tokens,
    sequence_lengths,
)

# FlopCounterMode counts matrix multiplies only; the formula's N also holds the RMSNorm weights (2 per layer + 1,
# of `hidden` each), whose elementwise products it does not count: the tests take them out (2 FLOPs per weight
# and token per forward), then the counts agree to rounding.
FLOP_RTOL = 1e-9


def _norm_params(model) -> int:
    return sum(p.numel() for name, p in model.named_parameters() if "norm" in name)


def _llama(tied: bool = False) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=tied,
                         # eager: QK^T and AV as matmuls torch counts (its counter skips the CPU SDPA kernel)
                         attn_implementation="eager")
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("tied", [False, True])
def test_forward_flops_match_torch_flop_counter(tied):
    """One forward of B rows of T real tokens: counted matmul FLOPs == 2 N B T + 4 L h B T^2."""
    model = _llama(tied)
    assert matmul_params(model) == matmul_params(model.config)  # the analytic count agrees with the module
    batch, length = 3, 40
    ids = torch.randint(0, 512, (batch, length))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(input_ids=ids, use_cache=False)
    expected = forward_flops(matmul_params(model), model.config, [length] * batch).item()
    expected -= 2 * _norm_params(model) * batch * length
    assert counter.get_total_flops() == pytest.approx(expected, rel=FLOP_RTOL)


def test_training_step_flops_are_three_forwards():
    """Forward + backward of the policy == 3 forwards (the 6N of PaLM/nanoGPT), counted by torch."""
    model = _llama().train()
    ids = torch.randint(0, 512, (2, 48))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids, use_cache=False).logits.float().logsumexp(-1).sum().backward()
    n = matmul_params(model)
    expected = dpo_step_flops(n, model.config, [48, 48], online_reference=False).item()
    assert counter.get_total_flops() == pytest.approx(expected - 3 * 2 * _norm_params(model) * 96, rel=FLOP_RTOL)
    assert dpo_step_flops(n, model.config, [48], online_reference=True).item() == pytest.approx(
        4 * forward_flops(n, model.config, [48]).item())


@pytest.mark.parametrize("mode", ["concat", "padding_free"])
def test_dpo_forward_flops_count_the_head_on_completion_tokens_only(mode):
    """The chunked log-prob forward runs the LM head on the scored positions only; torch's counter agrees
    with `2 N_body sum(n) + 2 N_head S + 4 L h sum(n^2)`, S = completion tokens (no padding: equal lengths)."""
    model = _llama()
    g = torch.Generator().manual_seed(0)
    examples = [data_lib.Example(id=i, prompt_ids=torch.randint(1, 512, (9,), generator=g).tolist(),
                                 chosen_ids=torch.randint(1, 512, (5,), generator=g).tolist(),
                                 rejected_ids=torch.randint(1, 512, (5,), generator=g).tolist()) for i in range(3)]
    batch = LAYOUTS[mode].collate(examples, pad_token_id=0)
    with torch.no_grad():  # the first call per model also checks the head and the layout: not counted here
        LAYOUTS[mode].forward(model, batch, chunk_size=4)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        LAYOUTS[mode].forward(model, batch, chunk_size=4)
    lengths = [14] * 6
    assert scored_tokens(batch) == 30 and sequence_lengths(batch).tolist() == lengths
    expected = forward_flops(matmul_params(model), model.config, lengths, scored_tokens(batch)).item()
    assert counter.get_total_flops() == pytest.approx(expected - 2 * _norm_params(model) * sum(lengths),
                                                      rel=FLOP_RTOL)
    head = head_params(model.config)
    assert head == model.lm_head.weight.numel()
    # the head on every position would cost 2 N_head (84 - 30) more per forward
    assert forward_flops(matmul_params(model), model.config, lengths).item() - expected == pytest.approx(
        2 * head * 54, rel=FLOP_RTOL)


def test_sequence_lengths_of_a_padded_batch():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    assert sequence_lengths({"attention_mask": mask}).tolist() == [3, 2]
    assert sequence_lengths({"sequence_lengths": torch.tensor([5])}).tolist() == [5]
    ids = torch.zeros(1, 7, dtype=torch.long)  # a packed row without per-sequence lengths: spread evenly
    assert sequence_lengths({"input_ids": ids, "num_tokens": torch.tensor(6)}).tolist() == [6.0]


def test_peak_flops():
    assert peak_flops("cpu", override=2.5e12) == (2.5e12, "given")
    assert gpu_peak_flops("NVIDIA H200") == 989e12 and gpu_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert gpu_peak_flops("NVIDIA H100 PCIe") == 756e12 and gpu_peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert gpu_peak_flops("Some Future Accelerator") is None
    start = time.perf_counter()
    value, source = peak_flops("cpu")
    assert time.perf_counter() - start < 1.0 and source == "measured:cpu"
    assert 1e8 < value < 1e14  # a CPU's float32 matmul rate: more than 0.1 GFLOP/s, less than 100 TFLOP/s
    assert measured_matmul_flops("cpu") == value  # cached: asked again, not measured again


@pytest.mark.slow
def test_throughput_scalars_in_tensorboard(tiny_model_dir, tmp_path):
    """padding_ratio equals the one computed from the tokenized pairs; mfu / tokens_per_second equals model
    FLOPs per token / peak (both come from the same window time), computed here from the token lengths."""
    data = small_dataset(tmp_path / "data", n_train=8, n_test=4)
    out, peak = tmp_path / "run", 1e12
    # One batch = the whole split, so every step sees the same padding whatever the shuffle. The concat layout
    # (2B right-padded rows), whose padding and FLOPs are recomputed below (auto would share the prompts).
    run_script("dpo.py", ["--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(data),
                          "--output_dir", str(out), "--max_length", "64", "--per_device_train_batch_size", "8",
                          "--max_steps", "2", "--logging_steps", "1", "--peak_flops", str(peak),
                          "--forward_mode", "concat"])
    scalars = read_scalars(out / "logs")

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    settings = data_lib.TokenizeSettings(max_length=64)
    _, examples = data_lib.prepare_examples(str(data), tokenizer, settings)
    lengths = [len(e.prompt_ids) + len(c) for e in examples["train"] for c in (e.chosen_ids, e.rejected_ids)]
    assert len(lengths) == 16
    padding = 1 - sum(lengths) / (len(lengths) * max(lengths))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    config = model.config
    n = sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
    head = model.get_output_embeddings().weight.numel()
    completions = sum(len(c) for e in examples["train"] for c in (e.chosen_ids, e.rejected_ids))
    # policy forward + backward + online reference forward = 4 forwards: 2 N_body per token, 2 N_head per
    # completion token (the only logits DPO reads), attention
    flops = 4 * (2 * (n - head) * sum(lengths) + 2 * head * completions
                 + 4 * config.num_hidden_layers * config.hidden_size * sum(x * x for x in lengths))
    for step in (1, 2):
        assert scalars["train/padding_ratio"][step] == pytest.approx(padding, abs=1e-6)
        tps, mfu = scalars["train/tokens_per_second"][step], scalars["train/mfu"][step]
        assert tps > 0 and 0 < mfu < 1
        assert mfu / tps == pytest.approx(flops / sum(lengths) / peak, rel=1e-5)
