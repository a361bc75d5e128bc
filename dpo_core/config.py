"""Typed configuration: dataclasses with a help string on every field, validated in `__post_init__`,
parsed by `HfArgumentParser` from `--config file.yaml` plus command-line overrides.

Field names follow TRL's `DPOConfig` / transformers' `TrainingArguments` so users switch without
relearning. Scripts pick the groups they need (the reference precompute has no optimizer).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path

import yaml
from transformers import HfArgumentParser

from .losses import LOSSES


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Policy model: a local directory or a hub name (required)."})
    ref_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Reference model; default: the policy's initial weights."})
    revision: str | None = field(default=None, metadata={"help": "Hub revision (branch, tag or commit)."})
    torch_dtype: str = field(
        default="float32",
        metadata={"help": "Weights dtype: float32 | bfloat16 | float16 | auto. Mixed precision (autocast) "
                  "comes from the accelerate config instead."})
    attn_implementation: str | None = field(
        default=None,
        metadata={"help": "eager | sdpa | flex_attention | flash_attention_2; default: flash_attention_2 "
                  "when flash-attn is installed and a GPU is used, else sdpa."})
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Run model code from the hub. Off by default: it executes foreign code."})
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Recompute activations in backward to save memory."})
    use_lora: bool = field(
        default=False,
        metadata={"help": "Train a LoRA adapter (peft) instead of all weights. The reference is then the base model "
                  "with the adapter disabled: no second copy of the weights. A --model_name_or_path that holds an "
                  "adapter (adapter_config.json) is loaded as base + adapter with or without this flag."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator: updates are scaled by alpha / r."})
    lora_dropout: float = field(
        default=0.05,
        metadata={"help": "Dropout on the LoRA input (SFT). dpo.py turns every dropout off, this one included: DPO "
                  "compares log-probs of the policy and the reference (as TRL's disable_dropout does)."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["all-linear"],
        metadata={"help": "Module names to adapt (e.g. q_proj v_proj), or all-linear: every linear layer but the "
                  "output head (peft's and TRL's choice)."})
    lora_modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Modules trained in full and saved with the adapter (e.g. lm_head)."})
    load_in_4bit: bool = field(
        default=False,
        metadata={"help": "QLoRA: load the base weights in 4 bits (bitsandbytes NF4, double quantization, compute "
                  "in --torch_dtype); needs --use_lora and `pip install 'dpo_core[quant]'`."})
    load_in_8bit: bool = field(
        default=False, metadata={"help": "Load the base weights in 8 bits (bitsandbytes LLM.int8); needs --use_lora."})
    merge_adapter: bool = field(
        default=False,
        metadata={"help": "Also save base + adapter merged into full weights under <output_dir>/merged (loads with "
                  "AutoModelForCausalLM); the base is reloaded unquantized in --torch_dtype for the merge."})

    def __post_init__(self):
        if self.torch_dtype not in ("float32", "bfloat16", "float16", "auto"):
            raise ValueError(f"--torch_dtype must be float32, bfloat16, float16 or auto, got {self.torch_dtype!r}")
        self._validate_lora()

    def _validate_lora(self):
        if isinstance(self.lora_target_modules, str):
            self.lora_target_modules = [self.lora_target_modules]
        if self.load_in_4bit and self.load_in_8bit:
            raise ValueError("Give --load_in_4bit or --load_in_8bit, not both.")
        from .modeling import is_adapter_dir  # a directory that holds an adapter implies LoRA

        lora = self.use_lora or is_adapter_dir(self.model_name_or_path)
        for flag in ("load_in_4bit", "load_in_8bit", "merge_adapter"):
            if getattr(self, flag) and not lora:
                raise ValueError(f"--{flag} needs --use_lora (quantized weights cannot be trained directly; "
                                 "only an adapter on top of them).")
        if self.lora_r < 1:
            raise ValueError(f"--lora_r must be >= 1, got {self.lora_r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"--lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not self.lora_target_modules:
            raise ValueError("--lora_target_modules needs at least one name (or all-linear)")
        if "all-linear" in self.lora_target_modules and len(self.lora_target_modules) > 1:
            raise ValueError("--lora_target_modules: all-linear stands alone, got "
                             f"{self.lora_target_modules}")


@dataclass
class DataArguments:
    dataset_name: str | None = field(
        default=None,
        metadata={"help": "A .jsonl/.json/.parquet file, a folder of <split>.<ext> files, or a hub dataset name."})
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    dataset_split: str = field(default="train", metadata={"help": "Training split."})
    eval_split: str | None = field(default=None, metadata={"help": "Held-out split for evaluation (e.g. test)."})
    eval_fraction: float = field(
        default=0.0, metadata={"help": "Carve this fraction of the training split out as held-out (seeded)."})
    max_length: int | None = field(
        default=512, metadata={"help": "Max tokens of prompt + completion, per sequence."})
    max_prompt_length: int | None = field(default=None, metadata={"help": "Max prompt tokens (truncated first)."})
    max_completion_length: int | None = field(
        default=None, metadata={"help": "Max tokens of each completion (its end is cut)."})
    truncation_mode: str = field(
        default="keep_start",
        metadata={"help": "keep_start: cut the end of long sequences (and of long prompts); keep_end: cut the "
                  "start of the prompt."})
    on_invalid: str = field(
        default="error",
        metadata={"help": "error: stop before training, listing every bad record; skip: drop them and list them "
                  "in invalid_records.jsonl (dpo.py: in --output_dir; the precompute: <output_dir>.invalid_records.jsonl)."})

    def __post_init__(self):
        if self.truncation_mode not in ("keep_start", "keep_end"):
            raise ValueError(f"--truncation_mode must be keep_start or keep_end, got {self.truncation_mode!r}")
        if self.on_invalid not in ("error", "skip"):
            raise ValueError(f"--on_invalid must be error or skip, got {self.on_invalid!r}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"--eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.eval_split and self.eval_fraction:
            raise ValueError("Give --eval_split or --eval_fraction, not both.")
        if self.max_length and self.max_prompt_length and self.max_prompt_length >= self.max_length:
            raise ValueError(f"--max_prompt_length ({self.max_prompt_length}) must be below --max_length "
                             f"({self.max_length}) to leave room for the completion.")


@dataclass
class DPOArguments:
    beta: float = field(default=0.1, metadata={"help": "Strength of the KL constraint to the reference."})
    loss_type: list[str] = field(
        default_factory=lambda: ["sigmoid"],
        metadata={"help": f"One or more of: {', '.join(LOSSES)} (TRL's names). Several are summed with "
                  "--loss_weights."})
    loss_weights: list[float] | None = field(
        default=None, metadata={"help": "One weight per --loss_type (default 1.0 each)."})
    label_smoothing: float = field(
        default=0.0, metadata={"help": "Probability a label is flipped: cDPO for sigmoid, robust, exo_pair, aot."})
    reference_free: bool = field(
        default=False, metadata={"help": "Ignore the reference (its log-probs are taken as 0)."})
    f_divergence_type: str = field(
        default="reverse_kl",
        metadata={"help": "reverse_kl | forward_kl | js_divergence | alpha_divergence (f-DPO)."})
    f_alpha_divergence_coef: float = field(default=0.5, metadata={"help": "alpha of alpha_divergence."})
    ld_alpha: float | None = field(
        default=None, metadata={"help": "LD-DPO weight in [0, 1] of tokens past the shorter completion."})
    use_weighting: bool = field(default=False, metadata={"help": "WPO weighting of each pair's loss."})
    discopop_tau: float = field(default=0.05, metadata={"help": "Temperature of the discopop loss."})
    ref_logprobs: str | None = field(
        default=None,
        metadata={"help": "Directory written by scripts/precompute_ref_logprobs.py; no reference model is "
                  "loaded then."})
    sync_ref_model: bool = field(
        default=False,
        metadata={"help": "TR-DPO: every --ref_model_sync_steps optimizer steps, the reference becomes "
                  "alpha * policy + (1 - alpha) * reference (needs a reference model: not with --ref_logprobs, "
                  "--reference_free or LoRA)."})
    ref_model_mixup_alpha: float = field(
        default=0.6, metadata={"help": "TR-DPO's alpha in [0, 1]: the policy's weight in the reference update."})
    ref_model_sync_steps: int = field(
        default=512, metadata={"help": "TR-DPO: optimizer steps between reference updates."})

    def __post_init__(self):
        if isinstance(self.loss_type, str):
            self.loss_type = [self.loss_type]
        unknown = [name for name in self.loss_type if name not in LOSSES]
        if unknown:
            raise ValueError(f"Unknown --loss_type {unknown}; choose from {sorted(LOSSES)}")
        if self.loss_weights is not None and len(self.loss_weights) != len(self.loss_type):
            raise ValueError(f"--loss_weights has {len(self.loss_weights)} values for "
                             f"{len(self.loss_type)} loss types")
        if self.beta <= 0:
            raise ValueError(f"--beta must be > 0, got {self.beta}")
        if self.ld_alpha is not None and not 0.0 <= self.ld_alpha <= 1.0:
            raise ValueError(f"--ld_alpha must be in [0, 1], got {self.ld_alpha}")
        if self.reference_free and self.ref_logprobs:
            raise ValueError("--reference_free and --ref_logprobs exclude each other.")
        if self.sync_ref_model:
            if self.ref_logprobs or self.reference_free:
                raise ValueError("--sync_ref_model updates a reference model during training: it cannot be used with "
                                 f"{'--ref_logprobs (a cache is fixed)' if self.ref_logprobs else '--reference_free'}.")
            if not 0.0 <= self.ref_model_mixup_alpha <= 1.0:
                raise ValueError(f"--ref_model_mixup_alpha must be in [0, 1], got {self.ref_model_mixup_alpha}")
            if self.ref_model_sync_steps < 1:
                raise ValueError(f"--ref_model_sync_steps must be >= 1, got {self.ref_model_sync_steps}")

    def loss_kwargs(self) -> dict:
        """Keyword arguments of `dpo_core.losses.dpo_loss`."""
        return dict(loss_type=self.loss_type, loss_weights=self.loss_weights, beta=self.beta,
                    label_smoothing=self.label_smoothing, reference_free=self.reference_free,
                    f_divergence_type=self.f_divergence_type,
                    f_alpha_divergence_coef=self.f_alpha_divergence_coef, discopop_tau=self.discopop_tau)


@dataclass
class TrainArguments:
    output_dir: str | None = field(default=None, metadata={"help": "Run directory (required)."})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Replace an earlier run's logs, checkpoints and results in --output_dir."})
    seed: int = field(default=42, metadata={"help": "Seed of shuffling and of the eval_fraction carve-out."})
    max_steps: int = field(default=-1, metadata={"help": "Optimizer steps; overrides --num_train_epochs if > 0."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Passes over the training split."})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "Pairs per process per micro-batch."})
    per_device_eval_batch_size: int = field(default=16, metadata={"help": "Pairs per process in evaluation."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    learning_rate: float = field(default=1e-6, metadata={"help": "Peak AdamW learning rate."})
    lr_scheduler_type: str = field(
        default="linear", metadata={"help": "Any transformers scheduler name: linear, cosine, constant, ..."})
    warmup_steps: int = field(default=0, metadata={"help": "Linear warm-up steps."})
    warmup_ratio: float = field(default=0.0, metadata={"help": "Warm-up as a fraction of all steps."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1."})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2."})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "AdamW epsilon."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (0: no clipping)."})
    logging_steps: int = field(default=10, metadata={"help": "Log train metrics every N optimizer steps."})
    eval_steps: int | None = field(
        default=None, metadata={"help": "Evaluate every N steps (and always at the end when eval data exist)."})
    eval_on_start: bool = field(
        default=False, metadata={"help": "Evaluate once before training (the baseline: policy == reference)."})
    save_steps: int | None = field(default=None, metadata={"help": "Save a resumable checkpoint every N steps."})
    save_total_limit: int | None = field(default=None, metadata={"help": "Keep at most N checkpoints."})
    resume_from_checkpoint: str | None = field(
        default=None, metadata={"help": "A checkpoint directory, or 'latest' (newest complete one, if any)."})
    max_consecutive_nonfinite: int = field(
        default=3, metadata={"help": "Stop after this many optimizer steps in a row with NaN/Inf loss or gradients."})
    report_to: str = field(default="tensorboard", metadata={"help": "tensorboard | none."})
    dataloader_num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes."})
    forward_mode: str = field(
        default="concat",
        metadata={"help": "Batch layout of the forward (same log-probs in each): concat (2B padded rows), "
                  "padding_free (the 2B sequences in one row, no padding), shared_prefix (prompt + chosen + "
                  "rejected as one sequence per pair, the prompt computed once; sdpa, eager or flex_attention)."})
    logps_chunk_size: int = field(
        default=1024,
        metadata={"help": "Completion tokens per chunk of the float32 log-softmax over the vocabulary, recomputed "
                  "in backward: the [2B, T, V] logits never exist at once (and a chunk never holds more than 2^24 "
                  "logits: 512 tokens at a 32k vocabulary, 128 at 128k). 0: the model's full logits."})
    log_example_ids: bool = field(
        default=False,
        metadata={"help": "Audit the data order: append each micro-batch's example ids (per rank, with step, epoch "
                  "and position) to output_dir/example_ids/rank{R}.jsonl."})
    peak_flops: float | None = field(
        default=None, metadata={"help": "Peak FLOP/s of one device for the logged train/mfu (default: the bf16 "
                                "dense peak of a known GPU, else a matmul rate measured at startup)."})

    def __post_init__(self):
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            raise ValueError("Give --max_steps > 0 or --num_train_epochs > 0.")
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                     "logging_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.report_to not in ("tensorboard", "none"):
            raise ValueError(f"--report_to must be tensorboard or none, got {self.report_to!r}")
        check_forward_mode(self.forward_mode, self.logps_chunk_size)


FORWARD_MODES = ("concat", "padding_free", "shared_prefix")


def check_forward_mode(forward_mode: str, logps_chunk_size: int) -> None:
    """`--forward_mode` / `--logps_chunk_size` validation, shared by training and the reference precompute."""
    if forward_mode not in FORWARD_MODES:
        raise ValueError(f"--forward_mode must be one of {', '.join(FORWARD_MODES)}, got {forward_mode!r}")
    if logps_chunk_size < 0:
        raise ValueError(f"--logps_chunk_size must be >= 0 (0: no chunking), got {logps_chunk_size}")


def _check_groups(config, flat_cls) -> None:
    """Runs the `__post_init__` of every group a flat config inherits (Python would run only the first)."""
    for group in reversed(flat_cls.__mro__[1:]):
        check = vars(group).get("__post_init__")
        if check is not None:
            check(config)


# The flat configs of the Python API. Every field of the groups, so one object (or one YAML file) holds a
# whole run, and a field added to a group appears here by itself. Fields come in the order model, data,
# method, training (dataclasses collect fields from the last base first).
@dataclass
class DPOConfig(TrainArguments, DPOArguments, DataArguments, ModelArguments):
    """Everything `dpo_core.train_dpo` (and `scripts/dpo.py`) reads."""

    def __post_init__(self):
        _check_groups(self, DPOConfig)


@dataclass
class SFTConfig(TrainArguments, DataArguments, ModelArguments):
    """Everything `dpo_core.train_sft` (and `scripts/sft.py`) reads. Defaults that differ from DPO's are
    redeclared here (fine-tuning on demonstrations takes a far larger learning rate than DPO)."""

    ref_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Unused by SFT (there is no reference); accepted so that one recipe "
                                "serves sft.py and dpo.py."})
    learning_rate: float = field(default=2e-5, metadata={"help": "Peak AdamW learning rate."})

    def __post_init__(self):
        _check_groups(self, SFTConfig)


def run_cli(main, argv=None) -> None:
    """Runs a script's `main`; a user error (bad flag, bad data, stale cache, existing run directory) ends
    with its message and exit code 1 instead of a traceback. `DPO_CORE_TRACEBACK=1` shows the traceback.
    A run stopped by SIGTERM/SIGUSR1 after committing its checkpoint exits with `PREEMPTED_EXIT_CODE`."""
    try:
        main(argv)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as error:
        if os.environ.get("DPO_CORE_TRACEBACK") == "1" or type(error).__name__ not in _USER_ERRORS:
            raise
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(1)
    except Exception as stopped:  # noqa: BLE001 - only the preemption stop is handled here
        if type(stopped).__name__ != "TrainingPreempted":
            raise
        from .training import PREEMPTED_EXIT_CODE

        if os.environ.get("RANK", "0") == "0":  # once per run, not once per process
            print(str(stopped), flush=True)
        sys.exit(PREEMPTED_EXIT_CODE)


# By name, so that this module does not import the data, cache and loop modules.
_USER_ERRORS = {"ValueError", "DataValidationError", "RefCacheError", "FileNotFoundError", "FileExistsError",
                "NonFiniteError"}

_SECRET = re.compile(r"token|secret|password|api_key|apikey|credential", re.IGNORECASE)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the scripts' copy-paste launch commands intact and shows every default."""


