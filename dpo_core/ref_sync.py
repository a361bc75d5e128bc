"""TR-DPO reference updates (Gorbatovski et al. 2024, "Learn Your Reference Model for Real Good Alignment",
arXiv:2404.09656, eq. 5 "soft update"): every `sync_steps` optimizer steps,

    reference <- alpha * policy + (1 - alpha) * reference

computed parameter by parameter in the reference's dtype, as TRL's `SyncRefModelCallback` does. The synced
reference is training state: it is written into every checkpoint (`reference_model.safetensors`, before
the checkpoint is marked complete) and read back on resume, so a resumed run continues with the very
reference it had.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from accelerate.utils import DistributedType
from safetensors.torch import load_file, save_file

from .errors import ConfigError, MissingError

REFERENCE_FILE = "reference_model.safetensors"


@torch.no_grad()
def mix_into_reference(policy: torch.nn.Module, reference: torch.nn.Module, alpha: float) -> None:
    """`reference <- alpha * policy + (1 - alpha) * reference` for every parameter (matched by name)."""
    policy_params = dict(policy.named_parameters())
    ref_params = dict(reference.named_parameters())
    if policy_params.keys() != ref_params.keys():
        missing = sorted(set(policy_params) ^ set(ref_params))[:5]
        raise ConfigError(f"--sync_ref_model: the policy and the reference differ in parameters (e.g. {missing})")
    for name, ref in ref_params.items():
        ref.mul_(1.0 - alpha).add_(policy_params[name].to(ref.device, ref.dtype), alpha=alpha)


def _gathered(accelerator, model):
    """ZeRO-3 shards the policy's parameters: gather them for the update (every rank holds a full reference)."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if accelerator.distributed_type == DistributedType.DEEPSPEED and plugin is not None and plugin.zero_stage == 3:
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(model.parameters()))
    return contextlib.nullcontext()


def setup_reference_sync(accelerator, model, ref_model, *, alpha: float, sync_steps: int):
    """Registers the reference with accelerate's checkpoints and returns the loop's `on_step_end` hook.

    Args:
        model: the prepared policy; ref_model: the frozen reference (not prepared, same architecture).
    Returns:
        `on_step_end(state)`: updates the reference when `state.global_step % sync_steps == 0`. Every
        optimizer step counts, a skipped (non-finite) one too: its update was dropped, so the policy holds
        finite weights, and the updates stay at the planned steps.
    """

    def on_step_end(state) -> None:
        if state.global_step % sync_steps == 0:
            with _gathered(accelerator, model):
                mix_into_reference(accelerator.unwrap_model(model), ref_model, alpha)

    def save_hook(models, weights, output_dir) -> None:  # before accelerate's files, before the COMPLETE marker
        if accelerator.is_main_process:
            tensors = {n: p.detach().cpu().contiguous() for n, p in ref_model.named_parameters()}
            save_file(tensors, str(Path(output_dir) / REFERENCE_FILE))

    def load_hook(models, input_dir) -> None:
        path = Path(input_dir) / REFERENCE_FILE
        if not path.exists():
            raise MissingError(f"{input_dir} has no {REFERENCE_FILE}: it was not written by a --sync_ref_model "
                                    "run, and the synced reference cannot be restored from it")
        load_reference(ref_model, path)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
    return on_step_end


@torch.no_grad()
def load_reference(ref_model: torch.nn.Module, path: str | Path) -> None:
    """Copies the weights of a `reference_model.safetensors` into `ref_model` (every parameter, exactly)."""
    state = load_file(str(path))
    params = dict(ref_model.named_parameters())
    if state.keys() != params.keys():
        raise ConfigError(f"{path}: its parameters differ from the reference model's "
                         f"(e.g. {sorted(set(state) ^ set(params))[:5]})")
    for name, param in params.items():
        param.copy_(state[name])
