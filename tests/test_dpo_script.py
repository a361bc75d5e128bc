"""scripts/dpo.py end to end on the tiny model: distributed equivalence, TensorBoard, resume, secrets,
configs, learning on the shipped data."""

import json

import pytest
import torch
import yaml
from helpers import DEMO_DATA, load_weights, read_scalars, results, run_main, run_script, small_dataset

TAGS = ["loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
        "logps/rejected"]
TRAIN_ONLY = ["learning_rate", "grad_norm", "tokens_per_second"]


def dpo_args(model, data, out, *extra):
    return ["--model_name_or_path", str(model), "--dataset_name", str(data), "--output_dir", str(out),
            "--max_length", "64", "--learning_rate", "5e-3", "--logging_steps", "1", "--seed", "3", *extra]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return small_dataset(tmp_path_factory.mktemp("data"), n_train=32, n_test=16)


@pytest.mark.slow
def test_two_processes_equal_one_process_with_same_global_batch(tiny_model_dir, data_dir, tmp_path):
    """2 ranks x 2 pairs (gloo) == 1 rank x 4 pairs: same per-step losses (1e-5) and final weights. The data is
    tokenized once: by rank 0 of the first run; its rank 1 and the second run map the stored arrays."""
    store = tmp_path / "store"
    two = run_script("dpo.py", dpo_args(tiny_model_dir, data_dir, tmp_path / "two", "--max_steps", "4",
                                        "--per_device_train_batch_size", "2", "--data_cache_dir", str(store)),
                     processes=2)
    one = run_script("dpo.py", dpo_args(tiny_model_dir, data_dir, tmp_path / "one", "--max_steps", "4",
                                        "--per_device_train_batch_size", "4", "--data_cache_dir", str(store)))
    assert "num_processes 2" in two.stdout and "num_processes 1" in one.stdout
    built, read = "32 pairs tokenized, stored in", "32 pairs read from the prepared-data store"
    assert [line for line in two.stderr.splitlines() if built in line or read in line] == \
        [line for line in two.stderr.splitlines() if ("[rank 0]" in line and built in line)
         or ("[rank 1]" in line and read in line)]
    assert two.stderr.count(built) == 1 and two.stderr.count(read) == 1
    assert read in one.stderr and built not in one.stderr
    assert len([p for p in store.iterdir() if not p.name.startswith(".")]) == 1
    assert results(tmp_path / "two")["num_processes"] == 2
    loss_one = read_scalars(tmp_path / "one" / "logs")["train/loss"]
    loss_two = read_scalars(tmp_path / "two" / "logs")["train/loss"]
    assert sorted(loss_one) == sorted(loss_two) == [1, 2, 3, 4]
    for step in loss_one:
        assert loss_two[step] == pytest.approx(loss_one[step], abs=1e-5)
    assert len(set(loss_one.values())) > 1  # training moved
    w1, w2 = load_weights(tmp_path / "one"), load_weights(tmp_path / "two")
    initial = load_weights(tiny_model_dir)
    assert any(not torch.equal(w1[k], initial[k]) for k in w1)
    # Adam divides by sqrt(v): for parameters with near-zero gradients (rare tokens' embeddings) it
    # amplifies float32 all-reduce ordering differences, so weights get 1e-4 where losses get 1e-5.
    for key in w1:
        torch.testing.assert_close(w2[key], w1[key], atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_tensorboard_tags_config_and_outputs(tiny_model_dir, data_dir, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"beta": 0.3, "max_steps": 99, "eval_split": "test", "eval_steps": 2,
                                      "per_device_train_batch_size": 4}))
    out = tmp_path / "run"
    # The command line overrides the YAML (max_steps 99 -> 3).
    run_script("dpo.py", ["--config", str(config), *dpo_args(tiny_model_dir, data_dir, out, "--max_steps", "3")])
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["beta"] == 0.3 and resolved["max_steps"] == 3 and resolved["eval_split"] == "test"
    scalars = read_scalars(out / "logs")
    for tag in TAGS + TRAIN_ONLY:
        assert set(scalars[f"train/{tag}"]) == {1, 2, 3}, tag
    for tag in TAGS:
        assert set(scalars[f"eval/{tag}"]) == {2, 3}, tag
    assert scalars["train/tokens_per_second"][3] > 0
    final = results(out)
    assert final["global_step"] == 3
    assert final["eval_rewards/accuracies"] == pytest.approx(scalars["eval/rewards/accuracies"][3], abs=1e-6)
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    assert not list(out.rglob("*.bin")) and not list(out.rglob("*.pt"))