def parse_config(dataclass_types: tuple, argv: list[str] | None = None, description: str | None = None,
                 yaml_ignore: tuple = ()):
    """Parses `--config FILE.yaml` then the command line (which overrides the YAML) into dataclasses.

    Unknown YAML keys are an error (a typo must not be silently ignored), except keys of `yaml_ignore`
    groups: one recipe file serves several scripts (the precompute ignores the optimizer's keys).
    Returns one instance per type.
    """
    parser = HfArgumentParser(dataclass_types, description=description, formatter_class=_HelpFormatter)
    parser.add_argument("--config", type=str, default=None,
                        help="YAML file of flag values; flags given on the command line override it.")
    argv = sys.argv[1:] if argv is None else argv
    known, _ = parser.parse_known_args(argv)
    if known.config:
        values = yaml.safe_load(Path(known.config).read_text()) or {}
        valid = {f.name for dc in dataclass_types for f in fields(dc)}
        ignored = {f.name for dc in yaml_ignore for f in fields(dc)} - valid
        unknown = sorted(set(values) - valid - ignored)
        if unknown:
            raise ValueError(f"{known.config}: unknown keys {unknown}")
        parser.set_defaults(**{k: v for k, v in values.items() if k in valid})
    # The extra --config flag comes back as one trailing argparse Namespace: drop it.
    parsed = parser.parse_args_into_dataclasses(argv)
    return tuple(p for p in parsed if is_dataclass(p))


def resolved_config(*configs) -> dict:
    """All fields of the given dataclasses as one flat dict, with secret-looking values redacted."""
    out = {}
    for cfg in configs:
        for key, value in asdict(cfg).items():
            out[key] = "<redacted>" if _SECRET.search(key) and value else value
    return out


def save_config(path: str | Path, *configs) -> None:
    """Writes the resolved configuration as YAML (loadable again with --config)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(json.loads(json.dumps(resolved_config(*configs))), sort_keys=False))
