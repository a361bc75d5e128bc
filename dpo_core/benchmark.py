"""Side-by-side benchmark of our DPO step and TRL's `DPOTrainer` (TRL: a benchmark-only extra).

One invocation (`scripts/benchmark.py`) builds a Llama-shaped random model and synthetic pairs of random
token ids, then runs every configuration in its own fresh process, interleaved over `--repeats` rounds:

- `ours/<mode>`: our loop (`dpo_core.training.train_loop` + `dpo_core.dpo.make_dpo_step`) with an online
  reference model, for every `--forward_mode` in `dpo_core.logps.FORWARDS`;
- `ours_cache/<mode>`: the same with reference log-probs from a cache that
  `scripts/precompute_ref_logprobs.py` builds first (in its own process; its time is reported apart);
- `trl`: `trl.DPOTrainer` with its online reference;
- `trl_precompute`: `DPOTrainer(precompute_ref_log_probs=True)` (its precompute time reported apart).

Fairness: the same model files (from_pretrained), the identical token ids (a word-level tokenizer maps each
synthetic word to one id; every worker hashes the ids it trains on and the parent asserts they agree), the
same batches in the same order (no shuffling on either side), float32 or bf16 autocast on both, AdamW with
the same hyper-parameters (`adamw_torch`, not TRL's fused default), constant learning rate, clipping at 1,
dropout off, no gradient checkpointing (TRL's default is on), no evaluation, no logging, no saving,
dataloader workers 0, `padding_free=False`. Timing covers the optimizer steps after `--warmup_steps` (each
side's own step loop, data loading included); setup, model loading, tokenization and precompute are
excluded. Peak memory is the process's peak RSS (`ru_maxrss`) on CPU, `torch.cuda.max_memory_allocated` on
GPU. MFU = model FLOPs of the timed steps (`dpo_core.throughput`) / time / peak, with the peak measured
once in the parent (a float32 matmul on CPU) or the GPU's bf16 dense peak.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
N_SPECIAL = 3  # ids 0, 1, 2: pad, eos, unk; synthetic words are "w<id>" for ids 3..vocab_size-1


@dataclass
class BenchmarkArguments:
    output_dir: str = field(default="runs/benchmark", metadata={"help": "Where the model, data, runs and "
                                                                "benchmark.json go."})
    configs: list[str] = field(
        default_factory=lambda: ["ours", "ours_cache", "trl", "trl_precompute"],
        metadata={"help": "Which of ours, ours_cache, trl, trl_precompute to run."})
    forward_modes: list[str] | None = field(
        default=None, metadata={"help": "Our forward modes to run (default: every mode in FORWARDS)."})
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
        unknown = set(self.configs) - {"ours", "ours_cache", "trl", "trl_precompute"}
        if unknown:
            raise ValueError(f"--configs: unknown {sorted(unknown)}; choose from ours, ours_cache, trl, "
                             "trl_precompute")
        if self.long_prompts:
            self.prompt_lengths, self.completion_lengths = [144, 192], [16, 48]
        if len(self.prompt_lengths) != 2 or len(self.completion_lengths) != 2:
            raise ValueError("--prompt_lengths and --completion_lengths take a min and a max")
        if self.prompt_lengths[1] + self.completion_lengths[1] + 1 > self.max_length:
            raise ValueError("the longest prompt + completion + EOS must fit --max_length: the tools would "
                             "truncate differently otherwise")
        if self.steps < 1 or self.warmup_steps < 1 or self.repeats < 1:
            raise ValueError("--steps, --warmup_steps and --repeats must be >= 1 (the first step is the "
                             "numerical check and never timed)")
        if (self.steps + self.warmup_steps) * self.batch_size > self.num_pairs:
            raise ValueError("(steps + warmup_steps) * batch_size exceeds --num_pairs: one epoch must cover "
                             "the run")


# ------------------------------------------------------------------------------------------------ inputs

def build_model_and_tokenizer(output_dir: Path, args: BenchmarkArguments) -> Path:
    """A random Llama (float32, safetensors) and a word-level tokenizer: word `w<i>` <-> token id i."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {PAD: 0, EOS: 1, UNK: 2, **{f"w{i}": i for i in range(N_SPECIAL, args.vocab_size)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=PAD, eos_token=EOS, unk_token=UNK,
                                        model_max_length=args.max_length)
    config = LlamaConfig(vocab_size=args.vocab_size, hidden_size=args.hidden_size,
                         intermediate_size=args.intermediate_size, num_hidden_layers=args.num_layers,
                         num_attention_heads=args.num_heads, num_key_value_heads=args.num_kv_heads,
                         max_position_embeddings=max(512, args.max_length), pad_token_id=0, eos_token_id=1,
                         bos_token_id=None, tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        model = LlamaForCausalLM(config)
    model.save_pretrained(output_dir, safe_serialization=True)
    tokenizer.save_pretrained(output_dir)
    return output_dir


def synthetic_pairs(args: BenchmarkArguments) -> list[dict[str, list[int]]]:
    """Seeded random token ids: `{"prompt_ids", "chosen_ids", "rejected_ids"}` (completions end with EOS)."""
    rng = random.Random(args.seed)

    def ids(lo, hi):
        return [rng.randrange(N_SPECIAL, args.vocab_size) for _ in range(rng.randint(lo, hi))]

    pairs = []
    for _ in range(args.num_pairs):
        prompt = ids(*args.prompt_lengths)
        chosen, rejected = ids(*args.completion_lengths), ids(*args.completion_lengths)
        while rejected == chosen:
            rejected = ids(*args.completion_lengths)
        pairs.append({"prompt_ids": prompt, "chosen_ids": chosen + [1], "rejected_ids": rejected + [1]})
    return pairs


def write_dataset(pairs: list[dict], data_dir: Path) -> Path:
    """`train.jsonl` of standard text records that the word-level tokenizer maps back to exactly the ids
    (EOS left out of the text: both tools append it)."""
    def text(ids):
        return " ".join(f"w{i}" for i in ids)

    data_dir.mkdir(parents=True, exist_ok=True)
    with open(data_dir / "train.jsonl", "w") as f:
        for p in pairs:
            f.write(json.dumps({"prompt": text(p["prompt_ids"]), "chosen": " " + text(p["chosen_ids"][:-1]),
                                "rejected": " " + text(p["rejected_ids"][:-1])}) + "\n")
    return data_dir


def token_hash(rows) -> str:
    """sha256 over (prompt, chosen, rejected) ids of every pair, in order."""
    digest = hashlib.sha256()
    for prompt, chosen, rejected in rows:
        digest.update(json.dumps([list(map(int, prompt)), list(map(int, chosen)), list(map(int, rejected))])
                      .encode())
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------- workers

def _peak_memory_mb() -> dict[str, float]:
    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # KiB on Linux
    if torch.cuda.is_available():
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    return out


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class _StepClock:
    """Records the time at the end of every optimizer step (wraps the scheduler our loop steps)."""

    def __init__(self, scheduler):
        self.scheduler, self.times = scheduler, []

    def step(self, *a, **k):
        self.scheduler.step(*a, **k)
        _sync()
        self.times.append(time.perf_counter())

    def __getattr__(self, name):
        return getattr(self.scheduler, name)


def run_ours(spec: dict) -> dict:
    from accelerate.utils import set_seed
    from torch.utils.data import DataLoader
    from transformers import get_scheduler

    from . import data as data_lib
    from .config import DataArguments, DPOArguments, ModelArguments, TrainArguments
    from .dpo import build_optimizer, load_reference_cache, make_dpo_step
    from .logps import FORWARDS, make_collator
    from .modeling import load_model, load_tokenizer
    from .training import make_accelerator, train_loop

    mode, steps = spec["forward_mode"], spec["warmup_steps"] + spec["steps"]
    accelerator = make_accelerator(mixed_precision="bf16" if spec["bf16"] else "no")
    set_seed(spec["seed"])
    model_args = ModelArguments(model_name_or_path=spec["model_dir"])
    data_args = DataArguments(dataset_name=spec["data_dir"], max_length=spec["max_length"])
    dpo_args = DPOArguments(beta=spec["beta"], ref_logprobs=spec.get("cache_dir"))
    train_args = TrainArguments(output_dir=spec["run_dir"], max_steps=steps, per_device_train_batch_size=spec["batch_size"],
                                learning_rate=spec["learning_rate"], lr_scheduler_type="constant",
                                logging_steps=steps, report_to="none", forward_mode=mode, seed=spec["seed"])
    tokenizer = load_tokenizer(spec["model_dir"])
    model = load_model(spec["model_dir"])
    records, examples = data_lib.prepare_from_args(data_args, tokenizer, seed=spec["seed"], report_path=None)
    train = examples["train"]
    collate = make_collator(mode, tokenizer.pad_token_id, model)
    ref_model = None
    if dpo_args.ref_logprobs:  # each batch carries its pairs' reference log-probs, as in dpo.py
        cache = load_reference_cache(dpo_args.ref_logprobs, model_args=model_args, data_args=data_args,
                                     dpo_args=dpo_args, tokenizer=tokenizer, records=records, examples=examples,
                                     mixed_precision=accelerator.mixed_precision, seed=spec["seed"])
        collate = cache.collate("train", collate)
    else:
        ref_model = load_model(spec["model_dir"], trainable=False).to(accelerator.device)
    loader = DataLoader(data_lib.PairDataset(train), batch_size=spec["batch_size"], shuffle=False,
                        collate_fn=collate)
    optimizer = build_optimizer(model, train_args)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    clock = _StepClock(get_scheduler("constant", optimizer))
    dpo_step = make_dpo_step(dpo_args, forward=FORWARDS[mode], ref_model=ref_model)
    first, tokens = [], []

    def step_fn(model, batch):
        loss, stats = dpo_step(model, batch)
        if len(first) < 2:  # the numerical check against TRL (warm-up steps, never timed)
            first.append({"loss": loss.item(), "logps_chosen": stats["logps/chosen"].mean().item(),
                          "logps_rejected": stats["logps/rejected"].mean().item()})
        tokens.append(int(batch["num_tokens"]))
        return loss, stats

    _sync()
    clock.times.append(time.perf_counter())
    train_loop(accelerator, model, optimizer, clock, loader, step_fn, train_args, max_steps=steps)
    return {"step_end_times": clock.times, "first_steps": first, "step_tokens": tokens,
            "tokens_hash": token_hash((e.prompt_ids, e.chosen_ids, e.rejected_ids) for e in train),
            **_peak_memory_mb()}


def run_trl(spec: dict) -> dict:
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    steps = spec["warmup_steps"] + spec["steps"]
    times, first, tokens, precompute = [], [], [], []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            _sync()
            times.append(time.perf_counter())

    class Trainer(DPOTrainer):
        def _precompute_ref_logps(self, *a, **k):
            start = time.perf_counter()
            out = super()._precompute_ref_logps(*a, **k)
            precompute.append(time.perf_counter() - start)
            return out

        def _compute_loss(self, model, inputs, return_outputs):
            loss = super()._compute_loss(model, inputs, return_outputs)
            if len(first) < 2:
                metrics = self._metrics["train"]
                first.append({"loss": loss.item(), "logps_chosen": metrics["logps/chosen"][-1],
                              "logps_rejected": metrics["logps/rejected"][-1]})
            tokens.append(int(inputs["attention_mask"].sum()))
            return loss

    cuda = torch.cuda.is_available()
    config = DPOConfig(
        output_dir=spec["run_dir"], per_device_train_batch_size=spec["batch_size"], max_steps=steps,
        learning_rate=spec["learning_rate"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, optim="adamw_torch", max_grad_norm=1.0,
        beta=spec["beta"], loss_type=["sigmoid"], max_length=spec["max_length"], truncation_mode="keep_start",
        padding_free=False, disable_dropout=True, gradient_checkpointing=False, bf16=spec["bf16"], fp16=False,
        use_cpu=not cuda, precompute_ref_log_probs=spec["precompute"],
        precompute_ref_batch_size=spec["precompute_batch_size"], logging_strategy="no", save_strategy="no",
        eval_strategy="no", report_to=[], dataloader_num_workers=0, train_sampling_strategy="sequential",
        seed=spec["seed"], use_liger_kernel=False, torch_compile=False, disable_tqdm=True)
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32, use_safetensors=True)
    dataset = load_dataset("json", data_files=str(Path(spec["data_dir"]) / "train.jsonl"), split="train",
                           cache_dir=str(Path(spec["run_dir"]) / "hf-cache"))  # fresh: no precompute reuse
    trainer = Trainer(model=model, args=config, processing_class=tokenizer, train_dataset=dataset,
                      callbacks=[Clock()])
    times.append(time.perf_counter())
    trainer.train()
    ds = trainer.train_dataset
    return {"step_end_times": times, "first_steps": first, "step_tokens": tokens,
            "precompute_seconds": sum(precompute) if precompute else None,
            "tokens_hash": token_hash(zip(ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"])),
            "trl_config": {"per_device_train_batch_size": config.per_device_train_batch_size,
                           "learning_rate": config.learning_rate, "max_length": config.max_length,
                           "gradient_checkpointing": config.gradient_checkpointing,
                           "padding_free": trainer.padding_free, "optim": getattr(config.optim, "value", config.optim),
                           "precompute_ref_log_probs": config.precompute_ref_log_probs,
                           "train_sampling_strategy": config.train_sampling_strategy},
            **_peak_memory_mb()}


def run_worker(spec_path: str) -> None:
    """Runs one configuration (in a fresh process) and writes its result next to the spec."""
    spec = json.loads(Path(spec_path).read_text())
    if spec.get("num_threads"):
        torch.set_num_threads(spec["num_threads"])
    result = run_trl(spec) if spec["tool"] == "trl" else run_ours(spec)
    result["num_threads"] = torch.get_num_threads()
    tmp = Path(spec["result"] + ".tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, spec["result"])


# ------------------------------------------------------------------------------------------------ parent

def _env(args: BenchmarkArguments) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}
    if args.num_threads:
        env["OMP_NUM_THREADS"] = str(args.num_threads)
    if args.bf16:
        env["ACCELERATE_MIXED_PRECISION"] = "bf16"  # the precompute script's accelerator
    return env


def _run(cmd: list[str], log: Path, env: dict) -> tuple[float, float]:
    """Runs `cmd` to completion (output to `log`); returns (wall seconds, the child's peak RSS in MiB)."""
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage (peak RSS), not all children's
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}); last lines of {log}:\n"
                           + "\n".join(log.read_text().splitlines()[-30:]))
    return time.perf_counter() - start, usage.ru_maxrss / 1024


