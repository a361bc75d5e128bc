"""Throughput accounting: model FLOPs of a DPO step, the hardware's peak, and what the loop logs.

Model FLOPs follow the PaLM paper (Chowdhery et al. 2022, appendix B) and nanoGPT's `estimate_mfu`:
a training token (forward + backward) costs

    6 * N + 12 * n_layers * hidden * T

where `N` counts the parameters that take part in matrix multiplies (every parameter except the input
embedding table, which is a lookup; the LM head counts, also when tied to the embedding) and the second term
is attention's `QK^T` and `AV` over a context of `T` tokens (counted in full, not halved for the causal mask,
as PaLM and nanoGPT do). A forward alone is a third of it: `2 * N + 4 * n_layers * hidden * T`.

One departure, because DPO reads only some logits: the LM head (`hidden * vocab` of `N`) is counted only on
the positions whose log-probs the loss reads (the ones that predict a completion token), not on prompt
positions. Counting it everywhere would credit work the step does not need; at a 32k-128k vocabulary the
head is most of a small model's FLOPs, and the MFU of a step that skips it would pass 100%. So a forward over
sequences of real lengths `n_i` with `S` scored tokens costs

    2 * N_body * sum(n_i) + 2 * N_head * S + 4 * n_layers * hidden * sum(n_i ** 2)

with `N_body = N - N_head`. Padding and recomputation (gradient checkpointing, chunked log-probs) are not
model FLOPs; a layout that runs a shared prompt once (`shared_prefix`) has sequences prompt + chosen +
rejected, and its FLOPs are those of what it runs. A DPO step with an online reference adds one reference
forward (`(6 + 2) / 6` of the policy's FLOPs); with the reference cache it adds nothing.

MFU = achieved model FLOPs per second / peak FLOPs per second (summed over processes).
"""

from __future__ import annotations

import time
from functools import lru_cache

import torch

