"""benchmarks/dpo_vs_trl.py end to end on a very small setting, with TRL: the report's fields, ours and TRL
agreeing numerically on the same batches, and TRL really configured as ours."""

import json
import math

import pytest
from bench_inputs import synthetic_pairs, token_hash
from helpers import run_script, subprocess_env

from dpo_core.allocator import PRELOADED, allocator_environment
from dpo_core.config import BenchmarkArguments
from dpo_core.errors import ConfigError

SMALL = ["--num_pairs", "16", "--steps", "1", "--warmup_steps", "1", "--batch_size", "4", "--repeats", "1",
         "--vocab_size", "1024", "--hidden_size", "64", "--intermediate_size", "128", "--prompt_lengths", "8", "24",
         "--completion_lengths", "4", "12", "--max_length", "64", "--learning_rate", "1e-3"]


def test_synthetic_pairs_are_seeded_and_in_range():
    args = BenchmarkArguments(num_pairs=64, vocab_size=100, prompt_lengths=[3, 5], completion_lengths=[2, 4],
                              max_length=16, steps=1, warmup_steps=1, batch_size=2)
    pairs = synthetic_pairs(args)
    assert token_hash((p["prompt_ids"], p["chosen_ids"], p["rejected_ids"]) for p in pairs) == token_hash(
        (p["prompt_ids"], p["chosen_ids"], p["rejected_ids"]) for p in synthetic_pairs(args))
    for p in pairs:
        assert 3 <= len(p["prompt_ids"]) <= 5 and 3 <= len(p["chosen_ids"]) <= 5 and p["chosen_ids"][-1] == 1
        assert all(3 <= i < 100 for i in p["prompt_ids"] + p["chosen_ids"][:-1])
        assert p["chosen_ids"] != p["rejected_ids"]
    long = BenchmarkArguments(long_prompts=True)
    assert long.prompt_lengths[0] >= 3 * long.completion_lengths[1]


def test_modes_presets_and_configs_are_parsed():
    from dpo_vs_trl import parse_mode

    assert parse_mode("auto") == ("auto", False, False)
    assert parse_mode("shared_prefix+compile+gc") == ("shared_prefix", True, True)
    for bad in ("packed", "auto+fast"):
        with pytest.raises(ConfigError, match="forward_modes"):
            parse_mode(bad)
    args = BenchmarkArguments(preset="smollm2-135m", configs=["ours", "trl_gc"])
    assert (args.num_layers, args.hidden_size, args.intermediate_size, args.vocab_size) == (30, 576, 1536, 49152)
    assert (args.num_heads, args.num_kv_heads) == (9, 3)
    with pytest.raises(ConfigError, match="trl_gc"):
        BenchmarkArguments(configs=["trl_fast"])


@pytest.mark.slow
def test_benchmark_end_to_end_against_trl(tmp_path):
    pytest.importorskip("trl")
    out = tmp_path / "bench"
    # The default, auto, which takes shared_prefix here (prompts are a third of concat's tokens): the layout
    # whose batches differ most from TRL's. Every layout equals the concatenated forward in
    # tests/test_forward_modes.py, so more layouts add processes and no new check.
    modes = ["auto"]
    proc = run_script("benchmarks/dpo_vs_trl.py", ["--output_dir", str(out), *SMALL, "--forward_modes", *modes])
    assert "| config | pairs/s |" in proc.stdout
    report = json.loads((out / "benchmark.json").read_text())

    configs = {c["config"]: c for c in report["configs"]}
    assert set(configs) == {*(f"ours/{m}" for m in modes), *(f"ours_cache/{m}" for m in modes), "trl",
                            "trl_precompute"}
    # Tokens per pair of the timed step (the second batch of 4 pairs), from the data file itself: one token
    # per word plus EOS per completion, the prompt counted in both sequences.
    rows = [json.loads(line) for line in (out / "data" / "train.jsonl").read_text().splitlines()][4:8]
    words = sum(2 * len(r["prompt"].split()) + len(r["chosen"].split()) + len(r["rejected"].split()) + 2
                for r in rows)
    assert configs["ours/auto"]["forward_mode"] == "shared_prefix"  # what auto resolved to, in the report
    for name, c in configs.items():
        assert c["pairs_per_second"] > 0 and 0 < c["mfu"] < 1 and c["peak_rss_mb"] > 100, name
        assert c["tokens_per_second"] / c["pairs_per_second"] == pytest.approx(words / 4, rel=1e-9), name
    assert configs["trl_precompute"]["precompute_seconds"] > 0
    # The precompute script reports its forward time to 0.1 s (0.0 for 16 pairs on a fast machine).
    assert report["cache_build"]["precompute_seconds"] >= 0 and report["cache_build"]["wall_seconds"] > 0
    assert "ours(auto)/trl pairs_per_second (online)" in report["ratios"]

    trl = report["trl_config"]
    assert trl["per_device_train_batch_size"] == 4 and trl["learning_rate"] == 1e-3 and trl["max_length"] == 64
    assert trl["gradient_checkpointing"] is False and trl["padding_free"] is False
    assert trl["optim"].endswith("adamw_torch") and trl["train_sampling_strategy"] == "sequential"

    first = report["numerics"]["first_steps"]
    trl_steps = first["trl"]
    assert trl_steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at step 1
    # Step 2 follows one AdamW update (lr 1e-3): it moves the loss far from log 2, identically on both sides.
    assert abs(trl_steps[1]["loss"] - math.log(2)) > 1e-3
    for name, steps in first.items():
        if name.startswith("ours"):
            assert steps[0]["loss"] == pytest.approx(trl_steps[0]["loss"], abs=1e-4), name
            for key in ("logps_chosen", "logps_rejected"):
                assert steps[0][key] == pytest.approx(trl_steps[0][key], rel=1e-5), (name, key)
            assert steps[1]["loss"] == pytest.approx(trl_steps[1]["loss"], abs=1e-4), name


