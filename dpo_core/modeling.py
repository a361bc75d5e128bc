"""Loading models and tokenizers: dtype, attention implementation, dropout, reference model, LoRA/QLoRA
adapters, and the fingerprint of a model's weights (for the reference cache)."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import re
import shutil
from pathlib import Path

import torch

from .config import ModelArguments
from .errors import ConfigError, MissingError

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


def resolve_attn_implementation(requested: str | None) -> str | None:
    """flash-attn when asked for (or installed, on a GPU); else what was asked; None lets transformers pick what
    the model supports (SDPA where it can, eager for models that refuse SDPA). A clear error if flash-attn is
    asked for but missing."""
    has_flash = importlib.util.find_spec("flash_attn") is not None
    if requested == "flash_attention_2" and not has_flash:
        raise ConfigError("--attn_implementation flash_attention_2 needs flash-attn: pip install 'dpo_core[flash]' "
                          "(or use sdpa, which gives the same numbers).")
    if requested:
        return requested
    return "flash_attention_2" if has_flash and torch.cuda.is_available() else None


def split_gguf(name_or_path: str, gguf_file: str | None = None) -> tuple[str, str | None]:
    """`(directory, gguf file name)` of a GGUF checkpoint: `--gguf_file NAME` inside `name_or_path`, or a path
    that is itself a `.gguf` file; `(name_or_path, None)` for every other model."""
    if gguf_file is None and str(name_or_path).endswith(".gguf") and Path(name_or_path).is_file():
        return str(Path(name_or_path).parent), Path(name_or_path).name
    return str(name_or_path), gguf_file


def _serializable(model) -> None:
    """A GGUF checkpoint is dequantized while loading (plain `torch_dtype` tensors), but transformers still marks
    the model quantized and refuses `save_pretrained` (and transformers' Trainer, TRL, refuse to train it): drop
    the marks, so that training saves safetensors and the model is the plain model it is."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def enable_gradient_checkpointing(model) -> None:
    """`--gradient_checkpointing`: transformers' per-layer recomputation, non-reentrant (torch's recommended
    form: it works with frozen embeddings, LoRA and every batch layout's masks without extra hooks)."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def disable_dropout(model: torch.nn.Module) -> None:
    """DPO compares log-probs of the same text under two models: dropout would make them noisy."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


@contextlib.contextmanager
def model_source(name_or_path: str):
    """Loading from `name_or_path`: a path that is not there is a `MissingError` in our words, not the hub
    client's ("Repo id must use alphanumeric chars"); so is a hub name the hub cannot give (offline, unknown)."""
    if Path(name_or_path).expanduser().exists():
        yield
        return
    if name_or_path.startswith((".", "/", "~")) or not _HUB_NAME.fullmatch(name_or_path):
        raise MissingError(f"{name_or_path}: no such model directory (and not a hub model name)")
    try:
        yield
    except OSError as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MissingError(f"{name_or_path}: no such model directory, and the hub could not provide it "
                           f"({reason})") from e


def load_tokenizer(name_or_path: str, *, revision: str | None = None, trust_remote_code: bool = False,
                   gguf_file: str | None = None):
    """The tokenizer, with a pad token (EOS when it has none: padding is masked everywhere); an adapter
    directory without tokenizer files gives its base model's; a GGUF checkpoint gives the one it holds."""
    from transformers import AutoTokenizer

    name_or_path, gguf_file = split_gguf(name_or_path, gguf_file)
    if is_adapter_dir(name_or_path) and not (Path(name_or_path) / "tokenizer_config.json").exists():
        name_or_path = adapter_base_path(name_or_path)
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    with model_source(name_or_path):
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code,
                                                  **extra)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name_or_path: str, *, torch_dtype: str = "float32", attn_implementation: str | None = None,
               revision: str | None = None, trust_remote_code: bool = False, trainable: bool = True,
               quantization_config=None, gguf_file: str | None = None):
    """A causal LM from safetensors (never pickle) or a GGUF file (`gguf_file`, dequantized to `torch_dtype`),
    dropout off; frozen and in eval mode if not trainable.

    `quantization_config` (a `BitsAndBytesConfig`, see `quantization_config`) loads the weights quantized,
    on this process's device.
    """
    from transformers import AutoModelForCausalLM

    name_or_path, gguf_file = split_gguf(name_or_path, gguf_file)
    extra = {"gguf_file": gguf_file} if gguf_file else {"use_safetensors": True}
    if quantization_config is not None:
        from accelerate import PartialState

        # bitsandbytes quantizes while loading, on the device that runs this process's share of the work.
        extra.update(quantization_config=quantization_config, device_map={"": PartialState().device})
    with model_source(name_or_path):
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path, revision=revision, dtype=_DTYPES[torch_dtype],
            attn_implementation=resolve_attn_implementation(attn_implementation), trust_remote_code=trust_remote_code,
            **extra)
    if gguf_file:
        _serializable(model)
    if quantization_config is not None:
        keep_4bit_cpu_layout(model)
    disable_dropout(model)
    if not trainable:
        model.requires_grad_(False)
        model.eval()
    return model


