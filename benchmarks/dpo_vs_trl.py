r"""Our DPO step side by side with TRL's DPOTrainer: pairs/s, tokens/s, peak memory, MFU (docs/benchmark.md).

    pip install "trl==1.16.0"    # benchmark-only extra (`pip install -e ".[test]"`)

    # the CPU setting: tiny Llama (4 layers, hidden 256, 4/2 heads), vocab 32768, 512 pairs, batch 8
    python benchmarks/dpo_vs_trl.py --output_dir runs/benchmark --steps 10 --repeats 3

    # the same at Llama 3's vocabulary, and prompts >= 3x completions (shared_prefix vs concat)
    python benchmarks/dpo_vs_trl.py --output_dir runs/benchmark-128k --vocab_size 128256
    python benchmarks/dpo_vs_trl.py --output_dir runs/benchmark-long --long_prompts

    # one GPU, bf16 autocast on both sides
    python benchmarks/dpo_vs_trl.py --output_dir runs/benchmark-gpu --bf16

Every configuration runs in its own process, interleaved over --repeats rounds; the table shows medians.
Writes <output_dir>/benchmark.json and prints a markdown table.

Configurations: `ours/<mode>` (our run, set up by `dpo_core.dpo.setup_dpo` as `train_dpo` does, with an online
reference, for `auto` and every layout of `dpo_core.layouts.LAYOUTS`; `<mode>+compile` adds --torch_compile,
`<mode>+gc` gradient checkpointing), `ours_cache/<mode>` (reference log-probs from a cache built first by
scripts/precompute_ref_logprobs.py in its own process, its time reported apart), `trl` (`trl.DPOTrainer` with
its online reference), `trl_precompute` (`precompute_ref_log_probs=True`) and `trl_gc` (TRL's own default,
gradient checkpointing on; compare it with `ours/auto+gc`).

    # SmolLM2-135M's shape; or the real checkpoint's weights (synthetic ids over its vocabulary)
    python benchmarks/dpo_vs_trl.py --preset smollm2-135m --configs ours ours_cache trl trl_precompute trl_gc \
        --forward_modes auto auto+compile auto+gc concat --output_dir runs/benchmark-135m
    python benchmarks/dpo_vs_trl.py --model_name_or_path "$(python -c 'from dpo_core.demo import smollm2_gguf; \
        print(smollm2_gguf())')" --output_dir runs/benchmark-smollm2

Fairness: the same model files (from_pretrained), the identical token ids (a word-level tokenizer maps each
synthetic word to one id; every worker hashes the ids it trains on and the parent asserts they agree), the
same batches in the same order (no shuffling on either side), float32 or bf16 autocast on both, AdamW with
the same hyper-parameters (`adamw_torch`, not TRL's fused default), constant learning rate, clipping at 1,
dropout off, no gradient checkpointing (TRL's default is on), no evaluation, no logging, no saving,
dataloader workers 0, `padding_free=False`. Timing covers the optimizer steps after `--warmup_steps` (each
side's own step loop, data loading included); setup, model loading, tokenization and precompute are
excluded. Peak memory is the process's peak RSS (`ru_maxrss`) on CPU, `torch.cuda.max_memory_allocated` on
GPU. MFU = model FLOPs of the timed steps (`dpo_core.throughput`) / time / peak, with the peak measured
once in the parent (a float32 matmul on CPU) or the GPU's bf16 dense peak. Allocator: ours runs as the scripts
run (tcmalloc or jemalloc preloaded where installed, `dpo_core/allocator.py`; `DPO_CORE_ALLOCATOR=glibc` for
glibc's), TRL as this process was started (glibc's malloc unless LD_PRELOAD names another: start the benchmark
with LD_PRELOAD set to give TRL the same one); the table names the allocator where it is not glibc's.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch
from bench_inputs import build_model_and_tokenizer, synthetic_pairs, token_hash, write_dataset

from dpo_core.allocator import allocator_environment
from dpo_core.cli import run_cli
from dpo_core.config import BenchmarkArguments, parse_config
from dpo_core.errors import ConfigError
from dpo_core.layouts import FORWARD_MODES
from dpo_core.throughput import dpo_step_flops, gpu_peak_flops, matmul_params, measured_matmul_flops

HERE = Path(__file__).resolve().parent
SCRIPTS = HERE.parent / "scripts"


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


def parse_mode(mode: str) -> tuple[str, bool, bool]:
    """`layout[+compile][+gc]` -> (layout, torch_compile, gradient_checkpointing)."""
    layout, *options = mode.split("+")
    if layout not in FORWARD_MODES or set(options) - {"compile", "gc"}:
        raise ConfigError(f"--forward_modes: {mode!r} is not one of {', '.join(FORWARD_MODES)}, optionally with "
                          "+compile and/or +gc")
    return layout, "compile" in options, "gc" in options


def _configurations(args: BenchmarkArguments) -> list[str]:
    modes = args.forward_modes or FORWARD_MODES
    for mode in modes:
        parse_mode(mode)
    names = []
    for config in args.configs:
        names += [f"{config}/{m}" for m in modes] if config.startswith("ours") else [config]
    return names


def step_flops(pairs: list[dict], args: BenchmarkArguments, n_params: int, model_config, online: bool,
               shared_prompt: bool = False) -> list[float]:
    """Model FLOPs of each step's batch (batches are the pairs in order: neither side shuffles), for the
    layout the configuration runs: 2B prompt+completion sequences, or B prompt+chosen+rejected ones
    (`shared_prompt`). The LM head counts on the completion tokens only (`dpo_core.throughput`)."""
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
    out = {"config": name, "runs": per_run, "forward_mode": runs[0].get("forward_mode") if runs else None,
           "allocator": runs[0].get("allocator") if runs else None}
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
                    "max_length": args.max_length, "gradient_checkpointing": name == "trl_gc", "padding_free": False}
            wrong = {k: (trl[k], v) for k, v in want.items() if trl[k] != v}
            if wrong:
                raise AssertionError(f"{name}: TRL config differs from ours: {wrong}")


def run_benchmark(args: BenchmarkArguments, scripts_dir: Path = SCRIPTS) -> dict:
    """Builds the inputs, runs every configuration `repeats` times (interleaved), writes `benchmark.json`."""
    from transformers import AutoConfig

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
            layout, compiled, checkpointed = parse_mode(mode) if mode else (None, False, tool == "trl_gc")
            spec = {"tool": "trl" if tool.startswith("trl") else "ours", "forward_mode": layout,
                    "torch_compile": compiled, "gradient_checkpointing": checkpointed,
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
            cmd = [sys.executable, str(HERE / "bench_worker.py"),
                   str(run_dir / "spec.json")]
            # ours runs with the allocator the scripts choose (dpo_core/allocator.py: tcmalloc or jemalloc where
            # installed, unless DPO_CORE_ALLOCATOR says otherwise); TRL with the process as this one was started.
            worker_env = {**env, **allocator_environment(environ=env)} if spec["tool"] == "ours" else env
            wall, rss = _run(cmd, run_dir / "log.txt", worker_env)
            result = json.loads((run_dir / "result.json").read_text())
            result.update(wall_seconds=wall, peak_rss_mb=rss)  # the whole process's peak, from wait4
            runs[name].append(result)
            print(f"round {repeat + 1}/{args.repeats} {name}: {wall:.0f} s", flush=True)

    summary = []
    for name in names:
        check_runs(name, runs[name], expected_hash, expected_tokens, args)
        online = not name.startswith(("ours_cache", "trl_precompute"))
        ran = {r.get("forward_mode") for r in runs[name]}  # auto: what it resolved to
        flops = step_flops(pairs, args, n_params, model_config, online, shared_prompt=ran == {"shared_prefix"})
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

    ratio("ours(auto)/trl pairs_per_second (online)", "ours/auto", "trl", "pairs_per_second")
    ratio("ours_cache(auto)/trl pairs_per_second (trl online)", "ours_cache/auto", "trl", "pairs_per_second")
    ratio("ours(auto+compile)/trl pairs_per_second (online)", "ours/auto+compile", "trl", "pairs_per_second")
    ratio("ours(auto)/trl peak_rss (online)", "ours/auto", "trl", "peak_rss_mb")
    ratio("ours(auto+gc)/trl_gc peak_rss (online, both checkpointing)", "ours/auto+gc", "trl_gc", "peak_rss_mb")
    ratio("ours(auto+gc)/trl_gc pairs_per_second (online)", "ours/auto+gc", "trl_gc", "pairs_per_second")
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
        notes = [s["forward_mode"]] if "auto" in s["config"] and s.get("forward_mode") else []
        notes += [s["allocator"]] if s.get("allocator") not in (None, "glibc") else []
        name = s["config"] + (f" ({', '.join(notes)})" if notes else "")
        lines.append(f"| {name} | {s['pairs_per_second']:.2f} | {s['tokens_per_second']:.0f} | "
                     f"{s['peak_rss_mb']:.0f} | {gpu} | {100 * s['mfu']:.1f}% | {pre} |")
    lines += ["", "| ratio | value |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in report["ratios"].items()]
    diffs = report["numerics"].get("abs_diff_vs_trl", {})
    for name, d in diffs.items():
        lines.append(f"\n{name} vs TRL, |difference| at step 1: loss {d['loss']:.2e}, logps/chosen "
                     f"{d['logps_chosen']:.2e}, logps/rejected {d['logps_rejected']:.2e}; step 2 loss "
                     f"{d['step2_loss']:.2e}")
    return "\n".join(lines)


def main(argv=None):
    (args,) = parse_config((BenchmarkArguments,), argv, description=__doc__)
    print(markdown(run_benchmark(args)))


if __name__ == "__main__":
    run_cli(main)
