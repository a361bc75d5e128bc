"""Test helpers: running the scripts as a user would, reading TensorBoard logs and saved weights back."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

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
    """`python scripts/X.py` for one process; for several, the accelerate launch form that really
    connects them on a CPU-only machine (see accelerate_configs/multi_cpu.yaml)."""
    if processes == 1:
        cmd = [sys.executable, str(ROOT / "scripts" / script), *args]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "accelerate_configs" / "multi_cpu.yaml"), "--num_processes", str(processes),
               "--main_process_port", str(free_port()), str(ROOT / "scripts" / script), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env or subprocess_env(), capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-8000:]}")
    return proc


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
