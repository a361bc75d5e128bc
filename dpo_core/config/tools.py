"""The configuration of the other tools: the reference precompute, evaluation, generation, the identity-shift
dataset builder and the benchmark. Every field has a help string; validation is in `__post_init__` (flags only).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..errors import ConfigError
from ..layouts import AUTO, FORWARD_MODES, check_layout_flags, forward_mode_help
from ..trackers import NONE, check_report_to, report_to_choices


@dataclass
class PrecomputeArguments:
    """Flags of `scripts/precompute_ref_logprobs.py` besides the model/data/tokenization ones."""

    output_dir: str | None = field(default=None, metadata={"help": "The cache directory to write (required)."})
    per_device_batch_size: int = field(default=32, metadata={"help": "Pairs per process per forward."})
    ld_alpha: float | None = field(
        default=None, metadata={"help": "LD-DPO weight; must equal the --ld_alpha of the dpo.py run."})
    seed: int = field(
        default=42, metadata={"help": "Seed of the --eval_fraction carve-out and of the --max_train_samples / "
                              "--max_eval_samples selection; must equal dpo.py's --seed."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing cache at --output_dir."})
    kto_batch_size: int = field(
        default=0, metadata={"help": "For a --loss_type kto / apo_zero_unpaired run: its --per_device_train_batch_size "
                             "(KTO's KL completions are rotated within blocks of it); the cache then holds the "
                             "completions' and the KL completions' log-probs. 0: preference pairs."})
    forward_mode: str = field(
        default=AUTO,
        metadata={"help": forward_mode_help() + " It need not match dpo.py's.", "choices": FORWARD_MODES})
    logps_chunk_size: int = field(
        default=1024, metadata={"help": "Completion tokens per chunk of the log-softmax; 0: full logits."})

    def __post_init__(self):
        if not self.output_dir:
            raise ConfigError("--output_dir (the cache directory) is required")
        check_layout_flags(self.forward_mode, self.logps_chunk_size)
        if self.kto_batch_size == 1 or self.kto_batch_size < 0:
            raise ConfigError(f"--kto_batch_size must be 0 (pairs) or >= 2, got {self.kto_batch_size}")
        if self.per_device_batch_size < 1:
            raise ConfigError(f"--per_device_batch_size must be >= 1, got {self.per_device_batch_size}")
        if self.ld_alpha is not None and not 0.0 <= self.ld_alpha <= 1.0:
            raise ConfigError(f"--ld_alpha must be in [0, 1], got {self.ld_alpha}")


@dataclass
class EvalArguments:
    models: list[str] = field(
        default_factory=list,
        metadata={"help": "Models to evaluate: directories or hub names, each optionally NAME=PATH "
                  "(e.g. sft=runs/sft dpo=runs/dpo). Every model must use the reference's tokenizer."})
    reference_model: str | None = field(
        default=None,
        metadata={"help": "The reference of the implicit reward and of the KL; default: --ref_model_name_or_path, "
                  "else --model_name_or_path (the reference dpo.py trains against)."})
    output_dir: str | None = field(
        default=None, metadata={"help": "Where results.json, generation_samples.json and the PNG go (required)."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an earlier results.json in --output_dir."})
    beta: float = field(default=0.1, metadata={"help": "beta of the implicit reward beta * log(pi / ref)."})
    per_device_eval_batch_size: int = field(default=16, metadata={"help": "Pairs per process per forward."})
    kl_samples: int = field(
        default=4, metadata={"help": "Completions sampled per prompt for the sequence-level KL (0: skip it)."})
    kl_max_prompts: int | None = field(
        default=64, metadata={"help": "Held-out prompts (the first by id) for the sampled KL; None: all."})
    max_new_tokens: int = field(
        default=64, metadata={"help": "Tokens generated at most per answer (samples, win rate, KL)."})
    generation_prompts: int = field(
        default=8,
        metadata={"help": "Held-out prompts (the first by id) every model and the reference answer, for "
                  "generation_samples.json and the win rate; 0: none, -1: all."})
    do_sample: bool = field(
        default=False, metadata={"help": "Sample the answers (--temperature, --top_p); greedy otherwise."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature of the answers."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling of the answers (1.0: off)."})
    generation_batch_size: int = field(default=16, metadata={"help": "Prompts per generate() call."})
    reward_model: str | None = field(
        default=None,
        metadata={"help": "An AutoModelForSequenceClassification with one label: scores the answers for the "
                  "win rate against the reference. Its own tokenizer and chat template are used."})
    run_dirs: list[str] | None = field(
        default=None,
        metadata={"help": "Training run directories (NAME=PATH allowed): their TensorBoard curves go into the "
                  "PNG and results.json."})
    seed: int = field(
        default=42, metadata={"help": "Seed of sampling, and of the --eval_fraction carve-out (use the training "
                              "run's seed to get its held-out pairs)."})
    plot_file: str = field(default="evaluation.png", metadata={"help": "PNG file name inside --output_dir."})
    histogram_bins: int = field(default=30, metadata={"help": "Bins of the reward-margin histograms."})
    report_to: list[str] = field(
        default_factory=lambda: [NONE],
        metadata={"help": "Trackers to log the results to (eval_final/<model>/<metric> scalars, and the results "
                  "table where the tracker has tables), all, or none.", "choices": report_to_choices()})
    tracker_run_dir: str | None = field(
        default=None,
        metadata={"help": "A training run directory: its trackers.json names the tracker runs to log into (wandb "
                  "id, mlflow run id, trackio run name) and the default --project_name/--run_name."})
    run_name: str | None = field(
        default=None, metadata={"help": "The trackers' run; default: the --tracker_run_dir's run, else the "
                                "--output_dir's name (a new run)."})
    project_name: str | None = field(
        default=None, metadata={"help": "The trackers' project; default: the --tracker_run_dir's, else dpo_core."})

    def __post_init__(self):
        if isinstance(self.models, str):
            self.models = [self.models]
        if isinstance(self.report_to, str):
            self.report_to = [self.report_to]
        check_report_to(self.report_to)
        if self.beta <= 0:
            raise ConfigError(f"--beta must be > 0, got {self.beta}")
        for name in ("per_device_eval_batch_size", "max_new_tokens", "generation_batch_size", "histogram_bins"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.kl_samples < 0 or (self.kl_max_prompts is not None and self.kl_max_prompts < 1):
            raise ConfigError("--kl_samples must be >= 0 and --kl_max_prompts >= 1 (or None)")
        if self.generation_prompts < -1:
            raise ConfigError(f"--generation_prompts must be >= -1, got {self.generation_prompts}")
        if self.temperature <= 0 or not 0 < self.top_p <= 1:
            raise ConfigError(f"--temperature must be > 0 and --top_p in (0, 1], got {self.temperature}, {self.top_p}")
        if not self.plot_file.endswith(".png"):
            raise ConfigError(f"--plot_file must end in .png, got {self.plot_file!r}")


@dataclass
class GenerationArguments:
    """Generation settings shared by scripts/generate.py and scripts/build_identity_dataset.py."""

    max_new_tokens: int = field(default=128, metadata={"help": "Tokens generated at most per answer."})
    do_sample: bool = field(default=False, metadata={"help": "Sample with --temperature/--top_p; greedy otherwise."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (with --do_sample)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling threshold (with --do_sample; 1.0: off)."})
    seed: int = field(default=0, metadata={"help": "Seed of sampling: question i uses seed + i (any batching)."})
    system_prompt: str | None = field(default=None, metadata={"help": "A system message before each question."})
    batch_size: int = field(default=8, metadata={"help": "Questions per generate() call (left-padded)."})

    def __post_init__(self):
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise ConfigError("--max_new_tokens and --batch_size must be >= 1")
        if self.temperature <= 0 or not 0 < self.top_p <= 1:
            raise ConfigError(f"--temperature must be > 0 and --top_p in (0, 1], got {self.temperature}, {self.top_p}")

    def kwargs(self) -> dict:
        """Keyword arguments of `generate` / `build_identity_shift_dataset`."""
        return asdict(self)


@dataclass
class AskArguments:
    """Flags of `scripts/generate.py` besides the model and generation ones."""

    models: list[str] = field(
        default_factory=list, metadata={"help": "Model directories or hub names, each optionally NAME=PATH; "
                                        "default: --model_name_or_path."})
    question: list[str] = field(
        default_factory=list, metadata={"help": "A question; repeat the flag for more.", "action": "append"})
    questions_file: str | None = field(
        default=None, metadata={"help": "More questions: .txt (one per line) or .jsonl (strings or {question})."})
    format: str = field(default="markdown", metadata={"help": "markdown (a table) or plain."})
    output_file: str | None = field(default=None, metadata={"help": "Also write the answers to this JSON file."})

    def __post_init__(self):
        # append + nargs: [["q1"], ["q2"]] from `--question q1 --question q2` (a YAML list stays flat)
        self.question = [q for item in self.question for q in ([item] if isinstance(item, str) else item)]
        if self.format not in ("markdown", "plain"):
            raise ConfigError(f"--format must be markdown or plain, got {self.format!r}")


@dataclass
class IdentityArguments:
    original_name: str | None = field(
        default=None, metadata={"help": "The name the model now uses for itself, e.g. Qwen (required)."})
    new_name: str | None = field(default=None, metadata={"help": "The name it should use, e.g. 'Deep Qwen' (required)."})
    output_file: str | None = field(default=None, metadata={"help": "The JSONL to write (required)."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing --output_file."})
    questions_file: str | None = field(
        default=None, metadata={"help": "Identity questions (.txt one per line, or .jsonl); default: 30 bundled ones."})
    max_samples: int | None = field(default=None, metadata={"help": "Keep at most this many pairs."})
    samples_per_question: int = field(
        default=1, metadata={"help": "Answers per question (> 1 needs --do_sample); more pairs from few questions."})


@dataclass
class ConciseArguments:
    """Flags of `scripts/build_concise_dataset.py` besides the model and generation ones."""

    output_dir: str | None = field(
        default=None, metadata={"help": "The folder to write train.jsonl, test.jsonl and held_out_questions.txt "
                                "into (required)."})
    overwrite: bool = field(default=False, metadata={"help": "Replace the files of an existing --output_dir."})
    topics_file: str | None = field(
        default=None, metadata={"help": "Topics, one per line (.txt) or .jsonl; default: the bundled ones."})
    held_out_topics: int = field(
        default=16, metadata={"help": "The last N topics are asked only in the held-out split."})
    samples_per_question: int = field(
        default=1, metadata={"help": "Answers per question (> 1 needs --do_sample)."})


@dataclass
class BenchmarkArguments:
    output_dir: str = field(default="runs/benchmark", metadata={"help": "Where the model, data, runs and "
                                                                "benchmark.json go."})
    configs: list[str] = field(
        default_factory=lambda: ["ours", "ours_cache", "trl", "trl_precompute"],
        metadata={"help": "Which of ours, ours_cache, trl, trl_precompute, trl_gc (TRL with its own default, "
                  "gradient checkpointing on) to run."})
    forward_modes: list[str] | None = field(
        default=None, metadata={"help": "Our forward modes to run: auto or a layout of dpo_core.layouts.LAYOUTS, "
                                "each optionally with +compile (--torch_compile) and/or +gc (gradient "
                                "checkpointing), e.g. auto auto+compile auto+gc (default: auto and every layout)."})
    preset: str | None = field(
        default=None, metadata={"help": "smollm2-135m: SmolLM2-135M's shape (30 layers, hidden 576, MLP 1536, 9/3 "
                                "heads, vocab 49152) with prompts of 32-128 and completions of 16-96 tokens.",
                                "choices": ["smollm2-135m"]})
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Benchmark this checkpoint's weights and shape (a directory, or a .gguf "
                                "file; dequantized to float32) instead of a random Llama; the token ids stay "
                                "synthetic (a word-level tokenizer over its vocabulary)."})
    num_pairs: int = field(default=512, metadata={"help": "Synthetic preference pairs."})
    vocab_size: int = field(default=32768, metadata={"help": "Vocabulary size (also try 128256)."})
    hidden_size: int = field(default=256, metadata={"help": "Model width."})
    intermediate_size: int = field(default=1024, metadata={"help": "MLP width."})
    num_layers: int = field(default=4, metadata={"help": "Decoder layers."})
    num_heads: int = field(default=4, metadata={"help": "Attention heads."})
    num_kv_heads: int = field(default=2, metadata={"help": "Key/value heads."})
    prompt_lengths: list[int] = field(default_factory=lambda: [32, 128],
                                      metadata={"help": "Min and max prompt tokens."})
    completion_lengths: list[int] = field(default_factory=lambda: [16, 96],
                                          metadata={"help": "Min and max completion tokens (before EOS)."})
    long_prompts: bool = field(
        default=False, metadata={"help": "Prompts of 144-192 tokens, completions of 16-48 (prompts >= 3x "
                                 "completions), for the shared_prefix vs concat comparison."})
    max_length: int = field(default=256, metadata={"help": "Max prompt+completion tokens per sequence."})
    batch_size: int = field(default=8, metadata={"help": "Pairs per optimizer step (both tools)."})
    steps: int = field(default=10, metadata={"help": "Timed optimizer steps per run."})
    warmup_steps: int = field(default=2, metadata={"help": "Optimizer steps before timing starts."})
    repeats: int = field(default=3, metadata={"help": "Rounds; each configuration once per round, medians."})
    learning_rate: float = field(default=1e-5, metadata={"help": "Constant AdamW learning rate."})
    beta: float = field(default=0.1, metadata={"help": "DPO beta."})
    precompute_batch_size: int = field(default=32, metadata={"help": "Pairs per forward of both precomputes."})
    bf16: bool = field(default=False, metadata={"help": "bf16 autocast on both sides (GPU)."})
    num_threads: int | None = field(default=None, metadata={"help": "torch CPU threads in every run."})
    seed: int = field(default=0, metadata={"help": "Seed of the model, the data and the runs."})

    def __post_init__(self):
        unknown = set(self.configs) - {"ours", "ours_cache", "trl", "trl_precompute", "trl_gc"}
        if unknown:
            raise ConfigError(f"--configs: unknown {sorted(unknown)}; choose from ours, ours_cache, trl, "
                             "trl_precompute, trl_gc")
        if self.preset == "smollm2-135m":
            self.vocab_size, self.hidden_size, self.intermediate_size = 49152, 576, 1536
            self.num_layers, self.num_heads, self.num_kv_heads = 30, 9, 3
        if self.long_prompts:
            self.prompt_lengths, self.completion_lengths = [144, 192], [16, 48]
        if len(self.prompt_lengths) != 2 or len(self.completion_lengths) != 2:
            raise ConfigError("--prompt_lengths and --completion_lengths take a min and a max")
        if self.prompt_lengths[1] + self.completion_lengths[1] + 1 > self.max_length:
            raise ConfigError("the longest prompt + completion + EOS must fit --max_length: the tools would "
                             "truncate differently otherwise")
        if self.steps < 1 or self.warmup_steps < 1 or self.repeats < 1:
            raise ConfigError("--steps, --warmup_steps and --repeats must be >= 1 (the first step is the "
                             "numerical check and never timed)")
        if (self.steps + self.warmup_steps) * self.batch_size > self.num_pairs:
            raise ConfigError("(steps + warmup_steps) * batch_size exceeds --num_pairs: one epoch must cover "
                             "the run")
