"""DPO training from configs: data, policy, reference (cache | frozen model | none), the DPO step, the loop.

`train_dpo(DPOConfig(...))` is the whole of `scripts/dpo.py`; `run_dpo` takes the config groups.
"""

from __future__ import annotations

import contextlib
import json
import os
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from . import data as data_lib
from .config import DPOConfig
from .distributed import prepare_reference, shutdown
from .logps import FORWARDS, make_collator
from .losses import dpo_loss, preference_metrics
from .modeling import (
    adapter_reference,
    add_reference_adapter,
    disable_dropout,
    is_peft_model,
    load_model_and_tokenizer,
    load_model_from_args,
    merge_and_save_adapter,
    quantization_name,
    register_adapter_checkpointing,
)
from .throughput import make_batch_flops, peak_flops
from .training import TrainResult, schedule_and_resume, start_run, train_loop


def make_dpo_step(dpo_args, *, forward, ref_model=None, ref_context=contextlib.nullcontext):
    """The DPO step: `(model, batch) -> (mean loss, stats)`; reference from the batch (cache) or `ref_model`
    (its forward runs inside `ref_context()`: for LoRA, the policy itself with the adapter disabled)."""
    loss_kwargs = dpo_args.loss_kwargs()

    def step(model, batch):
        out = forward(model, batch, ld_alpha=dpo_args.ld_alpha, wpo=dpo_args.use_weighting)
        if dpo_args.reference_free:
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
        mixed_precision=mixed_precision, seed=seed, quantization=quantization_name(model_args))
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


def prepare_training(accelerator, model, examples: dict, collate, train_args):
    """Data loaders (`collate(split)` gives a split's collate_fn), AdamW, and `accelerator.prepare`; a LoRA
    model's checkpoints then hold its adapter only. Returns `(model, optimizer, train_loader, eval_loader)`,
    `eval_loader` None without a held-out split."""
    def loader(split, batch_size, shuffle):
        return DataLoader(data_lib.PairDataset(examples[split]), batch_size=batch_size, shuffle=shuffle,
                          collate_fn=collate(split), num_workers=train_args.dataloader_num_workers)

    train_loader = loader("train", train_args.per_device_train_batch_size, shuffle=True)
    eval_loader = loader("eval", train_args.per_device_eval_batch_size, False) if examples.get("eval") else None
    optimizer = build_optimizer(model, train_args)
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    if eval_loader is not None:
        eval_loader = accelerator.prepare(eval_loader)
    if is_peft_model(accelerator.unwrap_model(model)):
        register_adapter_checkpointing(accelerator)
    return model, optimizer, train_loader, eval_loader


def train_dpo(config: DPOConfig) -> TrainResult:
    """Trains a policy with DPO from one flat config; saves model, tokenizer, config and metrics into
    `config.output_dir`. What `scripts/dpo.py` runs."""
    metrics = run_dpo(config, config, config, config)
    return TrainResult(metrics=metrics, output_dir=Path(config.output_dir))


