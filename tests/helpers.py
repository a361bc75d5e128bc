"""Test helpers: running the scripts as a user would, reading TensorBoard logs and saved weights back."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
DEMO_DATA = ROOT / "data" / "demo"


def subprocess_env(**extra) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
           "OMP_NUM_THREADS": "1"}
    env.pop("ACCELERATE_USE_CPU", None)
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_script(script: str, args: list[str], *, processes: int = 1, check: bool = True, timeout: int = 600,
               env: dict | None = None) -> subprocess.CompletedProcess:
    """`python scripts/X.py` (or `python DIR/X.py` for a `script` given with its folder, e.g.
    `benchmarks/dpo_vs_trl.py`) for one process; for several, the accelerate launch form that really
    connects them on a CPU-only machine (see accelerate_configs/multi_cpu.yaml)."""
    path = ROOT / script if "/" in script else ROOT / "scripts" / script
    if processes == 1:
        cmd = [sys.executable, str(path), *args]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "accelerate_configs" / "multi_cpu.yaml"), "--num_processes", str(processes),
               "--main_process_port", str(free_port()), str(path), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env or subprocess_env(), capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-8000:]}")
    return proc


def run_main(script: str, args: list[str], capsys) -> tuple[int, str, str]:
    """`scripts/X.py` run in this process as the script runs itself (`run_cli(main, args)`): (exit code, stdout,
    stderr). For user errors found before training, without the seconds a new interpreter spends on imports."""
    import runpy

    from dpo_core.cli import run_cli

    main = runpy.run_path(str(ROOT / "scripts" / script), run_name="in_process")["main"]
    capsys.readouterr()
    try:
        run_cli(main, args)
        code = 0
    except SystemExit as stop:
        code = stop.code
    out, err = capsys.readouterr()
    return code, out, err


def read_scalars(logdir: str | Path) -> dict[str, dict[int, float]]:
    """Every scalar of every TensorBoard event file under `logdir`: {tag: {step: value}}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, dict[int, float]] = {}
    files = sorted(Path(logdir).rglob("events.out.tfevents.*"))
    assert files, f"no TensorBoard event files under {logdir}"
    for file in files:
        acc = EventAccumulator(str(file), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            for event in acc.Scalars(tag):
                assert event.step not in out.get(tag, {}), f"duplicate step {event.step} for {tag}"
                out.setdefault(tag, {})[event.step] = event.value
    return out


def load_weights(model_dir: str | Path) -> dict[str, torch.Tensor]:
    weights = {}
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        weights.update(load_file(file))
    assert weights, f"no safetensors weights in {model_dir}"
    return weights


def results(run_dir: str | Path) -> dict:
    return json.loads((Path(run_dir) / "train_results.json").read_text())


def small_dataset(path: Path, n_train: int = 32, n_test: int = 16) -> Path:
    """The first pairs of the shipped demo splits, as a folder of train/test JSONL."""
    path.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        lines = (DEMO_DATA / f"{split}.jsonl").read_text().splitlines(keepends=True)[:n]
        (path / f"{split}.jsonl").write_text("".join(lines))
    return path


def read_scalars_as_shown(logdir: str | Path) -> dict[str, dict[int, float]]:
    """The scalars TensorBoard shows: each directory's event files read in order by one accumulator, which
    applies `purge_step` (a resumed run discards what a killed attempt logged past its checkpoint).
    Asserts that no step is shown twice."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, dict[int, float]] = {}
    dirs = sorted({f.parent for f in Path(logdir).rglob("events.out.tfevents.*")})
    assert dirs, f"no TensorBoard event files under {logdir}"
    for directory in dirs:
        acc = EventAccumulator(str(directory), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            steps = [event.step for event in acc.Scalars(tag)]
            assert len(steps) == len(set(steps)), f"{tag}: steps shown twice in {directory}: {steps}"
            for event in acc.Scalars(tag):
                assert event.step not in out.get(tag, {}), f"duplicate step {event.step} for {tag}"
                out.setdefault(tag, {})[event.step] = event.value
    return out


def read_example_ids(run_dir: str | Path) -> dict[int, list[dict]]:
    """`--log_example_ids` lines per rank: {rank: [{"step", "epoch", "micro_batch", "ids"}, ...]}."""
    files = sorted((Path(run_dir) / "example_ids").glob("rank*.jsonl"))
    assert files, f"no example_ids/rank*.jsonl under {run_dir}"
    return {int(f.stem[len("rank"):]): [json.loads(line) for line in f.read_text().splitlines()] for f in files}


# The resumable run shared by the preemption and Slurm tests: 2 processes x 2 pairs x 2 micro-batches per
# step (8 pairs), 48 training pairs: 6 steps per epoch, 8 steps in all (the run crosses an epoch boundary).
RESUME_STEPS, RESUME_STEPS_PER_EPOCH = 8, 6


def resume_args(model, data, out, *extra) -> list[str]:
    return ["--model_name_or_path", str(model), "--dataset_name", str(data), "--output_dir", str(out),
            "--max_length", "64", "--learning_rate", "5e-3", "--logging_steps", "1", "--seed", "5",
            "--max_steps", str(RESUME_STEPS), "--per_device_train_batch_size", "2",
            "--gradient_accumulation_steps", "2", "--log_example_ids", "--resume_from_checkpoint", "latest", *extra]


def trl_tokenize(rows: list[dict], tokenizer) -> list[dict]:
    """TRL 1.16's own `DPOTrainer._prepare_dataset` (the test-only oracle of tokenization), called with the few
    attributes it reads."""
    import types

    pytest.importorskip("trl")
    from datasets import Dataset
    from trl.trainer.dpo_trainer import DPOTrainer

    fake_self = types.SimpleNamespace(_tokenizer=tokenizer)
    args = types.SimpleNamespace(dataset_num_proc=None, max_length=None, truncation_mode="keep_start")
    return DPOTrainer._prepare_dataset(fake_self, Dataset.from_list(rows), tokenizer, args, "test").to_list()


def heldout_preference_accuracy(model_dir, base_dir):
    """Share of the demo's held-out pairs whose chosen completion gains more log-prob over the base model than
    the rejected one (DPO's implicit-reward accuracy), by a plain concatenated forward."""
    from dpo_core.batches import collate_concat
    from dpo_core.data import TokenizeSettings, prepare_examples
    from dpo_core.logps import concatenated_forward
    from dpo_core.modeling import load_model, load_tokenizer

    tokenizer = load_tokenizer(str(base_dir))
    _, examples = prepare_examples(str(DEMO_DATA), tokenizer, TokenizeSettings(max_length=96), split="test")
    pairs = list(examples["train"])
    with torch.no_grad():
        outs = [concatenated_forward(load_model(str(d), torch_dtype="float32", trainable=False),
                                     collate_concat(pairs, tokenizer.pad_token_id)) for d in (model_dir, base_dir)]
    margin = (outs[0].chosen_logps - outs[1].chosen_logps) - (outs[0].rejected_logps - outs[1].rejected_logps)
    return (margin > 0).float().mean().item()
