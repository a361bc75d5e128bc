"""Every module imports cleanly and without side effects on torch's global state."""

import importlib
import pkgutil
import subprocess
import sys
from dataclasses import fields, is_dataclass
from pathlib import Path

import pytest
import torch

import dpo_core

ROOT = Path(__file__).resolve().parents[1]
MODULES = [m.name for m in pkgutil.walk_packages(dpo_core.__path__, "dpo_core.")]
SCRIPTS = [*sorted((ROOT / "scripts").glob("*.py")), ROOT / "benchmarks" / "dpo_vs_trl.py"]


@pytest.mark.parametrize("name", MODULES)
def test_module_imports_without_side_effects(name):
    state = (torch.get_default_dtype(), torch.random.get_rng_state().clone(), torch.get_num_threads())
    importlib.import_module(name)
    assert torch.get_default_dtype() == state[0]
    assert torch.equal(torch.random.get_rng_state(), state[1])
    assert torch.get_num_threads() == state[2]


@pytest.mark.slow  # one interpreter per script, importing torch and transformers: ~2-3.5 s each
@pytest.mark.parametrize("script", SCRIPTS, ids=[s.name for s in SCRIPTS])
def test_script_help_runs(script):
    proc = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "output_dir" in proc.stdout or "--output_file" in proc.stdout


def test_every_config_field_has_help():
    from dpo_core import config

    groups = [getattr(config, name) for name in config.__all__ if is_dataclass(getattr(config, name))]
    assert len(groups) >= 13  # every argument dataclass lives in dpo_core.config
    for group in groups:
        for f in fields(group):
            assert len(f.metadata.get("help", "")) > 5, f"{group.__name__}.{f.name} has no help"


@pytest.mark.slow
def test_dpo_help_lists_the_documented_flags():
    proc = subprocess.run([sys.executable, "scripts/dpo.py", "--help"], capture_output=True, text=True, cwd=ROOT)
    for flag in ("--model_name_or_path", "--dataset_name", "--dataset_split", "--eval_split", "--output_dir",
                 "--max_steps", "--num_train_epochs", "--per_device_train_batch_size",
                 "--gradient_accumulation_steps", "--learning_rate", "--lr_scheduler_type", "--warmup_steps",
                 "--weight_decay", "--max_grad_norm", "--beta", "--loss_type", "--loss_weights",
                 "--label_smoothing", "--max_length", "--max_prompt_length", "--logging_steps", "--eval_steps",
                 "--save_steps", "--seed", "--ref_logprobs", "--reference_free", "--config"):
        assert flag in proc.stdout, flag