def run_dpo(model_args, data_args, dpo_args, train_args) -> dict:
    """`train_dpo` from the config groups (any object with their fields); returns the final metrics."""
    accelerator, output_dir = start_run(train_args, model_args, data_args, dpo_args, train_args)

    model, tokenizer = load_model_and_tokenizer(model_args)
    disable_dropout(model)  # LoRA's dropout too: its modules are added after loading
    lora = is_peft_model(model)
    if lora and dpo_args.sync_ref_model:
        raise ValueError("--sync_ref_model with LoRA is not supported: the reference is the base model (adapter "
                         "disabled), and a mix of policy and reference is no LoRA adapter of the same rank.")
    if model_args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    with accelerator.main_process_first():
        records, examples = data_lib.prepare_from_args(data_args, tokenizer, seed=train_args.seed,
                                                       report_path=output_dir / "invalid_records.jsonl")

    require_examples(examples, data_args)
    cache, ref_model, adapter_ref = None, None, False
    if dpo_args.ref_logprobs:
        cache = load_reference_cache(dpo_args.ref_logprobs, model_args=model_args, data_args=data_args,
                                     dpo_args=dpo_args, tokenizer=tokenizer, records=records, examples=examples,
                                     mixed_precision=accelerator.mixed_precision, seed=train_args.seed)
    elif lora and not dpo_args.reference_free and not model_args.ref_model_name_or_path:
        # The policy itself is the reference (set after `prepare`): no second copy of the base weights.
        adapter_ref, ref_adapter = True, add_reference_adapter(model, model_args)
    elif not dpo_args.reference_free:
        ref_path = model_args.ref_model_name_or_path or model_args.model_name_or_path
        ref_model = load_model_from_args(model_args, ref_path, trainable=False)

    def collate(split):
        collate = make_collator(train_args.forward_mode, tokenizer.pad_token_id, model)
        return collate if cache is None else cache.collate(split, collate)  # + the pairs' reference log-probs

    # Model FLOPs are counted on the unwrapped model, before `prepare` (dpo_core.throughput).
    batch_flops = make_batch_flops(model, online_reference=ref_model is not None or adapter_ref)
    peak, peak_source = peak_flops(accelerator.device, override=train_args.peak_flops)
    accelerator.print(f"peak FLOP/s per device for train/mfu: {peak:.3g} ({peak_source})")
    model, optimizer, train_loader, eval_loader = prepare_training(accelerator, model, examples, collate, train_args)
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
        from .ref_sync import setup_reference_sync

        on_step_end = setup_reference_sync(accelerator, model, ref_model, alpha=dpo_args.ref_model_mixup_alpha,
                                           sync_steps=dpo_args.ref_model_sync_steps)

    scheduler, state, max_steps = schedule_and_resume(accelerator, optimizer, train_args, len(train_loader),
                                                      model_args, data_args, dpo_args, train_args)

    forward = partial(FORWARDS[train_args.forward_mode], chunk_size=train_args.logps_chunk_size)
    step_fn = make_dpo_step(dpo_args, forward=forward, ref_model=ref_model, ref_context=ref_context)
    metrics = train_loop(accelerator, model, optimizer, scheduler, train_loader, step_fn, train_args,
                         eval_loader=eval_loader, max_steps=max_steps, state=state, on_step_end=on_step_end,
                         batch_flops=batch_flops, peak_flops=peak)
    return finish_run(accelerator, model, tokenizer, output_dir, metrics, model_args=model_args)


def require_examples(examples: dict, data_args) -> None:
    """Stops before training on an empty training or held-out split, saying why."""
    if not examples["train"]:
        raise ValueError(f"{data_args.dataset_name}: no usable training records in split "
                         f"{data_args.dataset_split!r}" + (" (all skipped; see invalid_records.jsonl)"
                                                           if data_args.on_invalid == "skip" else ""))
    if "eval" in examples and not examples["eval"]:
        raise ValueError(f"{data_args.dataset_name}: the held-out split has no usable records")


def finish_run(accelerator, model, tokenizer, output_dir: Path, metrics: dict, *, model_args=None) -> dict:
    """The end of every training run: final model and metrics saved (and the merged adapter with
    `--merge_adapter`), metrics printed, trackers closed."""
    metrics["num_processes"] = accelerator.num_processes
    metrics["distributed_type"] = accelerator.distributed_type.value
    save_final(accelerator, model, tokenizer, output_dir, metrics)
    if model_args is not None and getattr(model_args, "merge_adapter", False):
        if accelerator.is_main_process:
            merge_and_save_adapter(output_dir, output_dir / "merged", model_args)
            accelerator.print(f"merged weights saved to {output_dir / 'merged'}")
        accelerator.wait_for_everyone()
    accelerator.print(format_metrics(metrics))
    accelerator.end_training()
    shutdown(accelerator)
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


def save_final(accelerator, model, tokenizer, output_dir: Path, metrics: dict) -> None:
    """Full weights (gathered under ZeRO-3/FSDP) as safetensors, tokenizer, and `train_results.json`.

    A LoRA model saves its trained adapter only (adapter_model.safetensors + adapter_config.json)."""
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)
    unwrapped = accelerator.unwrap_model(model)
    # peft saves every adapter it holds: only the trained one ("default"), not the reference copy.
    extra = {"selected_adapters": ["default"]} if is_peft_model(unwrapped) else {"save_function": accelerator.save}
    unwrapped.save_pretrained(output_dir, is_main_process=accelerator.is_main_process, state_dict=state_dict,
                              safe_serialization=True, **extra)
    if accelerator.is_main_process:
        tokenizer.save_pretrained(output_dir)
        tmp = output_dir / "train_results.json.tmp"
        tmp.write_text(json.dumps(metrics, indent=2))
        os.replace(tmp, output_dir / "train_results.json")
    accelerator.wait_for_everyone()