def build_cache(args, scripts_dir: Path, model_dir: Path, data_dir: Path, cache_dir: Path) -> dict:
    """Our reference cache, by `scripts/precompute_ref_logprobs.py` in its own process; its forward time is
    the seconds the script reports for the split (model loading and tokenization excluded, as for TRL)."""
    cmd = [sys.executable, str(scripts_dir / "precompute_ref_logprobs.py"), "--model_name_or_path", str(model_dir),
           "--dataset_name", str(data_dir), "--max_length", str(args.max_length), "--seed", str(args.seed),
           "--per_device_batch_size", str(args.precompute_batch_size), "--output_dir", str(cache_dir), "--overwrite"]
    log = cache_dir.with_suffix(".log")
    wall, rss = _run(cmd, log, _env(args))
    found = re.search(r"train: (\d+) pairs in ([0-9.]+) s", log.read_text())
    if not found:
        raise RuntimeError(f"no timing line in {log}")
    return {"precompute_seconds": float(found.group(2)), "wall_seconds": wall, "peak_rss_mb": rss}


def _configurations(args: BenchmarkArguments) -> list[str]:
    from .logps import FORWARDS

    modes = args.forward_modes or list(FORWARDS)
    unknown = set(modes) - set(FORWARDS)
    if unknown:
        raise ValueError(f"--forward_modes: {sorted(unknown)} not in {sorted(FORWARDS)}")
    names = []
    for config in args.configs:
        names += [f"{config}/{m}" for m in modes] if config.startswith("ours") else [config]
    return names


