"""DPO training from configs: data, policy, reference (cache | frozen model | none), the DPO step, the loop.

`train_dpo(model_args, data_args, dpo_args, train_args)` is the whole of `scripts/dpo.py`.
"""

from __future__ import annotations

import json
import math
import os
from functools import partial
from pathlib import Path

import torch
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from transformers import get_scheduler

from . import data as data_lib
from .config import save_config
from .logps import FORWARDS
from .losses import dpo_loss, preference_metrics
from .modeling import load_model, load_model_and_tokenizer
from .throughput import make_batch_flops, peak_flops
from .training import (
    TrainState,
    build_accelerator,
    load_checkpoint,
    prepare_output_dir,
    resolve_resume,
    total_steps,
    train_loop,
)


def make_dpo_step(dpo_args, *, forward, ref_model=None):
    """The DPO step: `(model, batch) -> (mean loss, stats)`; reference from the batch (cache) or `ref_model`."""
    loss_kwargs = dpo_args.loss_kwargs()

    def step(model, batch):
        out = forward(model, batch, ld_alpha=dpo_args.ld_alpha, wpo=dpo_args.use_weighting)
        if dpo_args.reference_free:
            ref_chosen = ref_rejected = None
        elif "ref_chosen_logps" in batch:
            ref_chosen, ref_rejected = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        else:
            with torch.no_grad():
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
        return losses.mean(), stats

    return step


TIE_RTOL = 1e-5


def tie_tolerance(chosen_logps, rejected_logps, beta: float):
    """Reward margins this small are ties, not wins or losses.

    With policy == reference the margin is 0 up to the float32 noise of differently batched forwards
    (the cache is computed in other batches than training), ~1e-7 of the log-probs compared; TRL's
    strict accuracy then reports the sign of that noise. Returns `(B,)`.
    """
    return TIE_RTOL * beta * (chosen_logps.detach().abs() + rejected_logps.detach().abs()).float()


def load_reference_cache(cache_dir, *, model_args, data_args, dpo_args, tokenizer, records, examples,
                         mixed_precision, seed):
    """The verified reference cache for every split of this run (an error names any mismatch)."""
    from .ref_cache import load_cache, reference_fingerprint

    expected = reference_fingerprint(
        ref_model_path=model_args.ref_model_name_or_path or model_args.model_name_or_path,
        revision=model_args.revision, tokenizer=tokenizer, records_by_split=records, examples_by_split=examples,
        data_args=data_args, torch_dtype=model_args.torch_dtype, ld_alpha=dpo_args.ld_alpha,
        mixed_precision=mixed_precision, seed=seed)
    return load_cache(cache_dir, expected, {split: [e.id for e in exs] for split, exs in examples.items()})


