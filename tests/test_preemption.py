"""Preemption and exact resume (dpo_core/training.py): real signals sent from outside to real 2-process runs.

A stop signal (SIGTERM or SIGUSR1) makes the run save a complete checkpoint at the next optimizer step and
exit 0; SIGKILL during a save leaves an incomplete `checkpoint-N.tmp` that is ignored and cleaned. Each time
the SAME command runs again (`--resume_from_checkpoint latest`), and at the end the run must equal the
uninterrupted one: weights to 1e-6 (fp32), the example ids of every micro-batch of every step on every rank,
and the TensorBoard scalars (each step once).

The runs are slowed down from outside (tests/hooks/sitecustomize.py) so that a signal lands at a chosen point.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import (
    RESUME_STEPS,
    RESUME_STEPS_PER_EPOCH,
    ROOT,
    free_port,
    load_weights,
    read_example_ids,
    read_scalars,
    read_scalars_as_shown,
    results,
    resume_args,
    subprocess_env,
)

from dpo_core.checkpoints import complete_checkpoints

HOOKS = ROOT / "tests" / "hooks"


def start(args, **hooks) -> subprocess.Popen:
    """2 processes as a Slurm node runs them (slurm/launch.sh): the launcher ignores the stop signals, which
    every process then receives (`signal_all`), as from Slurm."""
    env = subprocess_env(PYTHONPATH=os.pathsep.join([str(HOOKS), os.environ.get("PYTHONPATH", "")]),
                         **{k: str(v) for k, v in hooks.items()})
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "accelerate_configs" / "multi_cpu.yaml"), "--num_processes", "2", "--main_process_port",
           str(free_port()), str(ROOT / "scripts" / "dpo.py"), *args]
    return subprocess.Popen(["bash", "-c", "trap '' USR1 TERM; export PET_SIGNALS_TO_HANDLE=SIGINT; exec \"$@\"",
                             "launcher", *cmd], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 240):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended ({proc.returncode}) before the point to interrupt:\n"
                                 f"{proc.stdout.read()[-4000:]}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("the run did not reach the point to interrupt")


def started_step(run: Path, step: int, ranks=(0, 1)):
    """True once every rank has begun the first micro-batch of `step` (its ids line is written before the
    forward)."""
    def check():
        files = [run / "example_ids" / f"rank{r}.jsonl" for r in ranks]
        return all(f.exists() and f'"step": {step},' in f.read_text() for f in files)
    return check


def finish(proc: subprocess.Popen, timeout: float = 240) -> str:
    out, _ = proc.communicate(timeout=timeout)
    return out


def signal_all(proc: subprocess.Popen, sig: int) -> None:
    """The launcher and its training processes, as Slurm signals every process of a job step (the launcher
    starts its workers in sessions of their own: a process-group signal would miss them)."""
    for pid in [*worker_pids(proc), proc.pid]:
        os.kill(pid, sig)


def worker_pids(proc: subprocess.Popen) -> list[int]:
    """The training processes (children of the launcher)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == proc.pid:  # ppid
            pids.append(int(stat.parent.name))
    return sorted(pids)


def assert_equals_reference(run: Path, reference: Path, initial: Path):
    final, expected = load_weights(run), load_weights(reference)
    for key in expected:
        torch.testing.assert_close(final[key], expected[key], atol=1e-6, rtol=0, msg=key)
    assert any(not torch.equal(final[k], v) for k, v in load_weights(initial).items())  # it did train
    ids, expected_ids = read_example_ids(run), read_example_ids(reference)
    assert ids == expected_ids  # every step, micro-batch and rank saw the same examples: none skipped or repeated
    assert [line["step"] for line in ids[0]] == [s for s in range(1, RESUME_STEPS + 1) for _ in range(2)]
    shown, expected_scalars = read_scalars_as_shown(run / "logs"), read_scalars(reference / "logs")
    for tag in ("train/loss", "train/rewards/margins", "train/grad_norm", "train/learning_rate"):
        assert sorted(shown[tag]) == list(range(1, RESUME_STEPS + 1)), tag
        for step, value in expected_scalars[tag].items():
            assert shown[tag][step] == pytest.approx(value, abs=1e-6), (tag, step)
    assert results(run)["global_step"] == RESUME_STEPS and results(run)["num_processes"] == 2