def step_flops(pairs: list[dict], args: BenchmarkArguments, n_params: int, model_config, online: bool,
               shared_prompt: bool = False) -> list[float]:
    """Model FLOPs of each step's batch (batches are the pairs in order: neither side shuffles), for the
    layout the configuration runs: 2B prompt+completion sequences, or B prompt+chosen+rejected ones
    (`shared_prompt`). The LM head counts on the completion tokens only (`dpo_core.throughput`)."""
    from .throughput import dpo_step_flops

    out = []
    for i in range(args.warmup_steps + args.steps):
        batch = pairs[i * args.batch_size:(i + 1) * args.batch_size]
        if shared_prompt:
            lengths = [len(p["prompt_ids"]) + len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in batch]
        else:
            lengths = [len(p["prompt_ids"]) + len(p[k]) for k in ("chosen_ids", "rejected_ids") for p in batch]
        scored = sum(len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in batch)
        out.append(dpo_step_flops(n_params, model_config, lengths, online_reference=online,
                                  scored_tokens=scored).item())
    return out


def summarize(name: str, runs: list[dict], args: BenchmarkArguments, flops: list[float], peak: float) -> dict:
    """Medians over repeats of one configuration's timed steps."""
    w = args.warmup_steps
    per_run = []
    for r in runs:
        t = r["step_end_times"]  # t[0]: loop start, t[k]: end of step k
        seconds = t[-1] - t[w]
        per_run.append({"seconds": seconds, "pairs_per_second": args.steps * args.batch_size / seconds,
                        "tokens_per_second": sum(r["step_tokens"][w:]) / seconds,
                        "mfu": sum(flops[w:]) / seconds / peak, "peak_rss_mb": r["peak_rss_mb"],
                        "peak_gpu_mb": r.get("peak_gpu_mb")})
    out = {"config": name, "runs": per_run}
    for key in ("seconds", "pairs_per_second", "tokens_per_second", "mfu", "peak_rss_mb", "peak_gpu_mb"):
        values = [p[key] for p in per_run if p[key] is not None]
        out[key] = statistics.median(values) if values else None
    pre = [r["precompute_seconds"] for r in runs if r.get("precompute_seconds") is not None]
    out["precompute_seconds"] = statistics.median(pre) if pre else None
    return out


