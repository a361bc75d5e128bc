"""--max_train_samples / --max_eval_samples (a seeded selection in `dpo_core.records.load_splits`, part of the
reference cache's fingerprint) and the --debug preset (`dpo_core.debug`)."""

import pytest
from helpers import DEMO_DATA, read_scalars, run_script, small_dataset

from dpo_core import data as data_lib
from dpo_core.config import (
    DataArguments,
    DPOArguments,
    DPOConfig,
    ModelArguments,
    TrainArguments,
    parse_config,
)
from dpo_core.debug import DEBUG_PRESET, apply_debug_preset
from dpo_core.errors import ConfigError
from dpo_core.ref_cache import reference_fingerprint


def test_a_slice_is_seeded_stable_and_in_file_order():
    full = data_lib.load_splits(str(DEMO_DATA), eval_split="test")
    a = data_lib.load_splits(str(DEMO_DATA), eval_split="test", seed=1, max_train_samples=20, max_eval_samples=5)
    b = data_lib.load_splits(str(DEMO_DATA), eval_split="test", seed=1, max_train_samples=20, max_eval_samples=5)
    c = data_lib.load_splits(str(DEMO_DATA), eval_split="test", seed=2, max_train_samples=20, max_eval_samples=5)
    ids = {name: [r.id for r in split] for name, split in a.items()}
    assert len(ids["train"]) == 20 and len(ids["eval"]) == 5
    assert ids == {name: [r.id for r in split] for name, split in b.items()}  # same seed, same records
    assert ids["train"] != [r.id for r in c["train"]]  # another seed, other records
    assert ids["train"] == sorted(ids["train"]) and set(ids["train"]) <= {r.id for r in full["train"]}
    assert ids["train"] != [r.id for r in full["train"][:20]]  # random, not the first 20
    everything = data_lib.load_splits(str(DEMO_DATA), eval_split="test", max_train_samples=10_000)
    assert [r.id for r in everything["train"]] == [r.id for r in full["train"]]
    carved = data_lib.load_splits(str(DEMO_DATA), eval_fraction=0.2, seed=3, max_train_samples=30, max_eval_samples=7)
    assert len(carved["train"]) == 30 and len(carved["eval"]) == 7
    with pytest.raises(ConfigError, match="max_train_samples"):
        DataArguments(max_train_samples=0)


def test_max_samples_are_in_the_cache_fingerprint(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    records = {"train": [data_lib.Record(0, "x", "line 1", {"prompt": "a", "chosen": "b", "rejected": "c"})]}
    examples = {"train": [data_lib.Example(0, [1, 2], [3], [4])]}
    kwargs = dict(ref_model_path=str(tiny_model_dir), revision=None, tokenizer=tokenizer, records_by_split=records,
                  examples_by_split=examples, torch_dtype="float32", ld_alpha=None, mixed_precision="no", seed=4)
    plain = reference_fingerprint(data_args=DataArguments(dataset_name="x"), **kwargs)
    assert "max_train_samples" not in plain  # earlier caches keep their fingerprint
    sliced = reference_fingerprint(data_args=DataArguments(dataset_name="x", max_train_samples=8), **kwargs)
    assert sliced["max_train_samples"] == 8 and sliced["seed_of_selection"] == 4
    other = reference_fingerprint(data_args=DataArguments(dataset_name="x", max_train_samples=9), **kwargs)
    assert other != sliced


def test_the_preset_fills_defaults_only_and_explicit_flags_win(monkeypatch):
    monkeypatch.chdir("/tmp")
    model, data, dpo, train = parse_config((ModelArguments, DataArguments, DPOArguments, TrainArguments),
                                           ["--debug", "--eval_steps", "2", "--max_train_samples", "100"])
    applied = apply_debug_preset(model, data, dpo, train)
    assert (data.max_train_samples, data.max_eval_samples) == (100, DEBUG_PRESET["max_eval_samples"])
    assert (train.eval_steps, train.save_steps, train.logging_steps) == (2, 5, 1)
    assert train.output_dir.startswith("runs/debug-") and applied["output_dir"] == train.output_dir
    assert "eval_steps" not in applied and "max_train_samples" not in applied
    config = DPOConfig(output_dir="mine", logging_steps=3)
    assert apply_debug_preset(config, config, config, config) == {}  # no --debug: nothing changes
    config.debug = True
    apply_debug_preset(config, config, config, config)
    assert (config.output_dir, config.logging_steps, config.save_steps) == ("mine", 3, 5)


@pytest.mark.slow
def test_a_cache_computed_without_the_slice_is_refused(tiny_model_dir, tmp_path):
    data = small_dataset(tmp_path / "data", n_train=16, n_test=4)
    common = ["--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(data), "--eval_split", "test",
              "--max_length", "64"]
    run_script("precompute_ref_logprobs.py", [*common, "--output_dir", str(tmp_path / "cache")])
    proc = run_script("dpo.py", [*common, "--output_dir", str(tmp_path / "run"), "--max_steps", "1",
                                 "--max_train_samples", "8", "--ref_logprobs", str(tmp_path / "cache")], check=False)
    assert proc.returncode != 0
    assert "max_train_samples: cache <absent>, this run 8" in proc.stderr + proc.stdout


@pytest.mark.slow
def test_debug_on_the_demo_data_checkpoints_and_evaluates_early(tiny_model_dir, tmp_path):
    """`--debug` with no --output_dir: runs/debug-<timestamp> (under a temporary working directory here), the
    demo data cut to 256 + 64 records, logging every step, evaluation and a checkpoint at step 5."""
    import shutil

    work = tmp_path / "work"
    shutil.copytree(DEMO_DATA, work / "data")
    proc = run_script("dpo.py", ["--debug", "--model_name_or_path", str(tiny_model_dir), "--dataset_name",
                                 str(work / "data"), "--eval_split", "test", "--max_length", "64", "--max_steps", "6",
                                 "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "32",
                                 "--learning_rate", "1e-3"], check=False)
    # run_script runs from the repository root: the run directory is <root>/runs/debug-*; move it out.
    from helpers import ROOT

    runs = sorted((ROOT / "runs").glob("debug-*"), key=lambda p: p.stat().st_mtime)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "debug-run"
    shutil.move(str(runs[-1]), out)
    assert (out / "checkpoints" / "checkpoint-5" / "COMPLETE").exists()
    scalars = read_scalars(out / "logs")
    assert set(scalars["train/loss"]) == {1, 2, 3, 4, 5, 6} and 5 in scalars["eval/loss"]
    config = (out / "config.yaml").read_text()
    assert "max_train_samples: 256" in config and "max_eval_samples: 64" in config and "debug: true" in config