def load_model_and_tokenizer(model_args, *, trainable: bool = True, name_or_path: str | None = None):
    """Model and tokenizer from a `ModelArguments` (or any config with its fields), or from a path with the
    defaults: `load_model_and_tokenizer("runs/sft")`. `name_or_path` overrides the model path (the reference).

    The model is what `load_model_from_args` gives (LoRA, quantization and saved adapters included).
    """
    if isinstance(model_args, (str, Path)):
        model_args = ModelArguments(model_name_or_path=str(model_args))
    path = name_or_path or model_args.model_name_or_path
    if not path:
        raise ConfigError("--model_name_or_path is required")
    tokenizer = load_tokenizer(path, revision=model_args.revision, trust_remote_code=model_args.trust_remote_code,
                               gguf_file=gguf_of(model_args, path))
    model = load_model_from_args(model_args, path, trainable=trainable)
    return model, tokenizer


def gguf_of(model_args, path: str | None) -> str | None:
    """The `--gguf_file` (policy) or `--ref_gguf_file` (a distinct reference) that goes with `path`."""
    if path == getattr(model_args, "model_name_or_path", None):
        return getattr(model_args, "gguf_file", None)
    return getattr(model_args, "ref_gguf_file", None)


def weights_fingerprint(name_or_path: str, *, revision: str | None = None, gguf_file: str | None = None) -> str:
    """sha256 over a model's config.json and safetensors files (sorted by name), streamed from disk; for a
    GGUF checkpoint, over the GGUF file and its name.

    Hub names resolve to the local snapshot (no download: the weights were loaded already). An adapter
    directory's fingerprint covers its adapter_config.json and adapter weights and its base model's fingerprint.
    """
    name_or_path, gguf_file = split_gguf(name_or_path, gguf_file)
    if gguf_file:
        digest = hashlib.sha256(f"gguf:{gguf_file}".encode())
        _hash_files(digest, [Path(name_or_path) / gguf_file])
        return digest.hexdigest()
    if is_adapter_dir(name_or_path):
        digest = hashlib.sha256(weights_fingerprint(adapter_base_path(name_or_path), revision=revision).encode())
        _hash_files(digest, [Path(name_or_path) / ADAPTER_CONFIG, *sorted(Path(name_or_path).glob("*.safetensors"))])
        return digest.hexdigest()
    path = Path(name_or_path)
    if not path.is_dir():
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(name_or_path, revision=revision, local_files_only=True,
                                      allow_patterns=["config.json", "*.safetensors"]))
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise MissingError(f"No .safetensors weights in {path}")
    digest = hashlib.sha256()
    _hash_files(digest, [path / "config.json", *files])
    return digest.hexdigest()


def _hash_files(digest, files) -> None:
    for file in files:
        if file.exists():
            digest.update(file.name.encode())
            with open(file, "rb") as f:
                for block in iter(lambda: f.read(1 << 24), b""):
                    digest.update(block)


# ------------------------------------------------------------------------------------------- LoRA / QLoRA
ADAPTER_CONFIG = "adapter_config.json"
REF_ADAPTER = "ref"  # the frozen copy of a loaded adapter that serves as DPO's reference


def is_adapter_dir(path: str | None) -> bool:
    """True for a local directory holding a peft adapter (adapter_config.json)."""
    return bool(path) and (Path(path) / ADAPTER_CONFIG).is_file()