def build_optimizer(model, train_args) -> torch.optim.AdamW:
    """AdamW; biases and norm weights get no weight decay (as transformers' Trainer does)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.dim() < 2 or "norm" in name.lower() else decay).append(param)
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": train_args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=train_args.learning_rate, betas=(train_args.adam_beta1, train_args.adam_beta2),
        eps=train_args.adam_epsilon)


def train_dpo(model_args, data_args, dpo_args, train_args) -> dict:
    """Trains, saves the final model/tokenizer/config/metrics into `output_dir`; returns the final metrics."""
    if not train_args.output_dir:
        raise ValueError("--output_dir is required")
    accelerator = build_accelerator(train_args)
    accelerator.print(f"num_processes {accelerator.num_processes} ({accelerator.distributed_type}), "
                      f"device {accelerator.device}, mixed_precision {accelerator.mixed_precision}")
    set_seed(train_args.seed)
    output_dir = Path(train_args.output_dir)
    prepare_output_dir(accelerator, output_dir, overwrite=train_args.overwrite_output_dir,
                       resume=train_args.resume_from_checkpoint)
    if accelerator.is_main_process:
        save_config(output_dir / "config.yaml", model_args, data_args, dpo_args, train_args)

    model, tokenizer = load_model_and_tokenizer(model_args)
    if model_args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    with accelerator.main_process_first():
        records, examples = data_lib.prepare_from_args(data_args, tokenizer, seed=train_args.seed,
                                                       report_path=output_dir / "invalid_records.jsonl")

    if not examples["train"]:
        raise ValueError(f"{data_args.dataset_name}: no usable training records in split "
                         f"{data_args.dataset_split!r}" + (" (all skipped; see invalid_records.jsonl)"
                                                           if data_args.on_invalid == "skip" else ""))
    if "eval" in examples and not examples["eval"]:
        raise ValueError(f"{data_args.dataset_name}: the held-out split has no usable records")
    cache, ref_model = None, None
    if dpo_args.ref_logprobs:
        cache = load_reference_cache(dpo_args.ref_logprobs, model_args=model_args, data_args=data_args,
                                     dpo_args=dpo_args, tokenizer=tokenizer, records=records, examples=examples,
                                     mixed_precision=accelerator.mixed_precision, seed=train_args.seed)
    elif not dpo_args.reference_free:
        ref_model = load_model(model_args.ref_model_name_or_path or model_args.model_name_or_path,
                               torch_dtype=model_args.torch_dtype, attn_implementation=model_args.attn_implementation,
                               revision=model_args.revision, trust_remote_code=model_args.trust_remote_code,
                               trainable=False)

    def loader(split, batch_size, shuffle):
        collate = partial(data_lib.COLLATORS[train_args.forward_mode], pad_token_id=tokenizer.pad_token_id)
        if cache is not None:  # each batch carries its pairs' reference log-probs
            collate = cache.collate(split, collate)
        return DataLoader(data_lib.PairDataset(examples[split]), batch_size=batch_size, shuffle=shuffle,
                          collate_fn=collate, num_workers=train_args.dataloader_num_workers)

    # Model FLOPs are counted on the unwrapped model, before `prepare` (dpo_core.throughput).
    batch_flops = make_batch_flops(model, online_reference=ref_model is not None)
    peak, peak_source = peak_flops(accelerator.device, override=train_args.peak_flops)
    accelerator.print(f"peak FLOP/s per device for train/mfu: {peak:.3g} ({peak_source})")
    train_loader = loader("train", train_args.per_device_train_batch_size, shuffle=True)
    eval_loader = loader("eval", train_args.per_device_eval_batch_size, False) if examples.get("eval") else None
    optimizer = build_optimizer(model, train_args)
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    if eval_loader is not None:
        eval_loader = accelerator.prepare(eval_loader)
    if ref_model is not None:
        # Frozen and never wrapped: not prepared, so checkpoints do not carry a second copy of the weights.
        ref_model = ref_model.to(accelerator.device)

    max_steps = total_steps(train_args, len(train_loader))
    warmup = train_args.warmup_steps or math.ceil(train_args.warmup_ratio * max_steps)
    scheduler = get_scheduler(train_args.lr_scheduler_type, optimizer, num_warmup_steps=warmup,
                              num_training_steps=max_steps)
    state = TrainState()
    resume = resolve_resume(output_dir, train_args.resume_from_checkpoint)
    if resume is not None:
        load_checkpoint(accelerator, resume, scheduler=scheduler, state=state)
        accelerator.print(f"Resumed from {resume} at step {state.global_step}")
    # purge_step: after a resume, TensorBoard discards events logged past the checkpoint (no duplicate steps).
    accelerator.init_trackers("tensorboard", config=_hparams(model_args, data_args, dpo_args, train_args),
                              init_kwargs={"tensorboard": {"purge_step": state.global_step or None}})

    step_fn = make_dpo_step(dpo_args, forward=FORWARDS[train_args.forward_mode], ref_model=ref_model)
    metrics = train_loop(accelerator, model, optimizer, scheduler, train_loader, step_fn, train_args,
                         eval_loader=eval_loader, max_steps=max_steps, state=state, batch_flops=batch_flops,
                         peak_flops=peak)
    metrics["num_processes"] = accelerator.num_processes
    save_final(accelerator, model, tokenizer, output_dir, metrics)
    accelerator.print(format_metrics(metrics))
    accelerator.end_training()
    return metrics


def format_metrics(metrics: dict) -> str:
    """The final metrics for the console; held-out ones side by side with the start when evaluated there."""
    lines = [f"{k:26s} {v:.4f}" if isinstance(v, float) else f"{k:26s} {v}" for k, v in metrics.items()
             if not k.startswith("eval_")]
    evals = sorted(k[len("eval_"):] for k in metrics if k.startswith("eval_") and not k.startswith("eval_start_"))
    if evals:
        lines += ["", f"{'held-out':26s} {'start':>10s} {'end':>10s}"]
        for key in evals:
            start = metrics.get(f"eval_start_{key}")
            lines.append(f"{key:26s} {'' if start is None else f'{start:10.4f}':>10s} {metrics[f'eval_{key}']:10.4f}")
    return "\n".join(lines)


def _hparams(*configs) -> dict:
    """TensorBoard hparams accept scalars and strings only; secrets never leave `resolved_config`."""
    from .config import resolved_config

    return {k: (v if isinstance(v, (int, float, str, bool)) else json.dumps(v))
            for k, v in resolved_config(*configs).items()}


def save_final(accelerator, model, tokenizer, output_dir: Path, metrics: dict) -> None:
    """Full weights (gathered under ZeRO-3/FSDP) as safetensors, tokenizer, and `train_results.json`."""
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.save_pretrained(output_dir, is_main_process=accelerator.is_main_process, state_dict=state_dict,
                              save_function=accelerator.save, safe_serialization=True)
    if accelerator.is_main_process:
        tokenizer.save_pretrained(output_dir)
        tmp = output_dir / "train_results.json.tmp"
        tmp.write_text(json.dumps(metrics, indent=2))
        os.replace(tmp, output_dir / "train_results.json")
    accelerator.wait_for_everyone()
