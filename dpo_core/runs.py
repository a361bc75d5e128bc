"""Run plumbing shared by every training method: the Accelerator and trackers, the checked output directory,
the optimizer, the data loaders and `prepare`, the LR schedule and resume, and the final save.

A method module (`dpo_core.dpo`, `dpo_core.sft`) keeps only its step and what its step needs; the loop is
`dpo_core.training.train_loop`.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from torch.utils.data import DataLoader
from transformers import get_scheduler

from .batches import PairDataset
from .checkpoints import TrainState, load_checkpoint, prepare_output_dir, resolve_resume
from .config import resolved_config, save_config
from .distributed import configure_deepspeed, make_accelerator, shutdown
from .errors import ConfigError, DataError
from .hub import hub_repo_id, push_output_dir
from .model_card import write_model_card
from .modeling import is_peft_model, merge_and_save_adapter, register_adapter_checkpointing
from .optim import build_optimizer, parse_scheduler_kwargs
from .trackers import RunInfo, enabled_trackers, read_run_ids, run_name_of, start_trackers, tracker_config
from .training import total_steps


@dataclass
class TrainResult:
    """What `dpo_core.train_dpo` / `train_sft` return: the final metrics (also in `train_results.json`)
    and the run directory holding the trained model."""

    metrics: dict
    output_dir: Path


def build_accelerator(train_args, *, log: bool = True) -> Accelerator:
    """The training run's Accelerator: the `--report_to` trackers (TensorBoard under `output_dir/logs`), a
    seedable sampler for exact resume."""
    return make_accelerator(
        gradient_accumulation_steps=train_args.gradient_accumulation_steps,
        log_with=(enabled_trackers(train_args.report_to) or None) if log else None,
        project_config=ProjectConfiguration(project_dir=train_args.output_dir,
                                            logging_dir=os.path.join(train_args.output_dir, "logs")),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=train_args.seed),
    )


def start_run(train_args, *configs) -> tuple[Accelerator, Path]:
    """The start of every training run: the Accelerator, the seed, a checked `output_dir` and the resolved
    config (`configs`: the dataclasses to write into `config.yaml`). Returns `(accelerator, output_dir)`."""
    if not train_args.output_dir:
        raise ConfigError("--output_dir is required")
    accelerator = build_accelerator(train_args)
    configure_deepspeed(accelerator, max_grad_norm=train_args.max_grad_norm)  # before any `prepare`
    accelerator.print(f"num_processes {accelerator.num_processes} ({accelerator.distributed_type}), "
                      f"device {accelerator.device}, mixed_precision {accelerator.mixed_precision}")
    set_seed(train_args.seed)
    output_dir = Path(train_args.output_dir)
    prepare_output_dir(accelerator, output_dir, overwrite=train_args.overwrite_output_dir,
                       resume=train_args.resume_from_checkpoint)
    if accelerator.is_main_process:
        save_config(output_dir / "config.yaml", *configs)
    return accelerator, output_dir


def schedule_and_resume(accelerator: Accelerator, optimizer, train_args, batches_per_epoch: int, *configs):
    """The LR schedule, the loop state (loaded from `--resume_from_checkpoint` when given) and the trackers.

    Call after `accelerator.prepare` (the checkpoint holds the prepared model and optimizer).
    Returns `(scheduler, state, max_steps)`.
    """
    max_steps = total_steps(train_args, batches_per_epoch)
    warmup = train_args.warmup_steps or math.ceil(train_args.warmup_ratio * max_steps)
    scheduler = get_scheduler(train_args.lr_scheduler_type, optimizer, num_warmup_steps=warmup,
                              num_training_steps=max_steps,
                              scheduler_specific_kwargs=parse_scheduler_kwargs(train_args.lr_scheduler_kwargs))
    state = TrainState()
    resume = resolve_resume(train_args.output_dir, train_args.resume_from_checkpoint)
    if resume is not None:
        load_checkpoint(accelerator, resume, scheduler=scheduler, state=state)
        accelerator.print(f"Resumed from {resume} at step {state.global_step}")
    # Every tracker gets the same resolved config; a resume continues the runs whose ids the checkpoint holds.
    run = RunInfo(train_args.project_name, run_name_of(train_args), str(train_args.output_dir), state.global_step)
    start_trackers(accelerator, enabled_trackers(train_args.report_to), run, _hparams(*configs),
                   run_ids=read_run_ids(resume).get("runs", {}))
    return scheduler, state, max_steps


def _hparams(*configs) -> dict:
    """The config every tracker records: TensorBoard hparams accept scalars and strings only; secrets never
    leave `resolved_config`."""
    return tracker_config(resolved_config(*configs))


def prepare_training(accelerator, model, examples: dict, collate, train_args, *, shuffle: bool = True):
    """Data loaders (`collate(split)` gives a split's collate_fn; the training split shuffled, seeded, unless
    `shuffle` is False), the `--optim` optimizer (`dpo_core.optim`), and `accelerator.prepare`; a LoRA model's
    checkpoints then hold its adapter only. Returns `(model, optimizer, train_loader, eval_loader)`,
    `eval_loader` None without a held-out split."""
    def loader(split, batch_size, shuffle):
        return DataLoader(PairDataset(examples[split]), batch_size=batch_size, shuffle=shuffle,
                          collate_fn=collate(split), num_workers=train_args.dataloader_num_workers)

    train_loader = loader("train", train_args.per_device_train_batch_size, shuffle=shuffle)
    eval_loader = loader("eval", train_args.per_device_eval_batch_size, False) if examples.get("eval") else None
    optimizer = build_optimizer(model, train_args, device=accelerator.device)
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    if eval_loader is not None:
        eval_loader = accelerator.prepare(eval_loader)
    if is_peft_model(accelerator.unwrap_model(model)):
        register_adapter_checkpointing(accelerator)
    return model, optimizer, train_loader, eval_loader


def require_examples(examples: dict, data_args) -> None:
    """Stops before training on an empty training or held-out split, saying why."""
    if not examples["train"]:
        raise DataError(f"{data_args.dataset_name}: no usable training records in split "
                         f"{data_args.dataset_split!r}" + (" (all skipped; see invalid_records.jsonl)"
                                                           if data_args.on_invalid == "skip" else ""))
    if "eval" in examples and not examples["eval"]:
        raise DataError(f"{data_args.dataset_name}: the held-out split has no usable records")


def finish_run(accelerator, model, tokenizer, output_dir: Path, metrics: dict, *, model_args=None,
               configs: tuple = (), method: str = "dpo") -> dict:
    """The end of every training run: final model and metrics saved (and the merged adapter with
    `--merge_adapter`), the model card (`README.md`, `dpo_core.model_card`; `configs`: the run's config
    groups, `method`: dpo | sft), the hub push with `--push_to_hub` (`dpo_core.hub`), metrics printed,
    trackers closed."""
    metrics["num_processes"] = accelerator.num_processes
    metrics["distributed_type"] = accelerator.distributed_type.value
    save_final(accelerator, model, tokenizer, output_dir, metrics)
    if model_args is not None and getattr(model_args, "merge_adapter", False):
        if accelerator.is_main_process:
            merge_and_save_adapter(output_dir, output_dir / "merged", model_args)
            accelerator.print(f"merged weights saved to {output_dir / 'merged'}")
        accelerator.wait_for_everyone()
    accelerator.wait_for_everyone()
    # The TensorBoard files complete before the card plots them and the push uploads them. end_training also ends
    # the process group: no collective after it.
    accelerator.end_training()
    configs = configs or tuple(c for c in (model_args,) if c is not None)
    train_args = next((c for c in configs if hasattr(c, "push_to_hub")), None)
    push = train_args is not None and train_args.push_to_hub
    if accelerator.is_main_process:
        write_model_card(output_dir, configs=configs, metrics=metrics, method=method,
                         adapter=is_peft_model(accelerator.unwrap_model(model)),
                         repo_id=hub_repo_id(train_args) if push else None)
        if push:
            accelerator.print(f"pushed to the hub: {push_output_dir(output_dir, train_args)}")
    accelerator.print(format_metrics(metrics))
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
