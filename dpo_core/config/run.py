"""The configuration of training runs: model, data (tokenization), DPO and training groups, and the flat
`DPOConfig` / `SFTConfig` of the Python API. Every field has a help string; validation is in `__post_init__`
(flags only: files and models are checked where they are loaded).

Field names follow TRL's `DPOConfig` / transformers' `TrainingArguments` so users switch without relearning.
Past ~450 lines on purpose: one declaration per flag with its help text (what `--help` and the docs show), and
nothing else but each group's validation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from ..errors import ConfigError
from ..layouts import AUTO, FORWARD_MODES, check_layout_flags, forward_mode_help
from ..losses import LOSSES, UNPAIRED_LOSSES, needs_reference
from ..optim import OPTIMIZERS, parse_optim_args, parse_scheduler_kwargs
from ..tokenized import TokenizeSettings  # noqa: F401  (re-exported; DataArguments extends it)
from ..trackers import DEFAULT_PROJECT, check_report_to, report_to_choices


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Policy model: a local directory or a hub name (required)."})
    ref_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Reference model; default: the policy's initial weights."})
    revision: str | None = field(default=None, metadata={"help": "Hub revision (branch, tag or commit)."})
    gguf_file: str | None = field(
        default=None,
        metadata={"help": "A GGUF checkpoint inside --model_name_or_path (e.g. model.Q4_1.gguf; `pip install gguf`): "
                  "dequantized to --torch_dtype; the trained model is saved as safetensors. A --model_name_or_path "
                  "that is itself a .gguf file works too."})
    ref_gguf_file: str | None = field(
        default=None, metadata={"help": "The GGUF file inside --ref_model_name_or_path, when that is a GGUF checkpoint."})
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
            raise ConfigError(f"--torch_dtype must be float32, bfloat16, float16 or auto, got {self.torch_dtype!r}")
        self._validate_lora()

    def reference_path(self) -> str | None:
        """The reference model: `--ref_model_name_or_path`, else the policy's initial weights."""
        return self.ref_model_name_or_path or self.model_name_or_path

    def _validate_lora(self):
        if isinstance(self.lora_target_modules, str):
            self.lora_target_modules = [self.lora_target_modules]
        if self.load_in_4bit and self.load_in_8bit:
            raise ConfigError("Give --load_in_4bit or --load_in_8bit, not both.")
        # --load_in_4bit/8bit and --merge_adapter need LoRA: checked where the model is loaded
        # (`dpo_core.modeling.load_model_from_args`), since a --model_name_or_path holding an adapter implies it.
        if self.lora_r < 1:
            raise ConfigError(f"--lora_r must be >= 1, got {self.lora_r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"--lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not self.lora_target_modules:
            raise ConfigError("--lora_target_modules needs at least one name (or all-linear)")
        if "all-linear" in self.lora_target_modules and len(self.lora_target_modules) > 1:
            raise ConfigError("--lora_target_modules: all-linear stands alone, got "
                             f"{self.lora_target_modules}")


@dataclass
class DataArguments(TokenizeSettings):
    dataset_name: list[str] | None = field(
        default=None,
        metadata={"help": "A .jsonl/.json/.parquet file, a folder of <split>.<ext> files, or a hub dataset name; or "
                  "a mixture of several, each NAME[:SPLIT][:FRACTION|COUNT] (data/a.jsonl:0.5 org/set:train:2000): a "
                  "seeded selection of each, concatenated."})
    dataset_mixture: str | None = field(
        default=None,
        metadata={"help": "A mixture as a YAML block (or JSON on the command line): {datasets: [{id, split, weight "
                  "| count}, ...]}; instead of --dataset_name."})
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    dataset_split: str = field(default="train", metadata={"help": "Training split."})
    eval_split: str | None = field(default=None, metadata={"help": "Held-out split for evaluation (e.g. test)."})
    eval_fraction: float = field(
        default=0.0, metadata={"help": "Carve this fraction of the training split out as held-out (seeded)."})
    on_invalid: str = field(
        default="error",
        metadata={"help": "error: stop before training, listing every bad record; skip: drop them and list them "
                  "in invalid_records.jsonl (dpo.py: in --output_dir; the precompute: <output_dir>.invalid_records.jsonl)."})

    max_train_samples: int | None = field(
        default=None,
        metadata={"help": "Keep at most N training records: a random selection seeded by --seed (the same records "
                  "for the same seed), taken after loading (and after --eval_fraction) and before tokenization."})
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Keep at most N held-out records (seeded like --max_train_samples)."})

    data_cache_dir: str | None = field(
        default=None,
        metadata={"help": "Where tokenized data is stored once and memory-mapped by every later run and stage with "
                  "the same records, tokenizer and settings (default: $DPO_CORE_CACHE, else ~/.cache/dpo_core/data; "
                  "safe to delete). 'none': tokenize in memory, store nothing."})
    dataset_num_proc: int | None = field(
        default=None, metadata={"help": "Worker processes that tokenize (default: the available cores)."})

    def cache_location(self) -> str | None:
        """The prepared-data store's folder, "default", or None (`--data_cache_dir none`)."""
        if self.data_cache_dir is None:
            return "default"
        return None if self.data_cache_dir.lower() == "none" else self.data_cache_dir

    def __post_init__(self):
        TokenizeSettings.__post_init__(self)
        # One string downstream: a name, or a mixture's sources separated by spaces (dpo_core.records.parse_sources).
        if isinstance(self.dataset_name, (list, tuple)):
            self.dataset_name = " ".join(map(str, self.dataset_name)) or None
        if self.dataset_mixture is not None:
            from ..records import mixture_spec

            if self.dataset_name:
                raise ConfigError("give --dataset_name or dataset_mixture, not both")
            mixture = self.dataset_mixture
            if isinstance(mixture, str):
                try:
                    mixture = json.loads(mixture)
                except json.JSONDecodeError as e:
                    raise ConfigError(f"--dataset_mixture: not valid JSON ({e})") from None
            self.dataset_name, self.dataset_mixture = mixture_spec(mixture), None
        if self.dataset_name:
            from ..records import parse_sources

            parse_sources(self.dataset_name)  # a malformed mixture fails at parse time, before any model loads
        if self.dataset_num_proc is not None and self.dataset_num_proc < 1:
            raise ConfigError(f"--dataset_num_proc must be >= 1, got {self.dataset_num_proc}")
        for name in ("max_train_samples", "max_eval_samples"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.on_invalid not in ("error", "skip"):
            raise ConfigError(f"--on_invalid must be error or skip, got {self.on_invalid!r}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"--eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.eval_split and self.eval_fraction:
            raise ConfigError("Give --eval_split or --eval_fraction, not both.")


@dataclass
class DPOArguments:
    beta: float = field(default=0.1, metadata={"help": "Strength of the KL constraint to the reference."})
    loss_type: list[str] = field(
        default_factory=lambda: ["sigmoid"],
        metadata={"help": f"One or more of: {', '.join(LOSSES)} (TRL's names), or one unpaired loss: "
                  f"{', '.join(UNPAIRED_LOSSES)} (KTO data, docs/losses.md). Several are summed with "
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
    simpo_gamma: float = field(
        default=0.5, metadata={"help": "simpo: target reward margin gamma >= 0 (TRL CPOConfig's simpo_gamma)."})
    cpo_alpha: float = field(
        default=1.0,
        metadata={"help": "cpo, simpo: weight >= 0 of the NLL of the chosen completions (TRL CPOConfig's cpo_alpha; "
                  "0 with simpo: pure SimPO)."})
    alphapo_alpha: float = field(
        default=0.0,
        metadata={"help": "simpo, cpo: AlphaPO reward shape, r = (1 - p^-alpha) / alpha (TRL CPOConfig's alpha); "
                  "0: the log-prob reward (SimPO, CPO)."})
    desirable_weight: float = field(
        default=1.0, metadata={"help": "kto, apo_zero_unpaired: weight of the desirable examples' losses (TRL "
                               "KTOConfig's desirable_weight)."})
    undesirable_weight: float = field(
        default=1.0, metadata={"help": "kto, apo_zero_unpaired: weight of the undesirable examples' losses."})
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
        unknown = [name for name in self.loss_type if name not in LOSSES and name not in UNPAIRED_LOSSES]
        if unknown:
            raise ConfigError(f"Unknown --loss_type {unknown}; choose from {sorted([*LOSSES, *UNPAIRED_LOSSES])}")
        if any(name in UNPAIRED_LOSSES for name in self.loss_type) and len(self.loss_type) > 1:
            raise ConfigError(f"--loss_type {' '.join(self.loss_type)}: an unpaired loss "
                              f"({', '.join(UNPAIRED_LOSSES)}) trains alone, on unpaired examples")
        if self.desirable_weight <= 0 or self.undesirable_weight <= 0:
            raise ConfigError("--desirable_weight and --undesirable_weight must be > 0")
        if self.unpaired_loss():
            given = [flag for flag, on in (("--reference_free", self.reference_free), ("--use_weighting",
                     self.use_weighting), ("--ld_alpha", self.ld_alpha is not None),
                     ("--label_smoothing", self.label_smoothing)) if on]
            if given:
                raise ConfigError(f"{' '.join(given)} apply to paired losses, not to --loss_type {self.loss_type[0]}")
        if self.loss_weights is not None and len(self.loss_weights) != len(self.loss_type):
            raise ConfigError(f"--loss_weights has {len(self.loss_weights)} values for "
                             f"{len(self.loss_type)} loss types")
        if self.beta <= 0:
            raise ConfigError(f"--beta must be > 0, got {self.beta}")
        if self.ld_alpha is not None and not 0.0 <= self.ld_alpha <= 1.0:
            raise ConfigError(f"--ld_alpha must be in [0, 1], got {self.ld_alpha}")
        if self.reference_free and self.ref_logprobs:
            raise ConfigError("--reference_free and --ref_logprobs exclude each other.")
        if self.simpo_gamma < 0:
            raise ConfigError(f"--simpo_gamma must be >= 0, got {self.simpo_gamma}")
        if self.cpo_alpha < 0:
            raise ConfigError(f"--cpo_alpha must be >= 0, got {self.cpo_alpha}")
        if not needs_reference(self.loss_type) and self.ref_logprobs:
            raise ConfigError(f"--ref_logprobs is unused: --loss_type {' '.join(self.loss_type)} needs no reference.")
        if self.sync_ref_model:
            if self.ref_logprobs or self.reference_free:
                raise ConfigError("--sync_ref_model updates a reference model during training: it cannot be used with "
                                 f"{'--ref_logprobs (a cache is fixed)' if self.ref_logprobs else '--reference_free'}.")
            if not self.uses_reference():
                raise ConfigError(f"--sync_ref_model needs a reference: --loss_type {' '.join(self.loss_type)} "
                                  "reads none.")
            if not 0.0 <= self.ref_model_mixup_alpha <= 1.0:
                raise ConfigError(f"--ref_model_mixup_alpha must be in [0, 1], got {self.ref_model_mixup_alpha}")
            if self.ref_model_sync_steps < 1:
                raise ConfigError(f"--ref_model_sync_steps must be >= 1, got {self.ref_model_sync_steps}")

    def unpaired_loss(self) -> str | None:
        """The unpaired loss (kto, apo_zero_unpaired) this run trains with, if any."""
        return self.loss_type[0] if self.loss_type[0] in UNPAIRED_LOSSES else None

    def uses_reference(self) -> bool:
        """Whether the run reads reference log-probs: not --reference_free, and some --loss_type needs them."""
        return not self.reference_free and needs_reference(self.loss_type)

    def loss_kwargs(self) -> dict:
        """Keyword arguments of `dpo_core.losses.dpo_loss`."""
        return dict(loss_type=self.loss_type, loss_weights=self.loss_weights, beta=self.beta,
                    label_smoothing=self.label_smoothing, reference_free=self.reference_free,
                    f_divergence_type=self.f_divergence_type,
                    f_alpha_divergence_coef=self.f_alpha_divergence_coef, discopop_tau=self.discopop_tau,
                    simpo_gamma=self.simpo_gamma, cpo_alpha=self.cpo_alpha, alphapo_alpha=self.alphapo_alpha)


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
    optim: str = field(
        default="adamw_torch",
        metadata={"help": "Optimizer, transformers' names: adamw_torch, adamw_torch_fused, adafactor (transformers' "
                  "Adafactor, fixed learning rate), sgd, and bitsandbytes' adamw_8bit, paged_adamw_8bit, "
                  "paged_adamw_32bit, lion_8bit (`pip install -e \".[quant]\"`; CUDA, XPU or CPU, where paged "
                  "ones run unpaged). Biases and norm weights get no weight decay with every optimizer.",
                  "choices": list(OPTIMIZERS)})
    optim_args: str | None = field(
        default=None,
        metadata={"help": "Extra optimizer arguments as transformers' \"k=v,k=v\" string (e.g. momentum=0.9,"
                  "nesterov=True for sgd); an argument the optimizer does not take is an error."})
    lr_scheduler_kwargs: dict | str | None = field(
        default=None,
        metadata={"help": "Extra arguments of the scheduler, a JSON object (e.g. '{\"num_cycles\": 2}' for "
                  "cosine_with_restarts), as transformers' lr_scheduler_kwargs."})
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
    report_to: list[str] = field(
        default_factory=lambda: ["tensorboard"],
        metadata={"help": "Trackers to log to (several at once, through accelerate; docs/training.md), all (every "
                  "one installed) or none.", "choices": report_to_choices()})
    run_name: str | None = field(
        default=None, metadata={"help": "The run's name in the trackers; default: the --output_dir's name."})
    project_name: str = field(
        default=DEFAULT_PROJECT,
        metadata={"help": "The trackers' project (wandb/trackio project, mlflow experiment; TensorBoard: the folder "
                  "under <output_dir>/logs)."})
    dataloader_num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes."})
    forward_mode: str = field(default=AUTO, metadata={"help": forward_mode_help(), "choices": FORWARD_MODES})
    logps_chunk_size: int = field(
        default=1024,
        metadata={"help": "Completion tokens per chunk of the float32 log-softmax over the vocabulary, recomputed "
                  "in backward: the [2B, T, V] logits never exist at once (and a chunk never holds more than 2^24 "
                  "logits: 512 tokens at a 32k vocabulary, 128 at 128k). 0: the model's full logits."})
    pad_to_multiple_of: int | None = field(
        default=None,
        metadata={"help": "Pad each batch's rows to a multiple of this many tokens (fewer distinct shapes: what "
                  "--torch_compile recompiles for). Default: none, or 64 with --torch_compile."})
    torch_compile: bool = field(
        default=False,
        metadata={"help": "Compile the policy's (and an online reference's) decoder blocks with torch.compile, each "
                  "block in place (regional compilation, as accelerate does): the chunked head, every layout, LoRA, "
                  "checkpoints and several processes work as in eager mode. Graphs compiled are logged."})
    torch_compile_mode: str | None = field(
        default=None, metadata={"help": "torch.compile mode (default, reduce-overhead, max-autotune, "
                                "max-autotune-no-cudagraphs); implies --torch_compile.",
                                "choices": ["default", "reduce-overhead", "max-autotune",
                                            "max-autotune-no-cudagraphs"]})
    torch_compile_backend: str | None = field(
        default=None, metadata={"help": "torch.compile backend (default inductor; aot_eager compiles fast, for "
                                "checks); implies --torch_compile."})
    log_example_ids: bool = field(
        default=False,
        metadata={"help": "Audit the data order: append each micro-batch's example ids (per rank, with step, epoch "
                  "and position) to output_dir/example_ids/rank{R}.jsonl."})
    debug: bool = field(
        default=False,
        metadata={"help": "Preset for a first run on a new dataset or cluster (dpo_core/debug.py): "
                  "--max_train_samples 256 --max_eval_samples 64 --eval_steps 5 --save_steps 5 --logging_steps 1, "
                  "autograd anomaly detection, and runs/debug-<timestamp> without --output_dir. Flags given "
                  "explicitly win over the preset."})
    push_to_hub: bool = field(
        default=False,
        metadata={"help": "Upload the final output directory (model, tokenizer, README.md model card, config, "
                  "results, logs) to the Hugging Face Hub from the main process. The token comes from HF_TOKEN or "
                  "`huggingface-cli login`, never from a flag."})
    hub_model_id: str | None = field(
        default=None,
        metadata={"help": "Hub repository (namespace/name); default: the name of --output_dir in your namespace, "
                  "as transformers does."})
    hub_private_repo: bool = field(
        default=False, metadata={"help": "Create the repository private (default: the hub's default, public)."})
    hub_revision: str | None = field(
        default=None, metadata={"help": "Branch to push to (created from main when missing); default: main."})
    hub_strategy: str = field(
        default="end",
        metadata={"help": "end: push the final output directory once; checkpoint: also push each committed "
                  "checkpoint (needs --save_steps) into the repository's last-checkpoint/ folder, replacing the "
                  "previous one, as transformers does (resume from it after downloading).",
                  "choices": ["end", "checkpoint"]})
    peak_flops: float | None = field(
        default=None, metadata={"help": "Peak FLOP/s of one device for the logged train/mfu (default: the bf16 "
                                "dense peak of a known GPU, else a matmul rate measured at startup)."})

    def __post_init__(self):
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            raise ConfigError("Give --max_steps > 0 or --num_train_epochs > 0.")
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                     "logging_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if isinstance(self.report_to, str):
            self.report_to = [self.report_to]
        check_report_to(self.report_to)
        check_layout_flags(self.forward_mode, self.logps_chunk_size)
        if self.torch_compile_mode or self.torch_compile_backend:
            self.torch_compile = True
        if self.torch_compile and self.pad_to_multiple_of is None:
            self.pad_to_multiple_of = 64
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of < 1:
            raise ConfigError(f"--pad_to_multiple_of must be >= 1, got {self.pad_to_multiple_of}")
        if self.optim not in OPTIMIZERS:
            raise ConfigError(f"Unknown --optim {self.optim!r}; choose from {', '.join(OPTIMIZERS)}")
        parse_optim_args(self.optim_args)
        self.lr_scheduler_kwargs = parse_scheduler_kwargs(self.lr_scheduler_kwargs) or None
        if self.hub_strategy not in ("end", "checkpoint"):
            raise ConfigError(f"--hub_strategy must be end or checkpoint, got {self.hub_strategy!r}")
        if not self.push_to_hub:
            given = [f"--{name}" for name in ("hub_model_id", "hub_private_repo", "hub_revision")
                     if getattr(self, name)] + (["--hub_strategy"] if self.hub_strategy != "end" else [])
            if given:
                raise ConfigError(f"{' '.join(given)} unused: add --push_to_hub")


def _check_groups(config, flat_cls) -> None:
    """Runs the `__post_init__` of every group a flat config inherits (Python would run only the first's)."""
    for group in reversed(flat_cls.__bases__):
        group.__post_init__(config)


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