def assert_stopped_at(proc_out: str, rc: int, run: Path, earliest: int) -> int:
    """A clean preemption stop: status 0, a complete checkpoint at a step boundary mid-epoch, no final model."""
    assert rc == 0, proc_out[-4000:]
    assert "Stop signal received" in proc_out
    step = int(complete_checkpoints(run)[-1].name.split("-")[1])
    assert earliest <= step <= earliest + 1, step  # the step begun when the signal came, or at worst the next
    assert step % RESUME_STEPS_PER_EPOCH, "not mid-epoch"
    assert f"stopped at step {step}," in proc_out
    assert not (run / "train_results.json").exists() and not (run / "model.safetensors").exists()
    return step


@pytest.mark.slow
def test_sigterm_and_usr1_mid_accumulation_then_the_same_command_equals_the_uninterrupted_run(
        tiny_model_dir, resume_data, resume_reference, tmp_path):
    run = tmp_path / "run"
    args = resume_args(tiny_model_dir, resume_data, run)
    # 1. SIGTERM to every process while step 2's first micro-batch runs (mid-accumulation, mid-epoch).
    proc = start(args, DPO_CORE_TEST_BATCH_SLEEP=0.5)
    wait_for(started_step(run, 2), proc)
    signal_all(proc, signal.SIGTERM)
    out = finish(proc)
    first = assert_stopped_at(out, proc.returncode, run, earliest=2)
    assert read_scalars(run / "logs")["train/loss"].keys() == set(range(1, first + 1))
    # 2. The same command resumes; SIGUSR1 to ONE training process only: the ranks agree (the flag travels in
    # the step's all-reduce) and both stop at the same step boundary, a second resume within the epoch.
    proc = start(args, DPO_CORE_TEST_BATCH_SLEEP=0.5)
    wait_for(started_step(run, first + 1), proc)
    workers = worker_pids(proc)
    assert len(workers) == 2, workers
    os.kill(workers[1], signal.SIGUSR1)
    out = finish(proc)
    assert f"Resumed from {run / 'checkpoints' / f'checkpoint-{first}'}" in out
    second = assert_stopped_at(out, proc.returncode, run, earliest=first + 1)
    # 3. The same command again runs to the end (across the epoch boundary).
    proc = start(args)
    out = finish(proc)
    assert proc.returncode == 0, out[-4000:]
    assert f"checkpoint-{second} at step {second}" in out
    read_scalars(run / "logs")  # no step logged twice, even in the raw event files
    assert_equals_reference(run, resume_reference, tiny_model_dir)


@pytest.mark.slow
def test_sigkill_during_saves_then_the_same_command_equals_the_uninterrupted_run(
        tiny_model_dir, resume_data, resume_reference, tmp_path):
    run = tmp_path / "run"
    args = resume_args(tiny_model_dir, resume_data, run, "--save_steps", "2", "--save_total_limit", "1")
    tmp2, tmp4 = (run / "checkpoints" / f"checkpoint-{k}.tmp" for k in (2, 4))
    # 1. Killed while the first checkpoint is written: nothing committed yet.
    proc = start(args, DPO_CORE_TEST_SAVE_SLEEP=4)
    wait_for(tmp2.exists, proc)
    signal_all(proc, signal.SIGKILL)
    proc.wait()
    assert complete_checkpoints(run) == [] and tmp2.exists()
    # 2. The same command starts afresh in that output_dir (the earlier attempt's logs and ids are dropped) and
    # is killed while saving step 4: the complete checkpoint-2 is still there despite --save_total_limit 1.
    proc = start(args, DPO_CORE_TEST_SAVE_SLEEP=4)
    wait_for(tmp4.exists, proc)
    signal_all(proc, signal.SIGKILL)
    proc.wait()
    assert [p.name for p in complete_checkpoints(run)] == ["checkpoint-2"] and tmp4.exists()
    # 3. The same command resumes from checkpoint-2, cleans the incomplete save, and finishes. TensorBoard
    # hides what attempt 2 logged past step 2 (steps 3 and 4 are in two event files: purge_step).
    proc = start(args)
    out = finish(proc)
    assert proc.returncode == 0, out[-4000:]
    assert "at step 2" in out and "Resumed from" in out
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [f"checkpoint-{RESUME_STEPS}"]
    assert_equals_reference(run, resume_reference, tiny_model_dir)