@pytest.mark.slow
def test_resume_from_checkpoint_gives_the_uninterrupted_weights(tiny_model_dir, data_dir, tmp_path):
    common = ["--max_steps", "4", "--per_device_train_batch_size", "4", "--save_steps", "2"]
    run_script("dpo.py", dpo_args(tiny_model_dir, data_dir, tmp_path / "full", *common))
    part = tmp_path / "part"
    run_script("dpo.py", dpo_args(tiny_model_dir, data_dir, part, *common[:-2], "--save_steps", "2",
                                  "--save_total_limit", "1"))
    ckpts = sorted(p.name for p in (part / "checkpoints").iterdir())
    assert ckpts == ["checkpoint-4"]  # the limit kept only the newest complete checkpoint
    # Restart from step 2 of the full run's checkpoints, in a fresh run directory.
    resumed = tmp_path / "resumed"
    run_script("dpo.py", dpo_args(tiny_model_dir, data_dir, resumed, *common, "--resume_from_checkpoint",
                                  str(tmp_path / "full" / "checkpoints" / "checkpoint-2")))
    full, again = load_weights(tmp_path / "full"), load_weights(resumed)
    for key in full:
        torch.testing.assert_close(again[key], full[key], atol=1e-6, rtol=0)
    assert set(read_scalars(resumed / "logs")["train/loss"]) == {3, 4}


@pytest.mark.slow
def test_no_secret_reaches_logs_configs_or_event_files(tiny_model_dir, data_dir, tmp_path):
    from helpers import subprocess_env

    secret = "hf_SECRETtoken1234567890"
    out = tmp_path / "run"
    proc = run_script("dpo.py", dpo_args(tiny_model_dir, data_dir, out, "--max_steps", "1"),
                      env=subprocess_env(HF_TOKEN=secret, WANDB_API_KEY=secret))
    assert secret not in proc.stdout + proc.stderr
    for file in out.rglob("*"):
        if file.is_file():
            assert secret.encode() not in file.read_bytes(), file


@pytest.mark.slow
def test_shipped_data_short_run_lifts_heldout_accuracy(tiny_model_dir, tmp_path):
    """Before training policy == reference: every pair ties (accuracy counting ties as half: 0.5).

    Uses the cache, whose values come from other batches than the evaluation's: ties must survive float32 noise."""
    out = tmp_path / "run"
    run_script("precompute_ref_logprobs.py", ["--model_name_or_path", str(tiny_model_dir), "--dataset_name",
                                              str(DEMO_DATA), "--eval_split", "test", "--max_length", "96",
                                              "--output_dir", str(tmp_path / "cache")])
    run_script("dpo.py", ["--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(DEMO_DATA),
                          "--eval_split", "test", "--output_dir", str(out), "--learning_rate", "1e-3",
                          "--max_steps", "30", "--per_device_train_batch_size", "8", "--eval_on_start",
                          "--max_length", "96", "--logging_steps", "10", "--ref_logprobs", str(tmp_path / "cache")])
    scalars = read_scalars(out / "logs")
    assert scalars["eval/rewards/ties"][0] == 1.0
    assert scalars["eval/rewards/accuracies_ties_half"][0] == 0.5
    after = results(out)["eval_rewards/accuracies"]
    assert after >= 0.9, after
    assert results(out)["eval_rewards/margins"] > 0


