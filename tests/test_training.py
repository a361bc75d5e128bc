"""dpo_core/training.py: the non-finite guard, checkpoint commit markers, resume resolution, configs."""

import pytest
import torch
from helpers import load_weights, read_scalars, results, small_dataset

import dpo_core.dpo as dpo_module
from dpo_core.checkpoints import COMPLETE, complete_checkpoints, resolve_resume
from dpo_core.config import DataArguments, DPOArguments, ModelArguments, TrainArguments, parse_config
from dpo_core.errors import NonFiniteError

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")  # every test here trains in-process


def configs(model, data, out, *extra):
    return parse_config((ModelArguments, DataArguments, DPOArguments, TrainArguments),
                        ["--model_name_or_path", str(model), "--dataset_name", str(data), "--output_dir", str(out),
                         "--max_length", "64", "--learning_rate", "1e-2", "--logging_steps", "1",
                         "--per_device_train_batch_size", "4", *extra])


def nan_on_calls(bad_calls):
    """Wraps dpo_loss so that the given (1-based) calls return NaN losses."""
    real, calls = dpo_module.dpo_loss, {"n": 0}

    def loss(*args, **kwargs):
        calls["n"] += 1
        losses, c, r = real(*args, **kwargs)
        if calls["n"] in bad_calls:
            losses = losses * float("nan")
        return losses, c, r

    return loss


def test_nan_loss_is_skipped_logged_and_leaves_weights_bitwise_unchanged(tiny_model_dir, tmp_path, monkeypatch):
    data = small_dataset(tmp_path / "data", n_train=8, n_test=4)
    monkeypatch.setattr(dpo_module, "dpo_loss", nan_on_calls({1}))
    out = tmp_path / "run"
    dpo_module.run_dpo(*configs(tiny_model_dir, data, out, "--max_steps", "1"))
    before, after = load_weights(tiny_model_dir), load_weights(out)
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key
    assert results(out)["skipped_steps"] == 1
    assert read_scalars(out / "logs")["train/skipped_steps"] == {1: 1.0}


def test_a_skipped_step_does_not_change_the_other_updates(tiny_model_dir, tmp_path, monkeypatch):
    """NaN at step 2 of 3: that step is skipped and counted, no gradient norm is logged for it, and
    steps 1 and 3 still train (weights move and stay finite)."""
    data = small_dataset(tmp_path / "data", n_train=16, n_test=4)
    monkeypatch.setattr(dpo_module, "dpo_loss", nan_on_calls({2}))
    out = tmp_path / "run"
    dpo_module.run_dpo(*configs(tiny_model_dir, data, out, "--max_steps", "3"))
    weights = load_weights(out)
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert any(not torch.equal(weights[k], w) for k, w in load_weights(tiny_model_dir).items())
    scalars = read_scalars(out / "logs")
    assert scalars["train/skipped_steps"] == {1: 0.0, 2: 1.0, 3: 1.0}
    assert set(scalars["train/grad_norm"]) == {1, 3}  # no gradient norm is logged for the skipped step


def test_consecutive_nonfinite_steps_stop_the_run(tiny_model_dir, tmp_path, monkeypatch):
    data = small_dataset(tmp_path / "data", n_train=16, n_test=4)
    monkeypatch.setattr(dpo_module, "dpo_loss", nan_on_calls(set(range(1, 100))))
    with pytest.raises(NonFiniteError, match="2 optimizer steps in a row"):
        dpo_module.run_dpo(*configs(tiny_model_dir, data, tmp_path / "run", "--max_steps", "5",
                                      "--max_consecutive_nonfinite", "2"))
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_only_committed_checkpoints_count(tmp_path):
    root = tmp_path / "checkpoints"
    for step, done in ((2, True), (4, True), (6, False)):
        (root / f"checkpoint-{step}").mkdir(parents=True)
        if done:
            (root / f"checkpoint-{step}" / COMPLETE).write_text("{}")
    (root / "checkpoint-8.tmp").mkdir()
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-4"]
    assert resolve_resume(tmp_path, "latest").name == "checkpoint-4"
    assert resolve_resume(tmp_path / "empty", "latest") is None  # first start: fresh
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        resolve_resume(tmp_path, str(root / "checkpoint-6"))


def test_config_validation_errors():
    with pytest.raises(ValueError, match="Unknown --loss_type"):
        DPOArguments(loss_type=["sigmoid", "nope"])
    with pytest.raises(ValueError, match="loss_weights"):
        DPOArguments(loss_type=["sigmoid", "sft"], loss_weights=[1.0])
    with pytest.raises(ValueError, match="max_prompt_length"):
        DataArguments(max_length=64, max_prompt_length=64)
    with pytest.raises(ValueError, match="exclude"):
        DPOArguments(reference_free=True, ref_logprobs="x")


def test_yaml_unknown_key_is_an_error(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("betta: 0.2\n")
    with pytest.raises(ValueError, match="unknown keys \\['betta'\\]"):
        parse_config((DPOArguments,), ["--config", str(cfg)])


def test_resolved_config_round_trips_through_config_flag(tmp_path):
    from dpo_core.config import save_config

    groups = (ModelArguments, DataArguments, DPOArguments, TrainArguments)
    first = parse_config(groups, ["--model_name_or_path", "m", "--output_dir", "o", "--beta", "0.25",
                                  "--loss_type", "sigmoid", "sft", "--loss_weights", "1", "0.2", "--max_steps", "7"])
    save_config(tmp_path / "config.yaml", *first)
    again = parse_config(groups, ["--config", str(tmp_path / "config.yaml")])
    assert again == first


def test_tie_metrics_tell_noise_from_wins():
    """beta 0.1, log-probs ~ -50 each: tolerance 1e-5 * 0.1 * 100 = 1e-4 in reward units."""
    from dpo_core.losses import preference_metrics, tie_tolerance

    chosen = torch.tensor([0.0, 3e-6, 0.5, -0.2])
    rejected = torch.tensor([0.0, 0.0, 0.0, 0.3])
    logps = torch.full((4,), -50.0)
    m = preference_metrics(chosen, rejected, tie_tolerance(logps, logps, beta=0.1))
    assert m["rewards/accuracies"].tolist() == [0.0, 0.0, 1.0, 0.0]
    assert m["rewards/ties"].tolist() == [1.0, 1.0, 0.0, 0.0]
    assert m["rewards/accuracies_ties_half"].tolist() == [0.5, 0.5, 1.0, 0.0]
    # Without a tolerance: TRL's strict accuracy (the 3e-6 noise counts as a win).
    assert preference_metrics(chosen, rejected)["rewards/accuracies"].tolist() == [0.0, 1.0, 1.0, 0.0]
