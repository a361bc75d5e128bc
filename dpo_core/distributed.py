"""The Accelerator, and what DeepSpeed and FSDP need beyond `accelerator.prepare`: the frozen reference model
and the DeepSpeed settings that come from our flags.

- `make_accelerator` builds an Accelerator that really connects several CPU processes (gloo) where no GPU is.

- `configure_deepspeed` fills the DeepSpeed config's `"auto"` gradient clipping from `--max_grad_norm`
  (DeepSpeed clips inside its own step; a config without the key would silently not clip at all).
- `prepare_reference` places a frozen model (the online reference of `dpo.py`, the model of the
  reference precompute) as TRL's `prepare_deepspeed` / `prepare_fsdp` do: under ZeRO-3 it is sharded with
  the training's ZeRO-3 config, under ZeRO-0/1/2 it is a ZeRO-0 DeepSpeed engine (one full copy per process,
  in DeepSpeed's dtype: bf16 weights when the policy's are), under FSDP2 it is sharded layer by layer
  exactly like the policy (accelerate's `fsdp2_prepare_model`, which also fills ranks that
  `fsdp_cpu_ram_efficient_loading` left empty). It is never registered with the accelerator, so
  checkpoints do not carry a second copy of the weights.

Every process must run the same number of forwards through a sharded model (each forward gathers
the weights collectively); accelerate's even batches guarantee it.
"""

from __future__ import annotations

import contextlib
import copy
import os

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs

from .errors import ConfigError


def configure_deepspeed(accelerator: Accelerator, *, max_grad_norm: float) -> None:
    """Before `prepare`: DeepSpeed's gradient clipping from `--max_grad_norm`; a conflicting config is an error.

    DeepSpeed clips and steps inside `accelerator.backward`, so `--max_grad_norm` only acts through its config.
    """
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    value = config.get("gradient_clipping", "auto")
    if value == "auto":
        config["gradient_clipping"] = float(max_grad_norm)
    elif float(value) != float(max_grad_norm):
        raise ConfigError(f"The DeepSpeed config sets gradient_clipping={value} but --max_grad_norm is "
                         f"{max_grad_norm}: set one of them so that they agree (\"auto\" in the DeepSpeed "
                         "config takes --max_grad_norm)")


def prepare_reference(accelerator: Accelerator, model: torch.nn.Module, *, micro_batch_size: int) -> torch.nn.Module:
    """A frozen model ready for `no_grad` forwards under the run's backend (see the module docstring).

    Args:
        model: loaded after the Accelerator was created (under ZeRO-3 it then comes already partitioned).
        micro_batch_size: examples per process per forward; fills DeepSpeed's `"auto"` batch sizes when no
            training dataloader was prepared (the precompute).
    Returns:
        The model to call (a DeepSpeed engine, an FSDP module, or the model on the device), in eval mode.
    """
    model.requires_grad_(False)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        model = _deepspeed_inference_engine(accelerator, model, micro_batch_size)
    elif accelerator.distributed_type == DistributedType.FSDP:
        model = _fsdp_reference(accelerator, model)
    elif not getattr(model, "is_quantized", False):  # bitsandbytes placed a quantized model when loading it
        model = model.to(accelerator.device)
    model.eval()
    return model


def _deepspeed_inference_engine(accelerator: Accelerator, model, micro_batch_size: int):
    """TRL's `prepare_deepspeed`: the training's DeepSpeed config without optimizer, scheduler or optimizer
    offload; ZeRO-3 stays ZeRO-3 (sharded), any other stage becomes 0 (a full copy, DeepSpeed's dtype)."""
    import deepspeed

    config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    hidden = getattr(model.config, "hidden_size", None) or max(getattr(model.config, "hidden_sizes", [0]))
    gas = config.get("gradient_accumulation_steps")
    gas = gas if isinstance(gas, int) else accelerator.gradient_accumulation_steps
    _fill_auto(config, {  # what accelerate fills at `prepare` when a dataloader and optimizer come with the model
        "train_micro_batch_size_per_gpu": micro_batch_size, "gradient_accumulation_steps": gas,
        "train_batch_size": micro_batch_size * gas * accelerator.num_processes, "gradient_clipping": 0.0,
        "zero_optimization.reduce_bucket_size": hidden * hidden,
        "zero_optimization.stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
        "zero_optimization.stage3_param_persistence_threshold": 10 * hidden})
    for key in ("optimizer", "scheduler"):
        config.pop(key, None)
    zero = config.setdefault("zero_optimization", {})
    zero.pop("offload_optimizer", None)  # no optimizer: DeepSpeed would otherwise build a CPU Adam for it
    if zero.get("stage", 0) != 3:
        zero["stage"] = 0
    engine, *_ = deepspeed.initialize(model=model, config=config)
    return engine