def check_runs(name: str, runs: list[dict], expected_hash: str, expected_tokens: list[int], args) -> None:
    """Every run trained on the generated token ids, batch by batch; TRL's config is ours."""
    for r in runs:
        if r["tokens_hash"] != expected_hash:
            raise AssertionError(f"{name}: tokenized data differ from the generated token ids")
        if r["step_tokens"] != expected_tokens:
            raise AssertionError(f"{name}: per-step real tokens {r['step_tokens']} != expected {expected_tokens}")
        trl = r.get("trl_config")
        if trl is not None:
            want = {"per_device_train_batch_size": args.batch_size, "learning_rate": args.learning_rate,
                    "max_length": args.max_length, "gradient_checkpointing": False, "padding_free": False}
            wrong = {k: (trl[k], v) for k, v in want.items() if trl[k] != v}
            if wrong:
                raise AssertionError(f"{name}: TRL config differs from ours: {wrong}")


def run_benchmark(args: BenchmarkArguments, scripts_dir: Path) -> dict:
    """Builds the inputs, runs every configuration `repeats` times (interleaved), writes `benchmark.json`."""
    from transformers import AutoConfig

    from .throughput import gpu_peak_flops, matmul_params, measured_matmul_flops

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = build_model_and_tokenizer(out / "model", args)
    pairs = synthetic_pairs(args)
    data_dir = write_dataset(pairs, out / "data")
    expected_hash = token_hash((p["prompt_ids"], p["chosen_ids"], p["rejected_ids"]) for p in pairs)
    expected_tokens = [sum(2 * len(p["prompt_ids"]) + len(p["chosen_ids"]) + len(p["rejected_ids"])
                           for p in pairs[i * args.batch_size:(i + 1) * args.batch_size])
                       for i in range(args.warmup_steps + args.steps)]
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
        peak, peak_source = gpu_peak_flops(device) or measured_matmul_flops("cuda", torch.bfloat16, 4096, 1.0), \
            "bf16 dense peak" if gpu_peak_flops(device) else "measured bf16 matmul"
    else:
        device = f"cpu ({os.cpu_count()} cores visible, {torch.get_num_threads()} torch threads)"
        peak, peak_source = measured_matmul_flops("cpu", torch.float32, 1024, 1.0), "measured fp32 matmul"
    model_config = AutoConfig.from_pretrained(model_dir)
    n_params = matmul_params(model_config)

    names = _configurations(args)
    runs: dict[str, list[dict]] = {n: [] for n in names}
    caches = []
    env = _env(args)
    for repeat in range(args.repeats):
        order = names[repeat % len(names):] + names[:repeat % len(names)]  # rotate: no config always first
        cache_dir = None
        for name in order:
            tool, _, mode = name.partition("/")
            run_dir = Path(tempfile.mkdtemp(prefix=f"{tool}-{mode or 'x'}-r{repeat}-", dir=out))
            spec = {"tool": "trl" if tool.startswith("trl") else "ours", "forward_mode": mode or None,
                    "precompute": tool == "trl_precompute", "model_dir": str(model_dir), "data_dir": str(data_dir),
                    "run_dir": str(run_dir), "result": str(run_dir / "result.json"), "seed": args.seed,
                    **{k: getattr(args, k) for k in ("steps", "warmup_steps", "batch_size", "learning_rate", "beta",
                                                      "max_length", "bf16", "num_threads", "precompute_batch_size")}}
            if tool == "ours_cache":
                if cache_dir is None:  # built once per round, timed once per round
                    cache_dir = out / f"ref-cache-r{repeat}"
                    caches.append(build_cache(args, scripts_dir, model_dir, data_dir, cache_dir))
                spec["cache_dir"] = str(cache_dir)
            (run_dir / "spec.json").write_text(json.dumps(spec))
            cmd = [sys.executable, "-c", "import sys; from dpo_core.benchmark import run_worker; run_worker(sys.argv[1])",
                   str(run_dir / "spec.json")]
            wall, rss = _run(cmd, run_dir / "log.txt", env)
            result = json.loads((run_dir / "result.json").read_text())
            result.update(wall_seconds=wall, peak_rss_mb=rss)  # the whole process's peak, from wait4
            runs[name].append(result)
            print(f"round {repeat + 1}/{args.repeats} {name}: {wall:.0f} s", flush=True)

    summary = []
    for name in names:
        check_runs(name, runs[name], expected_hash, expected_tokens, args)
        online = not name.startswith(("ours_cache", "trl_precompute"))
        flops = step_flops(pairs, args, n_params, model_config, online, shared_prompt=name.endswith("shared_prefix"))
        summary.append(summarize(name, runs[name], args, flops, peak))
    report = {"device": device, "peak_flops": peak, "peak_source": peak_source, "args": asdict(args),
              "n_matmul_params": n_params, "configs": summary, "numerics": numerics(runs),
              "trl_config": next((rs[0]["trl_config"] for rs in runs.values() if rs and "trl_config" in rs[0]), None),
              "cache_build": _median_dicts(caches), "ratios": ratios(summary, _median_dicts(caches))}
    tmp = out / "benchmark.json.tmp"
    tmp.write_text(json.dumps(report, indent=1))
    os.replace(tmp, out / "benchmark.json")
    return report


