r"""Our DPO step side by side with TRL's DPOTrainer: pairs/s, tokens/s, peak memory, MFU (see README, Benchmark).

    pip install "trl==1.16.0"    # benchmark-only extra (`pip install -e ".[test]"`)

    # the CPU setting: tiny Llama (4 layers, hidden 256, 4/2 heads), vocab 32768, 512 pairs, batch 8
    python scripts/benchmark.py --output_dir runs/benchmark --steps 10 --repeats 3

    # the same at Llama 3's vocabulary, and prompts >= 3x completions (shared_prefix vs concat)
    python scripts/benchmark.py --output_dir runs/benchmark-128k --vocab_size 128256
    python scripts/benchmark.py --output_dir runs/benchmark-long --long_prompts

    # one GPU, bf16 autocast on both sides
    python scripts/benchmark.py --output_dir runs/benchmark-gpu --bf16

Every configuration runs in its own process, interleaved over --repeats rounds; the table shows medians.
Writes <output_dir>/benchmark.json and prints a markdown table.
"""

from pathlib import Path

from dpo_core.benchmark import BenchmarkArguments, markdown, run_benchmark
from dpo_core.config import parse_config, run_cli


def main(argv=None):
    (args,) = parse_config((BenchmarkArguments,), argv, description=__doc__)
    report = run_benchmark(args, scripts_dir=Path(__file__).resolve().parent)
    print(markdown(report))


if __name__ == "__main__":
    run_cli(main)