def _fill_auto(config: dict, values: dict, prefix: str = "") -> None:
    """Replaces every `"auto"` entry of a (nested) DeepSpeed config by `values["dotted.key"]`."""
    for key, value in config.items():
        if isinstance(value, dict):
            _fill_auto(value, values, f"{prefix}{key}.")
        elif value == "auto":
            if f"{prefix}{key}" not in values:
                raise ConfigError(f"DeepSpeed config: cannot fill {prefix}{key}='auto' for the reference model; "
                                 "set a value")
            config[key] = values[f"{prefix}{key}"]


def _fsdp_reference(accelerator: Accelerator, model):
    """TRL's `prepare_fsdp`, but FSDP2 shards per decoder layer with the policy's plugin (accelerate's own code)."""
    plugin = accelerator.state.fsdp_plugin
    if plugin.fsdp_version == 2:
        from accelerate.utils.fsdp_utils import fsdp2_prepare_model

        return fsdp2_prepare_model(accelerator, model)
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    plugin.set_auto_wrap_policy(model)
    return FSDP(model, sharding_strategy=plugin.sharding_strategy, cpu_offload=plugin.cpu_offload,
                auto_wrap_policy=plugin.auto_wrap_policy, mixed_precision=plugin.mixed_precision_policy,
                sync_module_states=plugin.sync_module_states, backward_prefetch=plugin.backward_prefetch,
                forward_prefetch=plugin.forward_prefetch, use_orig_params=plugin.use_orig_params,
                param_init_fn=plugin.param_init_fn, limit_all_gathers=plugin.limit_all_gathers,
                device_id=accelerator.device)


@contextlib.contextmanager
def main_process_first(accelerator: Accelerator):
    """accelerate's `main_process_first` (rank 0 runs the block, e.g. prepares the data into the store, then the
    others run it), except that an error on rank 0 still lets the others go: they run the block too and, for bad
    data, raise the same one-line error from the same stored problems, where accelerate's version leaves them
    waiting at a barrier whose peer is gone (a gloo "Connection closed by peer" traceback)."""
    if not accelerator.is_main_process:
        accelerator.wait_for_everyone()
    try:
        yield
    finally:
        if accelerator.is_main_process:
            accelerator.wait_for_everyone()


def shutdown(accelerator: Accelerator) -> None:
    """Ends a multi-process run cleanly: all ranks meet, then the process group is destroyed.

    Without it rank 0 sometimes aborts at interpreter exit ("terminate called without an active
    exception") after finishing, which turns a complete run into a failed exit code.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        accelerator.wait_for_everyone()
        torch.distributed.destroy_process_group()


def make_accelerator(**kwargs) -> Accelerator:
    """An Accelerator that really connects several CPU processes (gloo) when no GPU is present."""
    return Accelerator(cpu=_cpu_only(), kwargs_handlers=process_group_kwargs(), **kwargs)


def _cpu_only() -> bool:
    """True on a machine without GPU/MPS, unless DeepSpeed runs (cpu=True would switch DeepSpeed off).

    accelerate's launcher gives several processes on a CPU-only machine only for `--multi_gpu` (or a
    MULTI_GPU config), and they then run unconnected unless the script asks for the CPU itself.
    """
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return False
    return not (torch.cuda.is_available() or torch.backends.mps.is_available())


def process_group_kwargs() -> list:
    """gloo on CPU-only multi-process runs (DeepSpeed needs it said explicitly); nothing otherwise."""
    if torch.cuda.is_available() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return []
    return [InitProcessGroupKwargs(backend="gloo")]
