r"""The GPU check: what a CPU cannot show, in one run of under 8 minutes on one GPU (`make gpu-check`).

    python benchmarks/gpu_check.py --output_dir runs/gpu-check            # a machine with a GPU
    python benchmarks/gpu_check.py --output_dir runs/gpu-check --smoke    # the same harness, tiny, on a CPU

Writes <output_dir>/gpu_check.json and gpu_check.md (one row per check: status, seconds, what it measured).
Each check runs the project's own scripts in their own processes, on a random Llama and synthetic pairs
(benchmarks/bench_inputs.py), bf16 on the GPU:

- `layouts`: scripts/dpo.py 6 steps with --forward_mode auto, concat, padding_free, shared_prefix, and
  shared_prefix under flex_attention (flash-attn's varlen one-row layout when flash-attn is importable): the
  step-1 and step-6 losses of every layout agree with concat's (bf16: 2e-2), tokens/s of each;
- `compile`: --torch_compile against eager, the same losses, the graphs compiled;
- `qlora`: --load_in_4bit --use_lora (bitsandbytes' CUDA kernels) trains, the loss falls, peak memory;
- `precompute`: scripts/precompute_ref_logprobs.py, then a run on the cache equals the online reference's;
- `distributed`: the DDP, ZeRO-2, ZeRO-3 and FSDP configs of accelerate_configs/ with every visible GPU, the
  step losses against the one-process run;
- `benchmark`: benchmarks/dpo_vs_trl.py at a 0.5B and a 1B Llama shape, T = 2048, bf16, ours (auto) and
  ours_cache against TRL and TRL's precompute: pairs/s, tokens/s, MFU, peak GPU memory, the ratios.

A check that cannot run here (no CUDA, no bitsandbytes kernels, one GPU for a multi-process config) is
`skip` with the reason; a failing one keeps the last lines of its log. CI never runs this file on a GPU;
tests/test_gpu_check.py runs `--smoke` on the CPU (tiny model, the CUDA-only checks skipped).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

CHECKS = ("layouts", "compile", "qlora", "precompute", "distributed", "benchmark")
# (name, vocab, hidden, intermediate, layers, heads, kv heads): Qwen2.5-0.5B's and Llama-3.2-1B's shapes
BENCH_SHAPES = [("0.5B", 151936, 896, 4864, 24, 14, 2), ("1B", 128256, 2048, 8192, 16, 32, 8)]


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _run(cmd: list, log: Path, env: dict | None = None, timeout: int = 600) -> tuple[int, float]:
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.run([str(c) for c in cmd], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, timeout=timeout,
                              env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                                   **(env or {})})
    return proc.returncode, time.perf_counter() - start


def _tail(log: Path, n: int = 15) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-n:])


def _losses(run_dir: Path) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = {}
    for events in sorted(run_dir.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events.parent), size_guidance={"scalars": 0})
        acc.Reload()
        if "train/loss" in acc.Tags()["scalars"]:
            out.update({e.step: e.value for e in acc.Scalars("train/loss")})
    return out


class Checker:
    def __init__(self, out: Path, smoke: bool):
        self.out, self.smoke, self.cuda = out, smoke, _cuda()
        self.rows: list[dict] = []
        self.model, self.data = self._inputs()

    def _inputs(self) -> tuple[Path, Path]:
        from bench_inputs import build_model_and_tokenizer, synthetic_pairs, write_dataset

        from dpo_core.config import BenchmarkArguments

        shape = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                     num_kv_heads=2, prompt_lengths=[8, 24], completion_lengths=[4, 16], max_length=48,
                     num_pairs=64, steps=4, warmup_steps=1, batch_size=8) if self.smoke else \
            dict(vocab_size=32768, hidden_size=1024, intermediate_size=2816, num_layers=8, num_heads=16,
                 num_kv_heads=4, prompt_lengths=[128, 768], completion_lengths=[64, 512], max_length=1536,
                 num_pairs=256, steps=8, warmup_steps=2, batch_size=8)
        args = BenchmarkArguments(output_dir=str(self.out), **shape)
        self.max_length = args.max_length
        model = build_model_and_tokenizer(self.out / "model", args)
        data = write_dataset(synthetic_pairs(args), self.out / "data")
        return model, data

    def dpo(self, name: str, *extra, launch: tuple = (), steps: int | None = None) -> tuple[int, float, Path, Path]:
        run, steps = self.out / name, steps or (3 if self.smoke else 6)
        base = ["--model_name_or_path", self.model, "--dataset_name", self.data, "--max_length", self.max_length,
                "--per_device_train_batch_size", "4", "--learning_rate", "1e-4", "--lr_scheduler_type", "constant",
                "--max_steps", steps, "--logging_steps", "1", "--seed", "1", "--output_dir", run,
                "--overwrite_output_dir", "--eval_steps", "0"]
        precision = ("--mixed_precision", "bf16") if self.cuda else ("--mixed_precision", "no")
        config = launch or ("--config_file", ROOT / "accelerate_configs" /
                            ("single_gpu.yaml" if self.cuda else "cpu.yaml"))
        cmd = [sys.executable, "-m", "accelerate.commands.launch", *config, *precision,
               ROOT / "scripts" / "dpo.py", *base, *extra]
        code, seconds = _run(cmd, self.out / f"{name}.log")
        return code, seconds, run, self.out / f"{name}.log"

    def record(self, check: str, status: str, seconds: float, **details) -> None:
        row = {"check": check, "status": status, "seconds": round(seconds, 1), **details}
        self.rows.append(row)
        print(json.dumps(row), flush=True)

    def _compare(self, check: str, name: str, want: dict, *extra, tol: float, launch: tuple = ()) -> None:
        code, seconds, run, log = self.dpo(name, *extra, launch=launch)
        if code != 0:
            self.record(check, "fail", seconds, variant=name, log=_tail(log))
            return
        got = _losses(run)
        diff = max((abs(got[s] - v) for s, v in want.items() if s in got), default=float("inf"))
        results = json.loads((run / "train_results.json").read_text())
        self.record(check, "ok" if diff <= tol and got.keys() == want.keys() else "fail", seconds, variant=name,
                    max_loss_diff=diff, tokens_per_second=results.get("train_tokens_per_second"),
                    compiled_graphs=results.get("train_compiled_graphs"),
                    auto=re.findall(r"forward_mode auto -> (\w+)", log.read_text()))

    def reference(self) -> dict[int, float]:
        if not hasattr(self, "_reference"):
            code, seconds, run, log = self.dpo("concat", "--forward_mode", "concat")
            if code != 0:
                raise RuntimeError(f"the concat reference run failed:\n{_tail(log)}")
            self._reference = _losses(run)
            self.record("layouts", "ok", seconds, variant="concat (reference)",
                        tokens_per_second=json.loads((run / "train_results.json").read_text())
                        .get("train_tokens_per_second"))
        return self._reference

    def tol(self) -> float:
        return 2e-2 if self.cuda else 1e-4

    def layouts(self) -> None:
        want = self.reference()
        variants = [("auto", ()), ("padding_free", ()), ("shared_prefix", ())]
        if self.cuda:
            variants.append(("shared_prefix", ("--attn_implementation", "flex_attention")))
            try:
                import flash_attn  # noqa: F401

                variants.append(("padding_free", ("--attn_implementation", "flash_attention_2")))
            except ImportError:
                self.record("layouts", "skip", 0.0, variant="padding_free flash-attn varlen",
                            reason="flash-attn is not importable")
        for mode, extra in variants:
            name = mode + ("-" + extra[-1] if extra else "")
            self._compare("layouts", name, want, "--forward_mode", mode, *extra, tol=self.tol())

    def compile(self) -> None:
        backend = ("--torch_compile_backend", "aot_eager") if self.smoke else ()  # smoke: no inductor codegen
        self._compare("compile", "torch_compile", self.reference(), "--torch_compile", *backend, "--forward_mode",
                      "concat", tol=self.tol())

    def qlora(self) -> None:
        if not self.cuda:
            self.record("qlora", "skip", 0.0, reason="bitsandbytes' 4-bit kernels need CUDA here")
            return
        code, seconds, run, log = self.dpo("qlora", "--load_in_4bit", "--use_lora", "--optim", "paged_adamw_8bit",
                                           "--learning_rate", "1e-3", steps=8)
        losses = _losses(run) if code == 0 else {}
        ok = code == 0 and losses and losses[max(losses)] < losses[min(losses)]
        self.record("qlora", "ok" if ok else "fail", seconds, first_loss=losses.get(min(losses, default=0)),
                    last_loss=losses.get(max(losses, default=0)), log=None if ok else _tail(log))

    def precompute(self) -> None:
        cache = self.out / "ref-cache"
        precision = {"ACCELERATE_MIXED_PRECISION": "bf16"} if self.cuda else {}
        code, seconds = _run([sys.executable, ROOT / "scripts" / "precompute_ref_logprobs.py",
                              "--model_name_or_path", self.model, "--dataset_name", self.data, "--max_length",
                              self.max_length, "--output_dir", cache, "--overwrite"], self.out / "precompute.log",
                             env=precision)
        if code != 0:
            self.record("precompute", "fail", seconds, log=_tail(self.out / "precompute.log"))
            return
        self._compare("precompute", "cached", self.reference(), "--ref_logprobs", cache, "--forward_mode", "concat",
                      tol=self.tol())

    def distributed(self) -> None:
        import torch

        n = torch.cuda.device_count() if self.cuda else 0
        if n < 2:
            self.record("distributed", "skip", 0.0, reason=f"{n} GPU(s): the multi-process configs need 2 or more "
                        "(tests/test_distributed.py runs DDP and ZeRO-2/3 on 2 CPU processes)")
            return
        want = self.reference()
        for config in ("ddp.yaml", "deepspeed_zero2.yaml", "deepspeed_zero3.yaml", "fsdp.yaml"):
            launch = ("--config_file", ROOT / "accelerate_configs" / config, "--num_processes", str(n))
            # the global batch of the one-process run: 4 pairs over n processes
            self._compare("distributed", config, want, "--per_device_train_batch_size", str(max(1, 4 // n)),
                          "--forward_mode", "concat", tol=5e-2, launch=launch)

    def benchmark(self) -> None:
        if not self.cuda:
            self.record("benchmark", "skip", 0.0, reason="the 0.5B/1B shapes at T=2048 are GPU runs "
                        "(tests/test_benchmark.py runs the same script small on the CPU)")
            return
        for name, vocab, hidden, inter, layers, heads, kv in BENCH_SHAPES:
            out = self.out / f"benchmark-{name}"
            cmd = [sys.executable, HERE / "dpo_vs_trl.py", "--output_dir", out, "--bf16", "--vocab_size", vocab,
                   "--hidden_size", hidden, "--intermediate_size", inter, "--num_layers", layers, "--num_heads",
                   heads, "--num_kv_heads", kv, "--prompt_lengths", "256", "1024", "--completion_lengths", "128",
                   "1000", "--max_length", "2048", "--num_pairs", "64", "--batch_size", "8", "--steps", "4",
                   "--warmup_steps", "2", "--repeats", "1", "--forward_modes", "auto",
                   "--configs", "ours", "ours_cache", "trl", "trl_precompute"]
            code, seconds = _run(cmd, self.out / f"benchmark-{name}.log")
            if code != 0:
                self.record("benchmark", "fail", seconds, shape=name, log=_tail(self.out / f"benchmark-{name}.log"))
                continue
            report = json.loads((out / "benchmark.json").read_text())
            self.record("benchmark", "ok", seconds, shape=name, ratios=report["ratios"],
                        configs={c["config"]: {k: c[k] for k in ("pairs_per_second", "tokens_per_second", "mfu",
                                                                 "peak_gpu_mb")} for c in report["configs"]})


def markdown(rows: list[dict], device: str) -> str:
    lines = [f"GPU check on {device}", "", "| check | variant | status | seconds | measured |", "|---|---|---|---|---|"]
    for r in rows:
        measured = {k: v for k, v in r.items() if k not in ("check", "variant", "status", "seconds", "log")
                    and v not in (None, [])}
        lines.append(f"| {r['check']} | {r.get('variant') or r.get('shape') or ''} | {r['status']} | {r['seconds']} | "
                     f"{json.dumps(measured)[:300]} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="runs/gpu-check")
    parser.add_argument("--smoke", action="store_true", help="Tiny model and data (the harness on a CPU).")
    parser.add_argument("--checks", nargs="+", default=list(CHECKS), choices=CHECKS)
    args = parser.parse_args(argv)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"
    checker = Checker(out, args.smoke)
    for check in args.checks:
        start = time.perf_counter()
        try:
            getattr(checker, check)()
        except Exception as e:  # one broken check must not hide the others' results
            checker.record(check, "fail", time.perf_counter() - start, error=f"{type(e).__name__}: {e}"[:2000])
    report = {"device": device, "smoke": args.smoke, "rows": checker.rows}
    tmp = out / "gpu_check.json.tmp"
    tmp.write_text(json.dumps(report, indent=1))
    os.replace(tmp, out / "gpu_check.json")
    (out / "gpu_check.md").write_text(markdown(checker.rows, device) + "\n")
    print(markdown(checker.rows, device))
    return 1 if any(r["status"] == "fail" for r in checker.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
