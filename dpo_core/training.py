"""The training loop shared by every method: accumulation, clipping, the non-finite guard, logging,
evaluation, checkpoints and preemption.

The loop knows nothing about DPO: a method passes `step_fn(model, batch) -> (loss, stats)`, where `stats` maps
metric names (TRL's: `loss`, `rewards/chosen`, ...) to per-example `(B,)` tensors (averaged over all examples
of all processes in a logging window) or to scalar tensors (averaged over micro-batches). Everything
distributed goes through `Accelerator`; setting a run up is `dpo_core.runs`.
"""

from __future__ import annotations

import functools
import json
import math
import os
import signal
import threading
import time
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from tqdm.auto import tqdm

from .checkpoints import (
    EXAMPLE_IDS,
    TrainState,
    checkpoint_dir,
    save_checkpoint,
)
from .compiling import compiled_graphs
from .errors import ConfigError, NonFiniteError, TrainingPreempted
from .throughput import processed_tokens

logger = get_logger(__name__)



class MetricWindow:
    """Sums metrics locally and reduces them across processes only when flushed (one sync per log)."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, torch.Tensor] = {}

    def add(self, stats: dict[str, torch.Tensor | tuple[torch.Tensor, torch.Tensor]]) -> None:
        """A value is a tensor (its elements count), or `(values, mask)`: only the masked elements count (a
        metric defined on some examples of the batch, e.g. KTO's desirable ones)."""
        for key, value in stats.items():
            if isinstance(value, tuple):
                value, mask = value[0].detach().float(), value[1].detach().float()
                value, n = (value * mask).sum(), mask.sum()
            else:
                value = value.detach().float()
                n = torch.tensor(float(value.numel()), device=value.device)
            self.sums[key] = self.sums.get(key, 0) + value.sum()
            self.counts[key] = self.counts.get(key, 0) + n

    def flush(self, accelerator: Accelerator) -> dict[str, float]:
        if not self.sums:
            return {}
        keys = sorted(self.sums)
        sums = accelerator.reduce(torch.stack([self.sums[k] for k in keys]), reduction="sum")
        counts = accelerator.reduce(torch.stack([self.counts[k] for k in keys]), reduction="sum")
        self.sums, self.counts = {}, {}
        return {k: (s / c).item() for k, s, c in zip(keys, sums, counts)}


def _already_complete(accelerator: Accelerator, train_args, state, max_steps: int) -> dict:
    """Resumed at the last step (the run had finished): nothing is trained, evaluated or logged again; the final
    metrics are those the finished run saved, when it got that far."""
    accelerator.print(f"resumed at step {state.global_step} of {max_steps}: the run is complete, nothing to train "
                      "(raise --max_steps to train further)")
    saved = Path(train_args.output_dir) / "train_results.json"
    metrics = json.loads(saved.read_text()) if saved.exists() else {}
    for key in ("num_processes", "distributed_type"):
        metrics.pop(key, None)
    return {**metrics, "global_step": state.global_step, "skipped_steps": state.skipped_steps}


# --------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(accelerator: Accelerator, model, dataloader, step_fn: Callable) -> dict[str, float]:
    """Averages over every held-out example exactly once (`gather_for_metrics` drops padding duplicates)."""
    was_training = model.training
    model.eval()
    gathered: dict[str, list[torch.Tensor]] = {}
    for batch in dataloader:
        with accelerator.autocast():
            _, stats = step_fn(model, batch)
        for key, value in stats.items():
            if isinstance(value, tuple):  # (values, mask): the mean over the masked examples
                values, mask = (accelerator.gather_for_metrics(v.detach().float()) for v in value)
                gathered.setdefault(key, []).append(torch.stack([values * mask, mask]))
            elif value.dim() == 1:  # per-example metrics; scalars are per-batch statistics, skipped here
                gathered.setdefault(key, []).append(accelerator.gather_for_metrics(value.detach().float()))
    model.train(was_training)
    metrics = {}
    for key, values in gathered.items():
        values = torch.cat(values, dim=-1)
        metrics[key] = (values[0].sum() / values[1].sum()).item() if values.dim() == 2 else values.mean().item()
    # A step may derive metrics that are no mean of per-example values (SFT: token-weighted loss, perplexity).
    finish = getattr(step_fn, "finish_eval", None)
    return finish(metrics) if finish is not None else metrics


# ------------------------------------------------------------------------------------------------- the loop
def total_steps(train_args, batches_per_epoch: int) -> int:
    if train_args.max_steps > 0:
        return train_args.max_steps
    steps_per_epoch = math.ceil(batches_per_epoch / train_args.gradient_accumulation_steps)
    return max(1, math.ceil(steps_per_epoch * train_args.num_train_epochs))


def handles_stop_signals(loop):
    """Runs `loop` with SIGTERM/SIGUSR1 handlers installed (restored after) unless the caller passes `stop`."""
    @functools.wraps(loop)
    def wrapper(*args, stop: StopSignals | None = None, **kwargs):
        if stop is not None:
            return loop(*args, stop=stop, **kwargs)
        with StopSignals() as stop:
            return loop(*args, stop=stop, **kwargs)
    return wrapper


@handles_stop_signals
def train_loop(accelerator: Accelerator, model, optimizer, scheduler, train_loader, step_fn: Callable, train_args,
               *, eval_loader=None, max_steps: int, state: TrainState | None = None,
               stop: StopSignals | None = None,
               on_step_end: Callable[[TrainState], None] | None = None,
               batch_flops: Callable | None = None, peak_flops: float | None = None,
               on_save: Callable[[Path], None] | None = None) -> dict[str, float]:
    """Runs optimizer steps until `max_steps`; returns the last logged train metrics and eval metrics.

    `model`, `optimizer`, `train_loader` and `eval_loader` are already `accelerator.prepare`d. The
    scheduler is stepped here once per optimizer step (not prepared: accelerate would step it once per
    process). Resume state must be loaded before the call (`schedule_and_resume`). `on_step_end(state)` runs
    after every optimizer step, skipped (non-finite) ones included, with `state.global_step` already
    counting it, and before that step's logging, evaluation and checkpoint.

    SIGTERM or SIGUSR1 (`stop`; installed for the loop's duration when not given) ends the run at the next
    optimizer-step boundary: every rank agrees, a complete checkpoint is saved, trackers end, and
    `TrainingPreempted` is raised (the scripts then exit with `PREEMPTED_EXIT_CODE`).

    Throughput, per logging window (`dpo_core.throughput`): `tokens_per_second` counts the batches'
    `num_tokens` (real tokens of the logical sequences, the same in every batch layout); `padding_ratio` is
    1 - real tokens processed / positions processed (`processed_tokens(batch)` / `num_positions`); `mfu` is
    `batch_flops(batch)` summed over processes per second, over `peak_flops` per process times the number
    of processes (logged when both are given). Evaluation and checkpoint time is not in the window.
    `on_save(path)` runs on every process after each committed `--save_steps` checkpoint (the hub push).
    """
    state = state or TrainState()
    if state.global_step >= max_steps > 0:
        return _already_complete(accelerator, train_args, state, max_steps)
    ids_log = open_example_ids_log(accelerator, train_args.output_dir, state.global_step) \
        if getattr(train_args, "log_example_ids", False) else None
    window, params = MetricWindow(), [p for p in model.parameters() if p.requires_grad]
    logs: dict[str, float] = {}
    eval_metrics: dict[str, float] = {}
    # Per logging window: logical tokens, real tokens processed, positions processed, model FLOPs; float64
    # (FLOPs exceed float32's exact integers), summed on the device: no host sync per micro-batch.
    counters = torch.zeros(4, dtype=torch.float32 if accelerator.device.type == "mps" else torch.float64,
                           device=accelerator.device)
    paused = 0.0  # seconds of evaluation and checkpointing inside the window, not counted as training time
    bad = torch.zeros((), device=accelerator.device)
    bar = tqdm(total=max_steps, initial=state.global_step, disable=not accelerator.is_local_main_process,
               desc="train", dynamic_ncols=True)
    start_metrics: dict[str, float] = {}
    if eval_loader is not None and train_args.eval_on_start and state.global_step == 0:
        start_metrics = evaluate(accelerator, model, eval_loader, step_fn)
        accelerator.log({f"eval/{k}": v for k, v in start_metrics.items()}, step=0)
    model.train()
    t_log = time.perf_counter()
    while state.global_step < max_steps:
        train_loader.set_epoch(state.epoch)
        loader = accelerator.skip_first_batches(train_loader, state.batches_in_epoch) \
            if state.batches_in_epoch else train_loader
        for batch in loader:
            state.batches_in_epoch += 1
            if ids_log is not None:
                log_example_ids(ids_log, batch, state)
            with accelerator.accumulate(model):
                with accelerator.autocast():
                    loss, stats = step_fn(model, batch)
                # Backward runs even on a non-finite loss: skipping it on one rank would desynchronise
                # DDP's all-reduce. The NaN reaches the gradients, and the whole step is dropped below.
                bad = torch.maximum(bad, (~torch.isfinite(loss.detach())).float())
                accelerator.backward(loss)
                window.add(stats)
                counters += window_counts(batch, batch_flops, counters)
            if not accelerator.sync_gradients:
                continue
            grad_norm, skipped = apply_update(accelerator, optimizer, scheduler, params, bad, state, train_args,
                                              stop=stop)
            bad.zero_()
            if on_step_end is not None:
                on_step_end(state)
            bar.update(1)
            if not skipped:  # a skipped step has no meaningful gradient norm to log
                window.add({"grad_norm": grad_norm.detach().float().reshape(1)})
            step = state.global_step
            if step % train_args.logging_steps == 0 or step == max_steps:
                logs = window.flush(accelerator)
                logs.update(learning_rate=scheduler.get_last_lr()[0], skipped_steps=state.skipped_steps,
                            epoch=state.epoch + state.batches_in_epoch / max(len(train_loader), 1),
                            **throughput_metrics(accelerator, counters, time.perf_counter() - t_log - paused,
                                                 peak_flops if batch_flops else None))
                if getattr(train_args, "torch_compile", False):  # recompiles show as this count rising
                    logs["compiled_graphs"] = compiled_graphs()
                accelerator.log({f"train/{k}": v for k, v in logs.items()}, step=step)
                bar.set_postfix(loss=f"{logs.get('loss', float('nan')):.4f}")
                counters.zero_()
                t_log, paused = time.perf_counter(), 0.0
            t_pause = time.perf_counter()
            if eval_loader is not None and train_args.eval_steps and step % train_args.eval_steps == 0:
                eval_metrics = evaluate(accelerator, model, eval_loader, step_fn)
                accelerator.log({f"eval/{k}": v for k, v in eval_metrics.items()}, step=step)
            # Every --save_steps, and at the last step (as transformers' Trainer): the same command run again after
            # the end resumes there, with nothing left to train and nothing logged twice.
            if train_args.save_steps and (step % train_args.save_steps == 0 or step >= max_steps):
                saved = save_checkpoint(accelerator, train_args.output_dir, step, train_args.save_total_limit,
                                        scheduler=scheduler, state=state)
                if on_save is not None:
                    on_save(saved)
            paused += time.perf_counter() - t_pause
            if stop.agreed and step < max_steps:  # at the last step, finishing is the better checkpoint
                bar.close()
                stop_preempted(accelerator, train_args, scheduler, state, ids_log)
            if step >= max_steps:
                break
        else:  # the epoch ran out before max_steps
            state.epoch += 1
            state.batches_in_epoch = 0
    bar.close()
    if ids_log is not None:
        ids_log.close()
    if eval_loader is not None and (not train_args.eval_steps or state.global_step % train_args.eval_steps):
        eval_metrics = evaluate(accelerator, model, eval_loader, step_fn)
        accelerator.log({f"eval/{k}": v for k, v in eval_metrics.items()}, step=state.global_step)
    return {**{f"train_{k}": v for k, v in logs.items()}, **{f"eval_{k}": v for k, v in eval_metrics.items()},
            **{f"eval_start_{k}": v for k, v in start_metrics.items()},
            "global_step": state.global_step, "skipped_steps": state.skipped_steps}


def window_counts(batch: dict, batch_flops: Callable | None, like: torch.Tensor) -> torch.Tensor:
    """`[logical tokens, real tokens processed, positions, model FLOPs]` of a micro-batch, on the device
    without a host sync (the batch's counts are device tensors after `prepare`)."""
    values = [batch["num_tokens"], processed_tokens(batch), batch["num_positions"],
              batch_flops(batch) if batch_flops else 0.0]
    return torch.stack([torch.as_tensor(v, device=like.device).to(like.dtype) for v in values])


def throughput_metrics(accelerator: Accelerator, counters: torch.Tensor, seconds: float,
                       peak_flops: float | None) -> dict[str, float]:
    """`tokens_per_second`, `padding_ratio` and (with a peak) `mfu` of a window, over all processes.

    `counters` holds this process's `[logical tokens, real tokens processed, positions, model FLOPs]`.
    """
    tokens, processed, positions, flops = accelerator.reduce(counters, reduction="sum").tolist()
    seconds = max(seconds, 1e-9)
    out = {"tokens_per_second": tokens / seconds, "padding_ratio": 1.0 - processed / max(positions, 1.0)}
    if peak_flops:
        out["mfu"] = flops / seconds / (peak_flops * accelerator.num_processes)
    return out


def apply_update(accelerator: Accelerator, optimizer, scheduler, params, bad: torch.Tensor, state: TrainState,
                 train_args, *, stop: StopSignals | None = None) -> tuple[torch.Tensor, bool]:
    """Clips and steps, unless the loss (flagged in `bad`) or the gradient norm is non-finite on any rank.

    A skipped step changes nothing: weights, optimizer moments and schedule stay put. Returns
    `(grad_norm, skipped)`; raises `NonFiniteError` after `max_consecutive_nonfinite` skips in a row.
    With `stop`, sets `stop.agreed` when a stop signal reached any rank.
    """
    grad_norm = grad_norm_and_clip(accelerator, params, train_args.max_grad_norm)
    bad = torch.maximum(bad, (~torch.isfinite(grad_norm)).float())
    # Every rank must take the same decisions: the non-finite flag and the stop request travel in one small
    # all-reduce per step (a signal may reach the ranks on either side of a step boundary).
    requested = torch.full_like(bad, float(stop is not None and stop.requested))
    n_bad, n_stop = accelerator.reduce(torch.stack([bad, requested]), reduction="sum").tolist()
    skipped = n_bad > 0
    if stop is not None:
        stop.agreed = n_stop > 0
    if skipped:
        state.skipped_steps += 1
        state.consecutive_nonfinite += 1
        logger.warning(f"step {state.global_step + 1}: non-finite loss or gradient norm, update skipped "
                       f"({state.skipped_steps} skipped so far)")
    else:
        optimizer.step()
        scheduler.step()
        state.consecutive_nonfinite = 0
    optimizer.zero_grad(set_to_none=True)
    state.global_step += 1
    if state.consecutive_nonfinite >= train_args.max_consecutive_nonfinite:
        raise NonFiniteError(f"{state.consecutive_nonfinite} optimizer steps in a row had a non-finite loss or "
                             f"gradient norm (last at step {state.global_step}); stopping. Lower the learning "
                             "rate, check the data, or use float32/bf16 instead of fp16.")
    return grad_norm, skipped


def grad_norm_and_clip(accelerator: Accelerator, params, max_grad_norm: float) -> torch.Tensor:
    """Total gradient norm (after the accumulation's all-reduce), clipped to `max_grad_norm` when > 0.

    Under DeepSpeed the engine has already clipped (to its `gradient_clipping`, see
    `dpo_core.distributed.configure_deepspeed`), stepped, and skipped the step if the norm was not finite,
    inside `accelerator.backward`: this returns its norm before clipping (inf for a skipped step).
    """
    if accelerator.distributed_type == "DEEPSPEED":  # a str enum
        norm = accelerator.clip_grad_norm_(params, max_grad_norm)  # the engine's norm; clips nothing itself
        return torch.as_tensor(0.0 if norm is None else norm, device=accelerator.device, dtype=torch.float32)
    if max_grad_norm and max_grad_norm > 0:
        norm = accelerator.clip_grad_norm_(params, max_grad_norm)
        if norm is not None:
            return torch.as_tensor(norm, device=accelerator.device, dtype=torch.float32)
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), device=accelerator.device)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))