# Dense (no sparsity) bf16 tensor-core peak per GPU, from the vendors' data sheets. Matched by substring of
# `torch.cuda.get_device_name()`, most specific first.
GPU_BF16_PEAK_FLOPS = (
    ("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("H800", 989e12), ("GH200", 989e12),
    ("B200", 2250e12), ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("L40", 181e12),
    ("A6000", 155e12), ("A10G", 125e12), ("A10", 125e12), ("L4", 121e12), ("RTX 4090", 165e12),
    ("RTX 3090", 71e12), ("V100", 125e12), ("T4", 65e12),
)


def matmul_params(model_or_config) -> int:
    """`N` of the FLOPs formula: parameters that enter matrix multiplies (all but the input embedding).

    Args:
        model_or_config: a `PreTrainedModel` (its parameters are counted) or a transformers config of a
            Llama-like decoder (`hidden_size`, `intermediate_size`, `num_hidden_layers`,
            `num_attention_heads`, `num_key_value_heads`, `vocab_size`), counted analytically.
    """
    if isinstance(model_or_config, torch.nn.Module):
        model = model_or_config
        total = sum(_numel(p) for p in model.parameters())
        embed, head = model.get_input_embeddings(), model.get_output_embeddings()
        total -= _numel(embed.weight)
        if head is not None and head.weight is embed.weight:  # tied: the head's matmul still happens
            total += _numel(head.weight)
        return total
    c = model_or_config
    d, layers, heads = c.hidden_size, c.num_hidden_layers, c.num_attention_heads
    kv = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or d // heads
    attention = d * heads * head_dim * 2 + d * kv * head_dim * 2  # q, o and k, v projections
    mlp = 3 * d * c.intermediate_size  # gate, up, down
    norms = 2 * d
    return layers * (attention + mlp + norms) + d + d * c.vocab_size  # + final norm + LM head


def _numel(param) -> int:
    """Full size of a parameter, also when ZeRO-3 has partitioned it (`ds_numel`)."""
    return getattr(param, "ds_numel", None) or param.numel()


def attention_width(config) -> int:
    """`hidden` of the attention term: query heads x head dimension (= hidden_size for most models)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_attention_heads * head_dim


def head_params(config) -> int:
    """`N_head`: the LM head's share of `matmul_params`, `hidden * vocab` (tied or not)."""
    return config.hidden_size * config.vocab_size


def forward_flops(n_params: int, config, lengths, scored_tokens=None) -> torch.Tensor:
    """Model FLOPs of one forward: `2 N_body sum(n_i) + 2 N_head S + 4 L h sum(n_i^2)`.

    Args:
        n_params: `matmul_params(model)` (`N`, LM head included).
        config: the model config (`num_hidden_layers`, attention width, `hidden_size * vocab_size` = `N_head`).
        lengths: real-token count of each sequence (a list of ints or a 1-D tensor on any device).
        scored_tokens: `S`, the positions whose logits are read; None: every position (plain PaLM).
    Returns:
        A 0-dim float64 tensor on the device of `lengths` (no host sync; float32 on MPS).
    """
    lengths = torch.as_tensor(lengths)
    lengths = lengths.to(torch.float32 if lengths.device.type == "mps" else torch.float64).flatten()
    tokens = lengths.sum()
    scored = tokens if scored_tokens is None else torch.as_tensor(scored_tokens, device=lengths.device).to(tokens)
    head = head_params(config)
    attention = 4 * config.num_hidden_layers * attention_width(config) * (lengths ** 2).sum()
    return 2 * (n_params - head) * tokens + 2 * head * scored + attention


def dpo_step_flops(n_params: int, config, lengths, *, online_reference: bool, scored_tokens=None) -> torch.Tensor:
    """Model FLOPs of a DPO micro-batch: policy forward + backward (3 forwards), plus the reference forward
    when a reference model runs online (not with the reference cache)."""
    return (3 + int(online_reference)) * forward_flops(n_params, config, lengths, scored_tokens)


def sequence_lengths(batch: dict) -> torch.Tensor:
    """Real-token lengths of the sequences the model processes in `batch`, for the attention term.

    A batch may say it (`sequence_lengths`); otherwise the rows of a 2-D `attention_mask` are the sequences
    (the concatenated layout); otherwise `num_tokens` is spread evenly over the rows of `input_ids`.
    """
    if "sequence_lengths" in batch:
        return batch["sequence_lengths"]
    mask = batch.get("attention_mask")
    if mask is not None and mask.dim() == 2:
        return mask.sum(-1)
    rows = batch["input_ids"].shape[0]
    return (batch["num_tokens"] / rows).expand(rows)


def processed_tokens(batch: dict):
    """Real (non-padding) tokens the model processes in `batch`: `num_processed_tokens` when the layout
    processes some tokens once for several sequences (a shared prompt), else `num_tokens`."""
    return batch.get("num_processed_tokens", batch["num_tokens"])


def scored_tokens(batch: dict):
    """Positions whose logits the loss reads: the completion tokens (`logp_labels` of the packed layouts,
    `completion_mask` of the padded one); None when the batch says neither (then every position counts)."""
    if "logp_labels" in batch:
        return batch["logp_labels"].numel()
    if "completion_mask" in batch:
        return batch["completion_mask"].sum()
    return None


def make_batch_flops(model, *, online_reference: bool):
    """`batch -> model FLOPs of the DPO micro-batch`, for `train_loop(..., batch_flops=...)`."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "num_hidden_layers"):
        return None
    n_params = matmul_params(model)

    def batch_flops(batch: dict) -> float:
        return dpo_step_flops(n_params, config, sequence_lengths(batch), online_reference=online_reference,
                              scored_tokens=scored_tokens(batch))

    return batch_flops


def gpu_peak_flops(name: str) -> float | None:
    """The table's bf16 dense peak for a CUDA device name, or None when the device is not listed."""
    for key, value in GPU_BF16_PEAK_FLOPS:
        if key.lower() in name.lower():
            return value
    return None


@lru_cache(maxsize=None)
def measured_matmul_flops(device: str = "cpu", dtype: torch.dtype = torch.float32, size: int = 1024,
                          seconds: float = 0.3) -> float:
    """The best matmul rate (FLOP/s) of `size x size` products in `dtype` on `device`, timed for about
    `seconds` after one warm-up product. Cached per process (the loop and the benchmark ask once)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    a @ b
    sync()
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        a @ b
        sync()
        best = max(best, 2 * size ** 3 / max(time.perf_counter() - start, 1e-9))
    return best


def peak_flops(device: torch.device | str, *, override: float | None = None) -> tuple[float, str]:
    """Peak FLOP/s of one device and where the number comes from.

    `override` (`--peak_flops`) wins; a listed CUDA device gets its bf16 dense peak; anything else gets a
    matmul rate measured now (float32 on CPU, bf16 on an unlisted GPU).
    Returns:
        `(flops_per_second, source)`, source one of "given", "table:<device name>", "measured:<device>".
    """
    if override:
        return float(override), "given"
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        value = gpu_peak_flops(name)
        if value is not None:
            return value, f"table:{name}"
        return measured_matmul_flops(str(device), torch.bfloat16, 4096), f"measured:{name}"
    return measured_matmul_flops(str(device)), f"measured:{device.type}"