def _median_dicts(items: list[dict]) -> dict | None:
    if not items:
        return None
    return {k: statistics.median(d[k] for d in items) for k in items[0]}


def numerics(runs: dict[str, list[dict]]) -> dict:
    """Step-1 and step-2 loss and mean log-probs of every configuration (first round), and the largest
    difference of ours to TRL at step 1 (policy == reference there: the same forward and loss)."""
    first = {name: rs[0]["first_steps"] for name, rs in runs.items() if rs}
    out = {"first_steps": first}
    trl = first.get("trl") or first.get("trl_precompute")
    if trl:
        diffs = {}
        for name, steps in first.items():
            if name.startswith("ours"):
                diffs[name] = {k: abs(steps[0][k] - trl[0][k]) for k in ("loss", "logps_chosen", "logps_rejected")}
                diffs[name]["step2_loss"] = abs(steps[1]["loss"] - trl[1]["loss"])
        out["abs_diff_vs_trl"] = diffs
    return out


def ratios(summary: list[dict], cache: dict | None) -> dict:
    """The issue's target ratios, where both sides ran."""
    by = {s["config"]: s for s in summary}
    out = {}

    def ratio(key, a, b, field):
        if a in by and b in by and by[a][field] and by[b][field]:
            out[key] = by[a][field] / by[b][field]

    ratio("ours/trl pairs_per_second (online)", "ours/concat", "trl", "pairs_per_second")
    ratio("ours_cache/trl pairs_per_second (trl online)", "ours_cache/concat", "trl", "pairs_per_second")
    ratio("ours_cache/trl_precompute pairs_per_second", "ours_cache/concat", "trl_precompute", "pairs_per_second")
    ratio("ours/trl peak_rss (online)", "ours/concat", "trl", "peak_rss_mb")
    ratio("ours_cache/trl_precompute peak_rss", "ours_cache/concat", "trl_precompute", "peak_rss_mb")
    ratio("ours/trl peak_gpu (online)", "ours/concat", "trl", "peak_gpu_mb")
    ratio("shared_prefix/concat pairs_per_second", "ours/shared_prefix", "ours/concat", "pairs_per_second")
    ratio("padding_free/concat pairs_per_second", "ours/padding_free", "ours/concat", "pairs_per_second")
    if cache and "trl_precompute" in by and by["trl_precompute"]["precompute_seconds"]:
        out["cache_build/trl_precompute seconds"] = cache["precompute_seconds"] / by["trl_precompute"]["precompute_seconds"]
    return out


