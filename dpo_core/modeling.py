"""Loading models and tokenizers: dtype, attention implementation, dropout, reference model, and the
fingerprint of a model's weights (for the reference cache)."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


def resolve_attn_implementation(requested: str | None) -> str:
    """flash-attn when asked for (or available on a GPU), SDPA otherwise; a clear error if asked but missing."""
    has_flash = importlib.util.find_spec("flash_attn") is not None
    if requested == "flash_attention_2" and not has_flash:
        raise ValueError("--attn_implementation flash_attention_2 needs flash-attn: pip install 'dpo_core[flash]' "
                         "(or use sdpa, which gives the same numbers).")
    if requested:
        return requested
    return "flash_attention_2" if has_flash and torch.cuda.is_available() else "sdpa"


def disable_dropout(model: torch.nn.Module) -> None:
    """DPO compares log-probs of the same text under two models: dropout would make them noisy."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def load_tokenizer(name_or_path: str, *, revision: str | None = None, trust_remote_code: bool = False):
    """The tokenizer, with a pad token (EOS when it has none: padding is masked everywhere)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name_or_path: str, *, torch_dtype: str = "float32", attn_implementation: str | None = None,
               revision: str | None = None, trust_remote_code: bool = False, trainable: bool = True):
    """A causal LM from safetensors only (never pickle), dropout off; frozen and in eval mode if not trainable."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        name_or_path, revision=revision, dtype=_DTYPES[torch_dtype], use_safetensors=True,
        attn_implementation=resolve_attn_implementation(attn_implementation), trust_remote_code=trust_remote_code)
    disable_dropout(model)
    if not trainable:
        model.requires_grad_(False)
        model.eval()
    return model


def load_model_and_tokenizer(model_args, *, trainable: bool = True, name_or_path: str | None = None):
    """Model and tokenizer from a `ModelArguments` (or any config with its fields), or from a path with the
    defaults: `load_model_and_tokenizer("runs/sft")`. `name_or_path` overrides the model path (the reference)."""
    if isinstance(model_args, (str, Path)):
        from .config import ModelArguments

        model_args = ModelArguments(model_name_or_path=str(model_args))
    path = name_or_path or model_args.model_name_or_path
    if not path:
        raise ValueError("--model_name_or_path is required")
    tokenizer = load_tokenizer(path, revision=model_args.revision, trust_remote_code=model_args.trust_remote_code)
    model = load_model(path, torch_dtype=model_args.torch_dtype, attn_implementation=model_args.attn_implementation,
                       revision=model_args.revision, trust_remote_code=model_args.trust_remote_code,
                       trainable=trainable)
    return model, tokenizer


def weights_fingerprint(name_or_path: str, *, revision: str | None = None) -> str:
    """sha256 over a model's config.json and safetensors files (sorted by name), streamed from disk.

    Hub names resolve to the local snapshot (no download: the weights were loaded already).
    """
    path = Path(name_or_path)
    if not path.is_dir():
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(name_or_path, revision=revision, local_files_only=True,
                                      allow_patterns=["config.json", "*.safetensors"]))
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"No .safetensors weights in {path}")
    digest = hashlib.sha256()
    for file in [path / "config.json", *files]:
        if file.exists():
            digest.update(file.name.encode())
            with open(file, "rb") as f:
                for block in iter(lambda: f.read(1 << 24), b""):
                    digest.update(block)
    return digest.hexdigest()