@pytest.mark.slow
def test_data_scale_benchmark_tokenizes_as_trl_does(tiny_model_dir, tmp_path):
    """benchmarks/data_scale.py on 300 pairs: every configuration sees every pair, ours (first and reused) and
    TRL's preprocessing produce the identical token ids, and the store it measured is removed after."""
    pytest.importorskip("trl")
    run_script("benchmarks/data_scale.py", ["--num_pairs", "300", "--output_dir", str(tmp_path),
                                            "--tokenizer", str(tiny_model_dir), "--num_proc", "2",
                                            "--configs", "ours_first", "ours_reuse", "trl", "raw_joined"])
    report = json.loads((tmp_path / "data_scale.json").read_text())
    results = report["results"]
    assert set(results) == {"ours_first", "ours_reuse", "trl", "raw_joined"}
    assert results["raw_joined"]["ids_sha256"] is None and "first_vs_raw_joined_pairs_per_s" in report["ratios"]
    # ours runs as the scripts do: with the allocator they preload where one is installed
    chosen = allocator_environment(environ=subprocess_env()).get(PRELOADED)
    if chosen:
        assert results["ours_first"]["allocator"] == chosen and results["trl"]["allocator"] == "glibc"
    assert all(r["pairs"] == 300 and r["seconds"] > 0 and r["peak_rss_mb"] > 50 for r in results.values())
    # PSS counts a page shared by the worker processes once: never above the RSS sum, and the libraries are in it
    assert all(30 < r["peak_pss_mb"] <= r["peak_rss_mb"] for r in results.values())
    digests = {results[name]["ids_sha256"] for name in ("ours_first", "ours_reuse", "trl")}
    assert len(digests) == 1 and None not in digests
    assert not (tmp_path / "store").exists()
    lines = (tmp_path / "pairs-300-seed0.jsonl").read_text().splitlines()
    assert len(lines) == 300 and all(json.loads(line)["prompt"].endswith("?") for line in lines)


@pytest.mark.slow
def test_memory_breakdown_reports_every_phase_and_the_models_fixed_sizes(tmp_path):
    """benchmarks/memory_breakdown.py on a tiny shape: every phase of two steps in order, peaks never decreasing,
    and the fixed sizes (weights, gradients, AdamW states) computed from the model's own parameter count."""
    from transformers import AutoModelForCausalLM

    run_script("benchmarks/memory_breakdown.py", ["--preset", "none", "--vocab_size", "1024", "--hidden_size", "64",
                                                  "--intermediate_size", "128", "--num_layers", "2",
                                                  "--batch_size", "2", "--output_dir", str(tmp_path)])
    report = json.loads((tmp_path / "memory.json").read_text())
    phases = [row["phase"] for row in report["phases"]]
    assert phases == ["imports", "setup"] + [f"step {s} {p}" for s in (1, 2) for p in ("forward", "backward",
                                                                                        "optimizer")]
    peaks = [row["peak_mb"] for row in report["phases"]]
    assert peaks == sorted(peaks) and all(row["rss_mb"] <= row["peak_mb"] + 1 for row in report["phases"])
    n = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tmp_path / "model").parameters())
    assert report["parameters"] == n
    assert report["fixed_mb"]["AdamW states"] == pytest.approx(8 * n / 2**20)
    assert report["fixed_mb"]["gradients"] == pytest.approx(4 * n / 2**20)
