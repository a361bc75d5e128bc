"""Checkpoints that count only once complete: `save_state` into a temporary directory, rename, then a
`COMPLETE` marker; rotation after the commit; resume from a path or `latest`; and the run directory's guard
against mixing a new run into an earlier one. Used by `dpo_core.training`."""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from accelerate import Accelerator

from .errors import MissingError, OutputExistsError
from .trackers import RUNS_FILE


@dataclass
class TrainState:
    """What, besides model/optimizer/scheduler/RNG, a checkpoint needs to continue exactly."""

    global_step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches of `epoch` already consumed: the data position
    skipped_steps: int = 0  # optimizer steps skipped because of a non-finite loss or gradient norm
    consecutive_nonfinite: int = 0

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


COMPLETE = "COMPLETE"  # marker written last into a checkpoint: only marked checkpoints count
EXAMPLE_IDS = "example_ids"  # the `--log_example_ids` folder of a run


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Committed checkpoints, oldest first (a save interrupted midway has no marker and is ignored)."""
    root = checkpoint_dir(output_dir)
    found = [p for p in root.glob("checkpoint-*") if (p / COMPLETE).exists() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


TRAINER_STATE = "trainer_state.json"


def save_checkpoint(accelerator: Accelerator, output_dir: str | Path, step: int, limit: int | None, *,
                    scheduler, state: TrainState) -> Path:
    """`save_state` into a temporary directory, then rename and mark complete; rotate old ones after. The
    tracker run ids (`trackers.json`) go in too: a resume continues those runs.

    The loop's own state (data position, counters) and the scheduler go to JSON, not through
    `register_for_checkpointing`, whose objects accelerate reloads with an unrestricted pickle.
    """
    final = checkpoint_dir(output_dir) / f"checkpoint-{step}"
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:  # leftovers of a save killed midway (never counted: no marker)
        for stale in checkpoint_dir(output_dir).glob("checkpoint-*"):
            if stale.is_dir() and not (stale / COMPLETE).exists():
                shutil.rmtree(stale)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        trainer_state = {"train_state": state.state_dict(), "scheduler": scheduler.state_dict()}
        (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=1))
        if (Path(output_dir) / RUNS_FILE).exists():  # the tracker runs a resume from here continues
            shutil.copy2(Path(output_dir) / RUNS_FILE, tmp / RUNS_FILE)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        (final / COMPLETE).write_text(json.dumps({"step": step, "time": time.time()}))
        # Rotate only now: the newest complete checkpoint is never deleted before its successor exists.
        if limit:
            for old in complete_checkpoints(output_dir)[:-limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, path: str | Path, *, scheduler, state: TrainState) -> None:
    """Model, optimizer, RNG and sampler through accelerate (restricted unpickling); the rest from JSON."""
    accelerator.load_state(str(path))
    trainer_state = json.loads((Path(path) / TRAINER_STATE).read_text())
    state.load_state_dict(trainer_state["train_state"])
    scheduler.load_state_dict(trainer_state["scheduler"])


def prepare_output_dir(accelerator: Accelerator, output_dir: str | Path, *, overwrite: bool, resume: str | None):
    """Refuses to mix a new run into an earlier one's logs and checkpoints, unless told to replace or resume.

    `--resume_from_checkpoint latest` with no complete checkpoint yet (an attempt stopped before its first
    commit) starts afresh: the earlier attempt's logs and example-id logs are removed, so that one command
    serves the first start and every restart.
    """
    output_dir = Path(output_dir)
    earlier = [output_dir / name for name in ("logs", "checkpoints", "train_results.json", EXAMPLE_IDS)
               if (output_dir / name).exists()]
    fresh_restart = resume == "latest" and not complete_checkpoints(output_dir)
    if earlier and (not resume or fresh_restart):
        if not overwrite and not fresh_restart:
            raise OutputExistsError(f"{output_dir} holds an earlier run ({', '.join(p.name for p in earlier)}): pass "
                                  "--overwrite_output_dir to replace it, or --resume_from_checkpoint latest to "
                                  "continue it")
        accelerator.wait_for_everyone()  # every rank has checked before anything is deleted
        if accelerator.is_main_process:
            for path in earlier:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    accelerator.wait_for_everyone()


def resolve_resume(output_dir: str | Path, resume: str | None) -> Path | None:
    """`latest` -> newest complete checkpoint or None (fresh start); a path must be a complete checkpoint."""
    if not resume:
        return None
    if resume == "latest":
        found = complete_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / COMPLETE).exists():
        raise MissingError(f"{path} is not a complete checkpoint (no {COMPLETE} marker)")
    return path
