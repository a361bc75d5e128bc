"""Supervised fine-tuning on completions (the chosen side of preference pairs, or prompt/completion or
messages records; see `dpo_core.sft_data`): the loss counts completion tokens only.

`train_sft(SFTConfig(...))` is the whole of `scripts/sft.py`. It shares everything but the step with DPO:
the data layer, the accelerate loop, logging, checkpoints, resume and the final save. Its output directory
is a plain model directory (safetensors + tokenizer): the starting policy and reference of DPO.

**What the loss averages.** A micro-batch's loss is the mean negative log-likelihood over its completion
tokens (`sum of -log p over completion tokens / number of completion tokens`; prompt and padding tokens
contribute nothing), as TRL's SFT with `completion_only_loss`. With gradient accumulation and several
processes every micro-batch counts once, whatever its number of tokens: accelerate divides each loss by
the accumulation steps and DDP averages gradients over processes, so an optimizer step minimises the mean
of the micro-batches' token means (transformers' Trainer without `average_tokens_across_devices`).
`train/loss` logs exactly that mean. `eval/loss` is the token-weighted mean over the whole held-out split
(`sum of -log p / sum of completion tokens`, every example counted once across processes) and
`eval/perplexity = exp(eval/loss)`. `logps/completion` is the per-sequence sum of completion log-probs
(on preference data: DPO's `logps/chosen`); `completion_tokens` the mean completion length.
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

from . import data as data_lib
from .compiling import compile_for_training
from .config import SFTConfig, TrainArguments
from .debug import anomaly_detection, apply_debug_preset
from .distributed import main_process_first
from .errors import ConfigError
from .hub import check_hub_args, checkpoint_pusher
from .logps import position_ids_from_mask, sequence_logps, token_logps
from .modeling import enable_gradient_checkpointing, load_model_and_tokenizer
from .runs import TrainResult, finish_run, prepare_training, require_examples, schedule_and_resume, start_run
from .sft_data import collate_sft, tokenize_sft_records
from .training import StopSignals, handles_stop_signals, train_loop


def sft_forward(model, batch):
    """Per-sequence completion log-probs of a `collate_sft` batch.

    Returns:
        `(logps, lengths)`, each `(B,)`: the sum of log p(token) over each row's completion tokens (float32)
        and their count.
    """
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    logits = model(input_ids=input_ids, attention_mask=attention_mask,
                   position_ids=position_ids_from_mask(attention_mask), use_cache=False).logits
    # Position t predicts token t+1: the mask of the labels, shifted the same way.
    labels, mask = input_ids[:, 1:], batch["completion_mask"][:, 1:] * attention_mask[:, 1:]
    per_token, _, _ = token_logps(logits[:, :-1], labels)
    return sequence_logps(per_token, mask), mask.sum(-1)


def sft_step(model, batch):
    """The SFT step: `(model, batch) -> (token-mean completion NLL, stats)`.

    stats: `loss` (scalar), `logps/completion` and `completion_tokens` (`(B,)`).
    """
    logps, lengths = sft_forward(model, batch)
    loss = -logps.sum() / lengths.sum().clamp(min=1)
    return loss, {"loss": loss.detach(), "logps/completion": logps.detach(), "completion_tokens": lengths.float()}


def _token_weighted(metrics: dict) -> dict:
    """Held-out loss over all completion tokens: mean(-logps) / mean(tokens) = sum(-logps) / sum(tokens)."""
    loss = -metrics["logps/completion"] / max(metrics["completion_tokens"], 1e-12)
    return {**metrics, "loss": loss, "perplexity": math.exp(min(loss, 700.0))}


sft_step.finish_eval = _token_weighted


def train_sft(config: SFTConfig) -> TrainResult:
    """Fine-tunes on completions from one flat config; saves model, tokenizer, config and metrics into
    `config.output_dir`. What `scripts/sft.py` runs."""
    metrics = run_sft(config, config, config)
    return TrainResult(metrics=metrics, output_dir=Path(config.output_dir))


@handles_stop_signals
def run_sft(model_args, data_args, train_args, *, stop: StopSignals | None = None) -> dict:
    """`train_sft` from the config groups (any objects with their fields); returns the final metrics. Stop
    signals are handled from the start, as in `dpo_core.dpo.run_dpo`."""
    if train_args.forward_mode != TrainArguments.forward_mode:
        raise ConfigError(f"SFT runs right-padded batches: --forward_mode {train_args.forward_mode} applies to "
                         "DPO only")
    apply_debug_preset(model_args, data_args, train_args)
    check_hub_args(train_args)
    accelerator, output_dir = start_run(train_args, model_args, data_args, train_args)

    model, tokenizer = load_model_and_tokenizer(model_args)
    if model_args.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    with main_process_first(accelerator):
        _, examples = data_lib.prepare_from_args(data_args, tokenizer, seed=train_args.seed,
                                                 report_path=output_dir / "invalid_records.jsonl",
                                                 tokenize=tokenize_sft_records,
                                                 progress=accelerator.is_main_process)
    require_examples(examples, data_args)

    collate = partial(collate_sft, pad_token_id=tokenizer.pad_token_id, pad_to_multiple_of=train_args.pad_to_multiple_of)
    model, optimizer, train_loader, eval_loader = prepare_training(accelerator, model, examples,
                                                                   lambda split: collate, train_args)
    compile_for_training(accelerator, train_args, model)
    scheduler, state, max_steps = schedule_and_resume(accelerator, optimizer, train_args, len(train_loader),
                                                      model_args, data_args, train_args)
    with anomaly_detection(train_args):
        metrics = train_loop(accelerator, model, optimizer, scheduler, train_loader, sft_step, train_args,
                             eval_loader=eval_loader, max_steps=max_steps, state=state,
                             on_save=checkpoint_pusher(accelerator, train_args), stop=stop)
    return finish_run(accelerator, model, tokenizer, output_dir, metrics, model_args=model_args,
                      configs=(model_args, data_args, train_args), method="sft")
