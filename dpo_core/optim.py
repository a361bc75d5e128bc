"""The optimizer of a training run (`--optim`, `--optim_args`) under transformers' names, built with
transformers' own table (`Trainer.get_optimizer_cls_and_kwargs`), and the weight-decay groups.

Names: `adamw_torch` (the default), `adamw_torch_fused`, `adafactor` (transformers' Adafactor with a fixed
learning rate), `sgd`, and bitsandbytes' `adamw_8bit`, `paged_adamw_8bit`, `paged_adamw_32bit`, `lion_8bit`.
Biases and norm weights get no weight decay with every optimizer (as transformers' Trainer does).
"""

from __future__ import annotations

import ast
import inspect
import json
from types import SimpleNamespace

import torch

from .errors import ConfigError

OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adafactor", "sgd", "adamw_8bit", "paged_adamw_8bit",
              "paged_adamw_32bit", "lion_8bit")
BNB_OPTIMIZERS = ("adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "lion_8bit")
# Devices bitsandbytes' optimizers run on (0.50: CUDA, XPU, and CPU, where paged optimizers fall back to
# ordinary, unpaged state: bitsandbytes warns "Paged optimizers are not supported on CPU").
BNB_DEVICES = ("cuda", "xpu", "cpu")


def parse_optim_args(text: str | None) -> dict:
    """transformers' `--optim_args` string, "k=v,k=v", into keyword arguments; values are Python literals
    where they parse as one (`momentum=0.9` -> 0.9, `nesterov=True` -> True), strings otherwise."""
    out = {}
    for item in filter(None, (text or "").replace(" ", "").split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--optim_args {text!r}: expected comma-separated key=value pairs, got {item!r}")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def parse_scheduler_kwargs(value) -> dict:
    """`--lr_scheduler_kwargs`: a dict (Python, YAML) or its JSON string (command line), as transformers."""
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--lr_scheduler_kwargs {value!r}: not a JSON object ({e})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"--lr_scheduler_kwargs must be a JSON object, got {value!r}")
    return value


def check_optim_device(optim: str, device: torch.device) -> None:
    """A clear error before any weights move when bitsandbytes has no optimizer kernels for `device`."""
    if optim in BNB_OPTIMIZERS:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise ConfigError(f"--optim {optim} needs bitsandbytes: pip install -e \".[quant]\"") from None
        if torch.device(device).type not in BNB_DEVICES:
            raise ConfigError(f"--optim {optim}: bitsandbytes has no optimizer kernels for device "
                              f"{torch.device(device).type!r} (it supports {', '.join(BNB_DEVICES)}); use "
                              "--optim adamw_torch")


def optimizer_cls_and_kwargs(train_args) -> tuple[type, dict]:
    """The class and keyword arguments transformers' Trainer would build for `train_args.optim`, with
    `--optim_args` applied on top (to every optimizer; transformers reads them for a few only). An unknown
    keyword is a `ConfigError` naming the optimizer's accepted ones."""
    from transformers import Trainer

    if train_args.optim not in OPTIMIZERS:
        raise ConfigError(f"Unknown --optim {train_args.optim!r}; choose from {', '.join(OPTIMIZERS)}")
    args = SimpleNamespace(optim=train_args.optim, optim_args=None, learning_rate=train_args.learning_rate,
                           adam_beta1=train_args.adam_beta1, adam_beta2=train_args.adam_beta2,
                           adam_epsilon=train_args.adam_epsilon, weight_decay=train_args.weight_decay,
                           optim_target_modules=None)
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    extra = parse_optim_args(train_args.optim_args)
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "params"}
    unknown = sorted(set(extra) - accepted)
    if unknown:
        raise ConfigError(f"--optim_args {unknown}: not arguments of {cls.__module__}.{cls.__name__} "
                          f"(--optim {train_args.optim}); it takes {', '.join(sorted(accepted))}")
    return cls, {**kwargs, **extra}


def decay_groups(model, weight_decay: float) -> list[dict]:
    """Trainable parameters in two groups: weight decay for matrices, none for biases and norm weights."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.dim() < 2 or "norm" in name.lower() else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model, train_args, device: torch.device | str | None = None) -> torch.optim.Optimizer:
    """`--optim` over the trainable weights, biases and norm weights without weight decay."""
    if device is not None:
        check_optim_device(train_args.optim, device)
    cls, kwargs = optimizer_cls_and_kwargs(train_args)
    return cls(decay_groups(model, train_args.weight_decay), **kwargs)