def markdown(report: dict) -> str:
    """The report as markdown: one row per configuration, then the ratios and the numerical check."""
    lines = [f"device: {report['device']}; MFU peak {report['peak_flops']:.3g} FLOP/s ({report['peak_source']})",
             "", "| config | pairs/s | tokens/s | peak RSS MiB | peak GPU MiB | MFU | precompute s |",
             "|---|---|---|---|---|---|---|"]
    for s in report["configs"]:
        gpu = f"{s['peak_gpu_mb']:.0f}" if s["peak_gpu_mb"] else "-"
        pre = f"{s['precompute_seconds']:.1f}" if s["precompute_seconds"] else "-"
        if s["config"].startswith("ours_cache") and report["cache_build"]:
            pre = f"{report['cache_build']['precompute_seconds']:.1f} (own process)"
        lines.append(f"| {s['config']} | {s['pairs_per_second']:.2f} | {s['tokens_per_second']:.0f} | "
                     f"{s['peak_rss_mb']:.0f} | {gpu} | {100 * s['mfu']:.1f}% | {pre} |")
    lines += ["", "| ratio | value |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in report["ratios"].items()]
    diffs = report["numerics"].get("abs_diff_vs_trl", {})
    for name, d in diffs.items():
        lines.append(f"\n{name} vs TRL, |difference| at step 1: loss {d['loss']:.2e}, logps/chosen "
                     f"{d['logps_chosen']:.2e}, logps/rejected {d['logps_rejected']:.2e}; step 2 loss "
                     f"{d['step2_loss']:.2e}")
    return "\n".join(lines)
