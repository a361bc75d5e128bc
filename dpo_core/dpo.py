"""DPO training: the DPO step and the reference wiring (cache | frozen model | the policy without its adapter |
none). `train_dpo(DPOConfig(...))` is the whole of `scripts/dpo.py`; `setup_dpo` builds everything the loop
needs (the benchmark runs the same setup).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator

from . import data as data_lib
from .compiling import compile_for_training
from .config import DPOConfig
from .debug import anomaly_detection, apply_debug_preset
from .distributed import main_process_first, prepare_reference
from .errors import ConfigError
from .hub import check_hub_args, checkpoint_pusher
from .kto import make_kto_step
from .kto_data import KTOTokenize
from .layouts import LayoutSlot
from .losses import dpo_loss, orpo_metrics, preference_metrics, tie_tolerance
from .modeling import (
    adapter_reference,
    add_reference_adapter,
    disable_dropout,
    enable_gradient_checkpointing,
    gguf_of,
    is_peft_model,
    load_model_and_tokenizer,
    load_model_from_args,
    quantization_name,
)
from .ref_cache import load_cache, reference_fingerprint
from .ref_sync import setup_reference_sync
from .runs import TrainResult, finish_run, prepare_training, require_examples, schedule_and_resume, start_run
from .throughput import make_batch_flops, peak_flops
from .training import StopSignals, handles_stop_signals, train_loop


def make_dpo_step(dpo_args, *, forward, ref_model=None, ref_context=contextlib.nullcontext):
    """The DPO step: `(model, batch) -> (mean loss, stats)`; reference from the batch (cache) or `ref_model`
    (its forward runs inside `ref_context()`: for LoRA, the policy itself with the adapter disabled). Nothing
    is computed on the reference when no --loss_type needs it (simpo, cpo, orpo) or with --reference_free."""
    loss_kwargs = dpo_args.loss_kwargs()
    uses_reference = dpo_args.uses_reference()

    def step(model, batch):
        out = forward(model, batch, ld_alpha=dpo_args.ld_alpha, wpo=dpo_args.use_weighting)
        if not uses_reference:
            ref_chosen = ref_rejected = None
        elif "ref_chosen_logps" in batch:
            ref_chosen, ref_rejected = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        else:
            with torch.no_grad(), ref_context():
                ref = forward(ref_model, batch, ld_alpha=dpo_args.ld_alpha)
            ref_chosen, ref_rejected = ref.chosen_logps, ref.rejected_logps
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            out.chosen_logps, out.rejected_logps, ref_chosen, ref_rejected, **loss_kwargs,
            chosen_lengths=out.chosen_lengths, rejected_lengths=out.rejected_lengths, chosen_nll=out.chosen_nll,
            chosen_wpo_log_weights=out.chosen_wpo_log_weights,
            rejected_wpo_log_weights=out.rejected_wpo_log_weights)
        tol = tie_tolerance(out.chosen_logps, out.rejected_logps, dpo_args.beta)
        stats = {"loss": losses.detach(), **preference_metrics(chosen_rewards, rejected_rewards, tol),
                 "logps/chosen": out.chosen_logps.detach(), "logps/rejected": out.rejected_logps.detach(),
                 "logits/chosen": out.chosen_mean_logits.detach(),
                 "logits/rejected": out.rejected_mean_logits.detach()}
        if "orpo" in dpo_args.loss_type:  # TRL's ORPO metrics: log_odds_ratio, log_odds_chosen, nll_loss
            stats.update(orpo_metrics(out.chosen_logps, out.rejected_logps, out.chosen_lengths, out.rejected_lengths,
                                      out.chosen_nll))
        return losses.mean(), stats

    return step


def load_reference_cache(cache_dir, *, model_args, data_args, dpo_args, tokenizer, records, examples,
                         mixed_precision, seed):
    """The verified reference cache for every split of this run (an error names any mismatch)."""
    expected = reference_fingerprint(
        ref_model_path=model_args.reference_path(), revision=model_args.revision, tokenizer=tokenizer,
        gguf_file=gguf_of(model_args, model_args.reference_path()),
        records_by_split=records, examples_by_split=examples, data_args=data_args,
        torch_dtype=model_args.torch_dtype, ld_alpha=dpo_args.ld_alpha, mixed_precision=mixed_precision, seed=seed,
        quantization=quantization_name(model_args))
    return load_cache(cache_dir, expected, {split: [e.id for e in exs] for split, exs in examples.items()})


@dataclass
class DPORun:
    """What `setup_dpo` builds: the prepared model, optimizer and loaders, the step, and its hooks."""

    model: torch.nn.Module
    tokenizer: object
    optimizer: torch.optim.Optimizer
    train_loader: object
    eval_loader: object | None
    step_fn: Callable
    on_step_end: Callable | None  # TR-DPO's reference sync
    batch_flops: Callable  # model FLOPs of a batch (train/mfu)
    forward_mode: str = "concat"  # the layout the step runs (`auto` resolved)


def setup_dpo(accelerator: Accelerator, model_args, data_args, dpo_args, train_args, *,
              report_path: Path | None, shuffle: bool = True) -> DPORun:
    """Policy, data, reference and step of a DPO run, prepared by `accelerator` (call before
    `schedule_and_resume`: a resumed checkpoint restores what this prepares)."""
    model, tokenizer = load_model_and_tokenizer(model_args)
    disable_dropout(model)  # LoRA's dropout too: its modules are added after loading
    lora = is_peft_model(model)
    if lora and dpo_args.sync_ref_model:
        raise ConfigError("--sync_ref_model with LoRA is not supported: the reference is the base model (adapter "
                          "disabled), and a mix of policy and reference is no LoRA adapter of the same rank.")
    if model_args.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    unpaired = dpo_args.unpaired_loss()  # KTO: unpaired examples with KL completions (dpo_core.kto_data)
    with main_process_first(accelerator):
        records, examples = data_lib.prepare_from_args(
            data_args, tokenizer, seed=train_args.seed, report_path=report_path, progress=accelerator.is_main_process,
            tokenize=KTOTokenize(train_args.per_device_train_batch_size) if unpaired else None)
    require_examples(examples, data_args)
    cache, ref_model, adapter_ref = None, None, False
    if not dpo_args.uses_reference():
        pass  # --reference_free, or only reference-free losses (simpo, cpo, orpo): no reference model or cache
    elif dpo_args.ref_logprobs:
        cache = load_reference_cache(dpo_args.ref_logprobs, model_args=model_args, data_args=data_args,
                                     dpo_args=dpo_args, tokenizer=tokenizer, records=records, examples=examples,
                                     mixed_precision=accelerator.mixed_precision, seed=train_args.seed)
    elif lora and not model_args.ref_model_name_or_path:
        # The policy itself is the reference (set after `prepare`): no second copy of the base weights.
        adapter_ref, ref_adapter = True, add_reference_adapter(model, model_args)
    else:
        ref_model = load_model_from_args(model_args, model_args.reference_path(), trainable=False)

    layout = LayoutSlot(train_args.forward_mode, tokenizer.pad_token_id, model, chunk_size=train_args.logps_chunk_size,
                        pad_to_multiple_of=train_args.pad_to_multiple_of)

    def collate(split):  # + the pairs' reference log-probs from the cache
        return layout.collate if cache is None else cache.collate(split, layout.collate)

    # Model FLOPs are counted on the unwrapped model, before `prepare` (dpo_core.throughput).
    batch_flops = make_batch_flops(model, online_reference=ref_model is not None or adapter_ref)
    model, optimizer, train_loader, eval_loader = prepare_training(accelerator, model, examples, collate, train_args,
                                                                   shuffle=shuffle)
    ref_context = contextlib.nullcontext
    if adapter_ref:
        ref_model = accelerator.unwrap_model(model)
        ref_context = partial(adapter_reference, ref_model, ref_adapter)
    elif ref_model is not None:
        # Frozen, sharded like the policy under ZeRO-3/FSDP, and not registered with the accelerator:
        # checkpoints do not carry a second copy of the weights.
        ref_model = prepare_reference(accelerator, ref_model, micro_batch_size=train_args.per_device_train_batch_size)
    on_step_end = None
    if dpo_args.sync_ref_model:  # before a resume: the checkpoint restores the synced reference
        on_step_end = setup_reference_sync(accelerator, model, ref_model, alpha=dpo_args.ref_model_mixup_alpha,
                                           sync_steps=dpo_args.ref_model_sync_steps)
    # After prepare: the blocks compile in place, inside DDP / DeepSpeed (dpo_core.compiling). A LoRA run's reference
    # is the policy itself.
    separate_ref = [ref_model] if ref_model is not None and not adapter_ref else []
    compile_for_training(accelerator, train_args, model, *separate_ref)
    # `auto`: probed on the prepared policy, every process in step, before the first batch (dpo_core.layouts).
    layout.resolve(model, examples["train"], accelerator=accelerator, log=accelerator.print)
    step_args = dict(forward=layout.forward, ref_model=ref_model, ref_context=ref_context)
    if unpaired:
        step_fn = make_kto_step(dpo_args, **step_args,
                                reduce_mean=lambda value: accelerator.reduce(value, reduction="mean"))
    else:
        step_fn = make_dpo_step(dpo_args, **step_args)
    return DPORun(model, tokenizer, optimizer, train_loader, eval_loader, step_fn, on_step_end, batch_flops,
                  layout.mode)


def train_dpo(config: DPOConfig) -> TrainResult:
    """Trains a policy with DPO from one flat config; saves model, tokenizer, config and metrics into
    `config.output_dir`. What `scripts/dpo.py` runs."""
    metrics = run_dpo(config, config, config, config)
    return TrainResult(metrics=metrics, output_dir=Path(config.output_dir))


@handles_stop_signals
def run_dpo(model_args, data_args, dpo_args, train_args, *, stop: StopSignals | None = None) -> dict:
    """`train_dpo` from the config groups (any object with their fields); returns the final metrics.

    The stop-signal handlers are installed before the model loads: a SIGTERM during setup stops the run at
    its first step boundary (instead of being lost: `slurm/launch.sh` ignores the signals in the launcher)."""
    apply_debug_preset(model_args, data_args, dpo_args, train_args)
    check_hub_args(train_args)
    accelerator, output_dir = start_run(train_args, model_args, data_args, dpo_args, train_args)
    run = setup_dpo(accelerator, model_args, data_args, dpo_args, train_args,
                    report_path=output_dir / "invalid_records.jsonl")
    peak, peak_source = peak_flops(accelerator.device, override=train_args.peak_flops)
    accelerator.print(f"peak FLOP/s per device for train/mfu: {peak:.3g} ({peak_source})")
    scheduler, state, max_steps = schedule_and_resume(accelerator, run.optimizer, train_args, len(run.train_loader),
                                                      model_args, data_args, dpo_args, train_args)
    with anomaly_detection(train_args):
        metrics = train_loop(accelerator, run.model, run.optimizer, scheduler, run.train_loader, run.step_fn,
                             train_args, eval_loader=run.eval_loader, max_steps=max_steps, state=state,
                             on_step_end=run.on_step_end, batch_flops=run.batch_flops, peak_flops=peak,
                             on_save=checkpoint_pusher(accelerator, train_args), stop=stop)
    return finish_run(accelerator, run.model, run.tokenizer, output_dir, metrics, model_args=model_args,
                      configs=(model_args, data_args, dpo_args, train_args),
                      method="kto" if dpo_args.unpaired_loss() else "dpo")
