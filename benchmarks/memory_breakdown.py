r"""What a DPO step's peak memory is made of, phase by phase, on CPU (docs/benchmark.md).

    python benchmarks/memory_breakdown.py --preset smollm2-135m --output_dir runs/memory-135m
    python benchmarks/memory_breakdown.py --preset smollm2-135m --gradient_checkpointing --output_dir runs/memory-135m-gc

The run is set up by `dpo_core.dpo.setup_dpo` (as scripts/dpo.py sets it up: policy, online reference, data, the
`--forward_mode` layout) on the benchmark's synthetic pairs and random model (`benchmarks/bench_inputs.py`), then
two optimizer steps run by hand so that each phase can be measured apart. After each phase it records the
process's resident memory (RSS now) and its peak so far (`ru_maxrss`); the table shows what each phase added:

- setup: libraries, the policy's and the reference's weights, the tokenized data;
- forward: the policy's and the reference's forward and the loss (the saved activations live until backward);
- backward: the gradients (and, with gradient checkpointing, the recomputed block);
- optimizer: AdamW's two states per weight, made at the first step;
- step 2: what a second step adds at most (allocator reuse).

`--timed_steps N` times N more steps (their peak is the last row). The allocator is the scripts' (tcmalloc or jemalloc
where installed, `dpo_core/allocator.py`): `DPO_CORE_ALLOCATOR=glibc` measures glibc's malloc, which keeps freed
blocks in its heap once its mmap threshold has risen (after the first large frees); with
`MALLOC_MMAP_THRESHOLD_=131072` it returns them, at a cost in time (every large tensor is then mapped fresh).

Alongside, the sizes computed from the model (weights, gradients, Adam states) show how much of the peak is
fixed by the model and how much is activations and allocator.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path

from dpo_core.allocator import active_allocator, preload_allocator


def _rss_mb() -> tuple[float, float]:
    with open("/proc/self/status") as f:
        now = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024
    return now, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv=None) -> None:
    from accelerate.utils import set_seed
    from bench_inputs import build_model_and_tokenizer, synthetic_pairs, write_dataset

    from dpo_core.config import (
        BenchmarkArguments,
        DataArguments,
        DPOArguments,
        ModelArguments,
        TrainArguments,
    )
    from dpo_core.distributed import make_accelerator
    from dpo_core.dpo import setup_dpo

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="smollm2-135m", choices=["smollm2-135m", "none"],
                        help="none: the benchmark's default shape, or the shape flags below")
    for name, default in (("vocab_size", 32768), ("hidden_size", 256), ("intermediate_size", 1024),
                          ("num_layers", 4)):
        parser.add_argument(f"--{name}", type=int, default=default, help="model shape (with --preset none)")
    parser.add_argument("--output_dir", default="runs/memory")
    parser.add_argument("--forward_mode", default="auto")
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--logps_chunk_size", type=int, default=1024)
    parser.add_argument("--timed_steps", type=int, default=0, help="steps timed after the two measured ones")
    args = parser.parse_args(argv)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    phases = {"imports": _rss_mb()}
    bench = BenchmarkArguments(preset=None if args.preset == "none" else args.preset, num_pairs=4 * args.batch_size,
                               batch_size=args.batch_size, output_dir=str(output_dir), vocab_size=args.vocab_size,
                               hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
                               num_layers=args.num_layers, steps=1, warmup_steps=1)
    model_dir = build_model_and_tokenizer(output_dir / "model", bench)
    data_dir = write_dataset(synthetic_pairs(bench), output_dir / "data")
    accelerator = make_accelerator()
    set_seed(0)
    train_args = TrainArguments(output_dir=str(output_dir / "run"), max_steps=2, report_to=["none"],
                                per_device_train_batch_size=args.batch_size, forward_mode=args.forward_mode,
                                logps_chunk_size=args.logps_chunk_size)
    run = setup_dpo(accelerator, ModelArguments(model_name_or_path=str(model_dir),
                                                gradient_checkpointing=args.gradient_checkpointing),
                    DataArguments(dataset_name=str(data_dir), max_length=bench.max_length, data_cache_dir="none"),
                    DPOArguments(), train_args, report_path=None, shuffle=False)
    phases["setup"] = _rss_mb()
    run.model.train()  # as train_loop does (gradient checkpointing acts in training mode only)
    batches = iter(run.train_loader)
    for step in (1, 2):
        batch = next(batches)
        loss, _ = run.step_fn(run.model, batch)
        phases[f"step {step} forward"] = _rss_mb()
        accelerator.backward(loss)
        phases[f"step {step} backward"] = _rss_mb()
        accelerator.clip_grad_norm_(run.model.parameters(), 1.0)
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
        phases[f"step {step} optimizer"] = _rss_mb()

    seconds = []
    for _ in range(args.timed_steps):  # the same kind of step again, timed (the batches repeat)
        batch = next(batches, None)
        if batch is None:
            batches = iter(run.train_loader)
            batch = next(batches)
        start = time.perf_counter()
        loss, _ = run.step_fn(run.model, batch)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(run.model.parameters(), 1.0)
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - start)
    if seconds:
        phases[f"{len(seconds)} timed steps"] = _rss_mb()

    n_params = sum(p.numel() for p in accelerator.unwrap_model(run.model).parameters())
    tokens = int(batch["num_tokens"])
    fixed = {"weights (policy)": 4 * n_params, "weights (reference)": 4 * n_params, "gradients": 4 * n_params,
             "AdamW states": 8 * n_params}
    rows, last_peak = [], phases["imports"][1]
    for name, (now, peak) in phases.items():
        rows.append({"phase": name, "rss_mb": now, "peak_mb": peak, "peak_added_mb": peak - last_peak})
        last_peak = peak
    malloc = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    allocator = active_allocator() + (f", MALLOC_MMAP_THRESHOLD_={malloc}" if malloc else "")
    result = {"preset": args.preset, "allocator": allocator,
              "median_step_seconds": sorted(seconds)[len(seconds) // 2] if seconds else None, "forward_mode": run.forward_mode, "gradient_checkpointing": args.gradient_checkpointing,
              "batch_size": args.batch_size, "tokens_last_batch": tokens, "parameters": n_params,
              "fixed_mb": {k: v / 2**20 for k, v in fixed.items()}, "phases": rows}
    (output_dir / "memory.json").write_text(json.dumps(result, indent=1))
    print(f"{args.preset}, forward_mode {run.forward_mode}, gradient checkpointing {args.gradient_checkpointing}, "
          f"batch {args.batch_size} ({tokens} tokens in the last batch), {n_params / 1e6:.1f}M parameters, "
          f"allocator {allocator}"
          + (f", median step {result['median_step_seconds']:.2f} s" if seconds else "") + "\n")
    print("| phase | RSS now (MB) | peak so far (MB) | peak added (MB) |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['phase']} | {r['rss_mb']:,.0f} | {r['peak_mb']:,.0f} | {r['peak_added_mb']:+,.0f} |")
    print("\nfrom the model: " + ", ".join(f"{k} {v / 2**20:,.0f} MB" for k, v in fixed.items()))


if __name__ == "__main__":
    preload_allocator(__name__)  # as the scripts do
    main()