def adapter_base_path(adapter_dir: str) -> str:
    """The base model an adapter was trained on (its adapter_config.json's base_model_name_or_path)."""
    base = json.loads((Path(adapter_dir) / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if not base:
        raise ConfigError(f"{Path(adapter_dir) / ADAPTER_CONFIG}: no base_model_name_or_path: cannot load its base")
    return base


def quantization_config(model_args):
    """The `BitsAndBytesConfig` of `--load_in_4bit` (NF4, double quantization, compute in `--torch_dtype`) or
    `--load_in_8bit` (LLM.int8), else None."""
    if not (model_args.load_in_4bit or model_args.load_in_8bit):
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("--load_in_4bit/--load_in_8bit need bitsandbytes: pip install 'dpo_core[quant]'")
    from transformers import BitsAndBytesConfig

    if model_args.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = _DTYPES[model_args.torch_dtype]
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.float32 if compute == "auto" else compute)


def keep_4bit_cpu_layout(model) -> None:
    """Stops bitsandbytes (0.50) from repacking 4-bit weights for its CPU inference kernel.

    On CPU, a no-grad forward in eval mode (an evaluation) repacks each `Linear4bit` weight in place; later
    training forwards read the packed weight correctly, but their backward does not: the adapter's gradients
    came out wrong by ~65% in our test (tests/test_modeling.py checks them against the dequantized weights).
    Without the repacking, eval and training run the same kernel. No effect on GPUs.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def quantization_name(model_args) -> str | None:
    """How the base weights are quantized, for the reference cache's fingerprint: None when they are not."""
    if model_args.load_in_8bit:
        return "bitsandbytes-int8"
    if model_args.load_in_4bit:
        return "bitsandbytes-nf4-double-quant"
    return None


def lora_config(model_args):
    """The peft `LoraConfig` of the `--lora_*` flags (a causal-LM task)."""
    from peft import LoraConfig

    targets = model_args.lora_target_modules
    return LoraConfig(r=model_args.lora_r, lora_alpha=model_args.lora_alpha, lora_dropout=model_args.lora_dropout,
                      target_modules="all-linear" if targets == ["all-linear"] else list(targets),
                      modules_to_save=model_args.lora_modules_to_save, bias="none", task_type="CAUSAL_LM")


def load_model_from_args(model_args, name_or_path: str | None = None, *, trainable: bool = True):
    """The model of a `ModelArguments`: base weights (quantized with --load_in_4bit/8bit), plus

    - a saved adapter when `name_or_path` is an adapter directory (trainable when `trainable`, else frozen
      and active: the adapter-merged model, e.g. as a reference);
    - a new LoRA adapter from the `--lora_*` flags with `--use_lora` and `trainable`. A frozen model gets none:
      a new adapter starts at zero (LoRA's B = 0), so it would not change a single log-prob.

    Quantized trainable models go through peft's `prepare_model_for_kbit_training`; with gradient
    checkpointing, the inputs require grads (else a checkpointed segment whose only trainable weights are
    the adapter's would get no gradient).
    """
    path = name_or_path or model_args.model_name_or_path
    if not path:
        raise ConfigError("--model_name_or_path is required")
    adapter = path if is_adapter_dir(path) else None
    for flag in ("load_in_4bit", "load_in_8bit", "merge_adapter"):  # a directory that holds an adapter implies LoRA
        if getattr(model_args, flag, False) and not (model_args.use_lora or adapter):
            raise ConfigError(f"--{flag} needs --use_lora (quantized weights cannot be trained directly; only an "
                              "adapter on top of them).")
    base = adapter_base_path(adapter) if adapter else path
    quant = quantization_config(model_args)
    model = load_model(base, torch_dtype=model_args.torch_dtype, attn_implementation=model_args.attn_implementation,
                       gguf_file=None if adapter else gguf_of(model_args, path),
                       revision=model_args.revision, trust_remote_code=model_args.trust_remote_code,
                       trainable=trainable, quantization_config=quant)
    if adapter is None and not (model_args.use_lora and trainable):
        return model
    from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training

    if quant is not None and trainable:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=model_args.gradient_checkpointing)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter, is_trainable=trainable)
        logger.info(f"Loaded adapter {adapter} on base {base} (its LoRA settings, not the --lora_* flags)")
    else:
        model = get_peft_model(model, lora_config(model_args))
    if not trainable:
        model.requires_grad_(False)
        model.eval()
    elif model_args.gradient_checkpointing:
        model.enable_input_require_grads()
    return model