def test_stop_signal_in_process_raises_after_the_checkpoint_and_restores_handlers(
        tiny_model_dir, resume_data, tmp_path, monkeypatch, fresh_accelerate_state):
    """train_dpo in this process: SIGUSR1 (to itself) during the first micro-batch of step 2 ->
    `TrainingPreempted` at step 2 after the checkpoint is committed; the caller's handlers are back."""
    import dpo_core.dpo as dpo_module
    from dpo_core.checkpoints import COMPLETE
    from dpo_core.config import DataArguments, DPOArguments, ModelArguments, TrainArguments, parse_config
    from dpo_core.errors import TrainingPreempted

    real, calls = dpo_module.dpo_loss, {"n": 0}

    def loss(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:  # micro-batch 0 of step 2 (2 micro-batches per step)
            os.kill(os.getpid(), signal.SIGUSR1)
        return real(*a, **k)

    monkeypatch.setattr(dpo_module, "dpo_loss", loss)
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    configs = parse_config((ModelArguments, DataArguments, DPOArguments, TrainArguments),
                           ["--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(resume_data),
                            "--output_dir", str(tmp_path / "run"), "--max_length", "64", "--max_steps", "4",
                            "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2",
                            "--resume_from_checkpoint", "latest", "--report_to", "none"])
    with pytest.raises(TrainingPreempted, match="stopped at step 2,") as stopped:
        dpo_module.run_dpo(*configs)
    assert calls["n"] == 4  # the step in progress was completed, no further micro-batch was started
    assert stopped.value.checkpoint == tmp_path / "run" / "checkpoints" / "checkpoint-2"
    assert (stopped.value.checkpoint / COMPLETE).exists()
    assert not (tmp_path / "run" / "model.safetensors").exists()
    assert {s: signal.getsignal(s) for s in before} == before


def test_a_stop_signal_during_setup_is_kept_and_stops_at_the_first_step(
        tiny_model_dir, resume_data, tmp_path, monkeypatch, fresh_accelerate_state):
    """SIGTERM while the model loads (before the training loop exists): not lost (the Slurm launcher ignores
    the signals, so a worker's default would be to ignore it too); the run stops after step 1 with a checkpoint."""
    import dpo_core.dpo as dpo_module
    from dpo_core.config import DataArguments, DPOArguments, ModelArguments, TrainArguments, parse_config
    from dpo_core.errors import TrainingPreempted

    real = dpo_module.setup_dpo

    def setup(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **k)

    monkeypatch.setattr(dpo_module, "setup_dpo", setup)
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    configs = parse_config((ModelArguments, DataArguments, DPOArguments, TrainArguments),
                           ["--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(resume_data),
                            "--output_dir", str(tmp_path / "run"), "--max_length", "64", "--max_steps", "4",
                            "--per_device_train_batch_size", "2", "--report_to", "none"])
    with pytest.raises(TrainingPreempted, match="stopped at step 1,") as stopped:
        dpo_module.run_dpo(*configs)
    assert stopped.value.checkpoint == tmp_path / "run" / "checkpoints" / "checkpoint-1"
    assert {s: signal.getsignal(s) for s in before} == before


def test_the_same_command_after_the_end_trains_and_logs_nothing_again(
        tiny_model_dir, resume_data, tmp_path, capsys, fresh_accelerate_state):
    """A requeued job whose run had already finished (or a user re-running it): the run saved a checkpoint at its
    last step (5, not a multiple of --save_steps 2), so the same command resumes there, trains nothing, logs no
    step twice (TensorBoard as shown, every event file read), and leaves the weights and results as they were."""
    import dpo_core.dpo as dpo_module
    from dpo_core.config import DataArguments, DPOArguments, ModelArguments, TrainArguments, parse_config

    run = tmp_path / "run"
    argv = ["--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(resume_data), "--output_dir", str(run),
            "--max_length", "64", "--max_steps", "5", "--save_steps", "2", "--logging_steps", "1",
            "--per_device_train_batch_size", "2", "--resume_from_checkpoint", "latest", "--report_to", "tensorboard"]
    dpo_module.run_dpo(*parse_config((ModelArguments, DataArguments, DPOArguments, TrainArguments), argv))
    assert [p.name for p in complete_checkpoints(run)] == ["checkpoint-2", "checkpoint-4", "checkpoint-5"]
    weights, first = load_weights(run), results(run)
    event_files = len(list((run / "logs").rglob("events.out.tfevents.*")))
    capsys.readouterr()
    dpo_module.run_dpo(*parse_config((ModelArguments, DataArguments, DPOArguments, TrainArguments), argv))
    assert "the run is complete, nothing to train" in capsys.readouterr().out
    assert sorted(read_scalars_as_shown(run / "logs")["train/loss"]) == [1, 2, 3, 4, 5]  # each step once
    assert len(list((run / "logs").rglob("events.out.tfevents.*"))) >= event_files
    again = load_weights(run)
    assert all(torch.equal(weights[k], again[k]) for k in weights)
    assert results(run)["train_loss"] == first["train_loss"] and results(run)["global_step"] == 5