@pytest.mark.slow
def test_bad_records_are_listed_by_the_script(tiny_model_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    rows = ['{"prompt": "Hi", "chosen": "Hello there.", "rejected": "Go away."}',
            '{"prompt": "Hi", "chosen": "Hello"',  # malformed
            '{"prompt": "Hi", "rejected": "x"}',  # missing chosen
            '{"prompt": "Hi", "chosen": "", "rejected": "x"}',  # empty
            '{"prompt": "Hi", "chosen": "same", "rejected": "same"}',  # identical
            '{"prompt": "Hi", "chosen": 3, "rejected": "x"}',  # non-string
            '{"prompt": null, "chosen": "a", "rejected": "b"}']  # null
    bad.write_text("\n".join(rows) + "\n")
    proc = run_script("dpo.py", dpo_args(tiny_model_dir, bad, tmp_path / "run", "--max_steps", "1"), check=False)
    assert proc.returncode != 0
    for line in range(2, 8):
        assert f"line {line}" in proc.stderr, line
    assert "line 1," not in proc.stderr
    assert not (tmp_path / "run" / "model.safetensors").exists()
    # --on_invalid skip trains on the good record and reports each skipped one.
    run_script("dpo.py", dpo_args(tiny_model_dir, bad, tmp_path / "skip", "--max_steps", "1", "--on_invalid", "skip"))
    report = [json.loads(x) for x in (tmp_path / "skip" / "invalid_records.jsonl").read_text().splitlines()]
    assert {r["location"] for r in report} == {f"line {i}" for i in range(2, 8)}


@pytest.mark.slow
def test_cached_reference_gives_the_online_reference_losses_and_rewards(tiny_model_dir, data_dir, tmp_path):
    """The precompute (its own batch size and order) then --ref_logprobs == a frozen reference model."""
    common = ["--eval_split", "test", "--max_length", "64"]
    run_script("precompute_ref_logprobs.py", ["--model_name_or_path", str(tiny_model_dir), "--dataset_name",
                                              str(data_dir), "--output_dir", str(tmp_path / "cache"),
                                              "--per_device_batch_size", "7", "--seed", "3", *common])
    args = ["--max_steps", "5", "--per_device_train_batch_size", "4", "--eval_steps", "5", "--eval_split", "test"]
    run_script("dpo.py", dpo_args(tiny_model_dir, data_dir, tmp_path / "online", *args))
    run_script("dpo.py", dpo_args(tiny_model_dir, data_dir, tmp_path / "cached", *args,
                                  "--ref_logprobs", str(tmp_path / "cache")))
    online, cached = read_scalars(tmp_path / "online" / "logs"), read_scalars(tmp_path / "cached" / "logs")
    for tag in ("train/loss", "train/rewards/chosen", "train/rewards/rejected", "train/rewards/margins",
                "eval/loss", "eval/rewards/chosen", "eval/rewards/rejected"):
        assert online[tag].keys() == cached[tag].keys(), tag
        for step, value in online[tag].items():
            assert cached[tag][step] == pytest.approx(value, abs=1e-5), (tag, step)


@pytest.mark.slow
def test_user_errors_end_with_a_message_not_a_traceback(tiny_model_dir, data_dir, tmp_path, capsys,
                                                        fresh_accelerate_state):
    # The script's main in this process (run_main): the same run_cli, without a new interpreter's imports.
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    code, _, err = run_main("dpo.py", dpo_args(tiny_model_dir, empty, tmp_path / "e", "--max_steps", "1"), capsys)
    assert code == 1
    assert "no usable training records" in err and "Traceback" not in err
    # An earlier run in the output directory is not silently mixed with a new one.
    out = tmp_path / "run"
    run_script("dpo.py", dpo_args(tiny_model_dir, data_dir, out, "--max_steps", "1"))
    code, _, err = run_main("dpo.py", dpo_args(tiny_model_dir, data_dir, out, "--max_steps", "2"), capsys)
    assert code == 1 and "--overwrite_output_dir" in err
    code, _, err = run_main("dpo.py", dpo_args(tiny_model_dir, data_dir, out, "--max_steps", "2",
                                               "--overwrite_output_dir"), capsys)
    assert code == 0, err[-3000:]
    assert set(read_scalars(out / "logs")["train/loss"]) == {1, 2}