def is_peft_model(model) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def add_reference_adapter(model, model_args) -> str | None:
    """Makes the reference of a LoRA policy available without a second copy of the base weights.

    A new adapter starts at zero: the reference is the base model, i.e. the policy with the adapter disabled
    (returns None). A policy loaded from a saved adapter starts as base + that adapter: the reference is a
    frozen copy of it, loaded as adapter "ref" (returns "ref"). TRL 1.16 does the same.
    Call before `accelerator.prepare`, so that the copy sits on the model's device.
    """
    path = model_args.model_name_or_path
    if not is_adapter_dir(path):
        return None
    model.load_adapter(path, adapter_name=REF_ADAPTER, is_trainable=False)
    disable_dropout(model)  # the new adapter's LoRA dropout: the reference must be deterministic
    return REF_ADAPTER


@contextlib.contextmanager
def adapter_reference(model, adapter_name: str | None):
    """Within the block, `model` (an unwrapped `PeftModel`) computes the reference: adapters disabled
    (`adapter_name` None) or the frozen adapter `adapter_name` active.

    The training mode stays as it is: switching a 4-bit model to eval mode on CPU makes bitsandbytes repack
    its weights for another kernel, and the reference would no longer equal the policy's base bit for bit.
    The active (trainable) adapter is restored after.
    """
    if adapter_name is None:
        with model.disable_adapter():
            yield model
    else:
        previous = model.active_adapter
        model.set_adapter(adapter_name, inference_mode=True)
        try:
            yield model
        finally:
            model.set_adapter(previous)  # trainable again, the reference adapter frozen


def merge_and_save_adapter(adapter_dir: str | Path, output_dir: str | Path, model_args) -> Path:
    """Base + adapter merged into full weights (`base + alpha / r * B @ A`) saved as safetensors with the
    tokenizer: loads with `AutoModelForCausalLM`. The base is reloaded unquantized in `--torch_dtype` (merging
    into 4/8-bit weights would round the update away)."""
    from peft import PeftModel

    adapter_dir, output_dir = Path(adapter_dir), Path(output_dir)
    base = load_model(adapter_base_path(str(adapter_dir)), torch_dtype=model_args.torch_dtype,
                      attn_implementation=model_args.attn_implementation, revision=model_args.revision,
                      trust_remote_code=model_args.trust_remote_code, trainable=False)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    tmp = output_dir.with_name(output_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp, safe_serialization=True)
    load_tokenizer(str(adapter_dir)).save_pretrained(tmp)
    if output_dir.exists():
        shutil.rmtree(output_dir)
    tmp.rename(output_dir)
    return output_dir


def register_adapter_checkpointing(accelerator) -> None:
    """Checkpoints of a LoRA run hold the trainable weights only (the adapter, any --lora_modules_to_save): the
    frozen base cannot change, and a quantized one does not round-trip through a state dict. Resume then
    loads them into the freshly loaded base + adapter, exactly; optimizer, scheduler and RNG go through
    accelerate as usual. Applies to one prepared PEFT model outside DeepSpeed/FSDP (which save their own
    sharded state); otherwise accelerate saves the full state dict.
    """
    def applies(models) -> bool:
        return (len(models) == 1 and is_peft_model(accelerator.unwrap_model(models[0]))
                and accelerator.distributed_type not in ("DEEPSPEED", "FSDP", "MEGATRON_LM"))

    def save_hook(models, weights, output_dir) -> None:
        if applies(models) and len(weights) == 1:
            trainable = {name for name, p in models[0].named_parameters() if p.requires_grad}
            weights[0] = {k: v for k, v in weights[0].items() if k in trainable}

    def load_hook(models, input_dir) -> None:
        if not applies(models):
            return
        from safetensors.torch import load_file

        file = Path(input_dir) / "model.safetensors"
        state = load_file(str(file))
        trainable = {name for name, p in models[0].named_parameters() if p.requires_grad}
        if set(state) != trainable:
            raise ConfigError(f"{file}: holds {len(state)} tensors, the trainable weights of this model are "
                             f"{len(trainable)} (e.g. {sorted(set(state) ^ trainable)[:3]}): not a checkpoint of "
                             "this LoRA configuration")
        models[0].load_state_dict(state, strict=False)
        models.pop(0)  # loaded: accelerate must not load it again (it expects every weight)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
