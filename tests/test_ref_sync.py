"""dpo_core/ref_sync.py: TR-DPO reference updates through the loop's on_step_end hook, in checkpoints and
across a resume."""

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from helpers import load_weights, read_scalars, small_dataset
from safetensors.torch import load_file

import dpo_core.dpo as dpo_module
from dpo_core.config import DataArguments, DPOArguments, ModelArguments, TrainArguments, parse_config
from dpo_core.ref_sync import REFERENCE_FILE

ALPHA = 0.6


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")  # every test here trains in-process


def sync_configs(model, data, out, *extra):
    return parse_config((ModelArguments, DataArguments, DPOArguments, TrainArguments),
                        ["--model_name_or_path", str(model), "--dataset_name", str(data), "--output_dir", str(out),
                         "--max_length", "64", "--learning_rate", "1e-2", "--logging_steps", "1", "--seed", "3",
                         "--per_device_train_batch_size", "4", "--sync_ref_model", "--ref_model_sync_steps", "2",
                         "--ref_model_mixup_alpha", str(ALPHA), *extra])


@pytest.fixture(scope="module")
def synced_run(tiny_model_dir, tmp_path_factory):
    """4 steps, a reference update every 2, a checkpoint after every step."""
    root = tmp_path_factory.mktemp("sync")
    data = small_dataset(root / "data", n_train=32, n_test=4)
    out = root / "run"
    dpo_module.run_dpo(*sync_configs(tiny_model_dir, data, out, "--max_steps", "4", "--save_steps", "1"))
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return data, out


def checkpoint(run, step):
    path = run / "checkpoints" / f"checkpoint-{step}"
    return load_file(path / "model.safetensors"), load_file(path / REFERENCE_FILE)


def test_reference_is_mixed_exactly_at_the_sync_steps(synced_run, tiny_model_dir):
    """ref@1 == initial and ref@3 == ref@2 (bitwise: no update); ref@2 and ref@4 == alpha * policy + (1 - alpha)
    * previous ref, recomputed in float64 from the checkpointed float32 weights (atol 1e-7: two float32
    roundings of values below 1)."""
    _, run = synced_run
    initial = load_weights(tiny_model_dir)
    policy = {s: checkpoint(run, s)[0] for s in (1, 2, 3, 4)}
    ref = {s: checkpoint(run, s)[1] for s in (1, 2, 3, 4)}
    ref[0] = initial
    assert ref[1].keys() == initial.keys()
    for step in (2, 4):  # the check below is not vacuous: the policy moved away from the reference
        assert max((policy[step][k] - ref[step - 1][k]).abs().max() for k in initial) > 1e-3
    for key in initial:
        assert torch.equal(ref[1][key], initial[key]), key
        assert torch.equal(ref[3][key], ref[2][key]), key
        for step in (2, 4):
            expected = ALPHA * policy[step][key].double() + (1 - ALPHA) * ref[step - 1][key].double()
            torch.testing.assert_close(ref[step][key].double(), expected, atol=1e-7, rtol=0)


def test_resume_across_a_sync_restores_the_reference(synced_run, tiny_model_dir, tmp_path):
    """Resuming from step 3 (after the update at 2) ends with the uninterrupted run's weights; the reference
    saved there differs from the initial weights, so a resume that lost it could not match."""
    data, run = synced_run
    initial, ref3 = load_weights(tiny_model_dir), checkpoint(run, 3)[1]
    assert any(not torch.equal(ref3[k], initial[k]) for k in initial)
    resumed = tmp_path / "resumed"
    dpo_module.run_dpo(*sync_configs(tiny_model_dir, data, resumed, "--max_steps", "4", "--resume_from_checkpoint",
                                       str(run / "checkpoints" / "checkpoint-3")))
    full, again = load_weights(run), load_weights(resumed)
    for key in full:
        assert torch.equal(again[key], full[key]), key
    assert read_scalars(resumed / "logs")["train/loss"][4] == read_scalars(run / "logs")["train/loss"][4]


def test_skipped_steps_count_for_the_sync_schedule(tiny_model_dir, tmp_path, monkeypatch):
    """on_step_end runs after every optimizer step, a skipped (NaN) one too, with global_step counting it:
    updates stay at the planned steps (2 and 4 here, step 2 skipped), and the weights stay finite."""
    data = small_dataset(tmp_path / "data", n_train=32, n_test=4)
    real_loss, loss_calls = dpo_module.dpo_loss, {"n": 0}

    def nan_at_step_2(*args, **kwargs):
        loss_calls["n"] += 1
        losses, c, r = real_loss(*args, **kwargs)
        return (losses * float("nan") if loss_calls["n"] == 2 else losses), c, r

    seen, real_loop = [], dpo_module.train_loop

    def loop(*args, on_step_end, **kwargs):
        def hook(state):
            seen.append((state.global_step, state.skipped_steps))
            on_step_end(state)
        return real_loop(*args, on_step_end=hook, **kwargs)

    synced = []
    import dpo_core.ref_sync as ref_sync

    real_mix = ref_sync.mix_into_reference

    def mix(policy, reference, alpha):
        synced.append(seen[-1][0])
        real_mix(policy, reference, alpha)
        assert all(torch.isfinite(p).all() for p in reference.parameters())

    monkeypatch.setattr(dpo_module, "dpo_loss", nan_at_step_2)
    monkeypatch.setattr(dpo_module, "train_loop", loop)
    monkeypatch.setattr(ref_sync, "mix_into_reference", mix)
    dpo_module.run_dpo(*sync_configs(tiny_model_dir, data, tmp_path / "run", "--max_steps", "4"))
    assert seen == [(1, 0), (2, 1), (3, 1), (4, 1)]
    assert synced == [2, 4]