# ----------------------------------------------------------------------------------------------- preemption
class StopSignals:
    """SIGTERM and SIGUSR1 set `requested` (the handler only sets a flag: it may run between any two
    bytecodes, in the middle of a collective or a save). `agreed` is what all ranks decided at the last step.

    Use as a context manager in the main thread; the previous handlers come back on exit. SIGTERM is what
    schedulers send before a kill (Slurm preemption, `scancel`, the time limit); SIGUSR1 what
    `#SBATCH --signal` is usually set to.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.requested, self.agreed, self.signum = False, False, None
        self._previous: dict = {}

    def _handle(self, signum, frame):
        self.requested, self.signum = True, signum

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # signal.signal works there only
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}


def stop_preempted(accelerator: Accelerator, train_args, scheduler, state: TrainState, ids_log) -> None:
    """Commits a checkpoint of this step boundary (unless `save_steps` just did), ends the trackers and
    the process group, and raises `TrainingPreempted`."""
    step = state.global_step
    path = checkpoint_dir(train_args.output_dir) / f"checkpoint-{step}"
    if not (train_args.save_steps and step % train_args.save_steps == 0):
        path = save_checkpoint(accelerator, train_args.output_dir, step, train_args.save_total_limit,
                               scheduler=scheduler, state=state)
    if ids_log is not None:
        ids_log.close()
    accelerator.print(f"Stop signal received: checkpoint of step {step} committed at {path}; exiting.", flush=True)
    accelerator.end_training()
    raise TrainingPreempted(step, path)


# ------------------------------------------------------------------------------------------ data-order audit


def open_example_ids_log(accelerator: Accelerator, output_dir: str | Path, global_step: int):
    """`output_dir/example_ids/rank{R}.jsonl`, appended and flushed per line. On resume, the lines of steps
    after the checkpoint (written by an attempt killed later) are dropped first: the file then lists what
    produced the final weights, each step once."""
    path = Path(output_dir) / EXAMPLE_IDS / f"rank{accelerator.process_index}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        kept = [line for line in path.read_text().splitlines(keepends=True)
                if line.endswith("\n") and json.loads(line)["step"] <= global_step]
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)
    return path.open("a", buffering=1)  # line-buffered: a killed run loses no complete line


def log_example_ids(file, batch: dict, state: TrainState) -> None:
    """One line per micro-batch: `{"step", "epoch", "micro_batch" (index in the epoch), "ids"}`."""
    if "ids" not in batch:
        raise ConfigError("--log_example_ids needs batches with an `ids` field (the example ids)")
    file.write(json.dumps({"step": state.global_step + 1, "epoch": state.epoch,
                           "micro_batch": state.batches_in_epoch - 1, "ids": batch["ids"].tolist()}) + "\n")
