"""`--debug`: the preset for a first run on a new dataset or cluster, applied once after parsing.

A few hundred records (`--max_train_samples 256 --max_eval_samples 64`), evaluation and a checkpoint within
the first steps (`--eval_steps 5 --save_steps 5`), `--logging_steps 1`, autograd's anomaly detection (the
backward that produced a NaN/Inf raises with the forward's traceback), and, without `--output_dir`,
`runs/debug-<timestamp>`. A preset value fills only a field left at its dataclass default: a flag given
explicitly (command line, YAML or Python) wins.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import MISSING, fields, is_dataclass

import torch

DEBUG_PRESET = {"max_train_samples": 256, "max_eval_samples": 64, "eval_steps": 5, "save_steps": 5,
                "logging_steps": 1}


def _default(cls, name):
    for f in fields(cls):
        if f.name == name:
            return f.default_factory() if f.default_factory is not MISSING else f.default
    raise KeyError(name)


def apply_debug_preset(*configs) -> dict:
    """With `debug` set on any of `configs` (dataclasses; the same object may come several times), fills the
    preset into every field still at its default, and `output_dir` when none is given. Returns what was set."""
    configs = list({id(c): c for c in configs if is_dataclass(c)}.values())  # unique, in order
    if not any(getattr(c, "debug", False) for c in configs):
        return {}
    applied = {}
    for config in configs:
        names = {f.name for f in fields(config)}
        for name, value in DEBUG_PRESET.items():
            if name in names and getattr(config, name) == _default(type(config), name):
                setattr(config, name, value)
                applied[name] = value
        if "output_dir" in names and not config.output_dir:
            config.output_dir = applied["output_dir"] = f"runs/debug-{shared_timestamp()}"
    return applied


def shared_timestamp() -> str:
    """`YYYYmmdd-HHMMSS` of the main process, the same on every process of a launch."""
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    from .distributed import _cpu_only, process_group_kwargs

    kwargs = {k: v for handler in process_group_kwargs() for k, v in handler.to_kwargs().items()}
    state = PartialState(cpu=_cpu_only(), **kwargs)  # the state the run's Accelerator then shares
    stamp = [time.strftime("%Y%m%d-%H%M%S")]
    if state.num_processes > 1:
        broadcast_object_list(stamp, from_process=0)
    return stamp[0]


def anomaly_detection(train_args):
    """Autograd's anomaly detection (NaN/Inf checks in backward) around the loop with `--debug`."""
    if getattr(train_args, "debug", False):
        return torch.autograd.set_detect_anomaly(True, check_nan=True)
    return contextlib.nullcontext()
