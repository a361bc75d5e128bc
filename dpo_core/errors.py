"""The errors a user can fix: each kind below is one `UserError`, printed by the scripts as one line.

Anything else raised inside the project, transformers or torch is a bug (ours or theirs) and keeps its
traceback (`dpo_core.cli.run_cli`). Every kind also derives from the builtin its callers would catch
(`ValueError`, `FileNotFoundError`, ...), so the Python API raises what Python code expects.
"""

from __future__ import annotations


class UserError(Exception):
    """Something the user can fix: the message says what and where (file, record, field, flag)."""


class ConfigError(UserError, ValueError):
    """A bad flag, a bad combination of flags, a bad config file, or a model that cannot run a chosen setting."""


class DataError(UserError, ValueError):
    """Unusable data: an unreadable or empty dataset, a split that does not exist, bad records."""


class RefCacheError(UserError, ValueError):
    """A reference cache that does not belong to this run, is incomplete, or is corrupted."""


class OutputExistsError(UserError, FileExistsError):
    """An output directory or file that holds an earlier result the run would overwrite."""


class MissingError(UserError, FileNotFoundError):
    """A model, dataset, checkpoint or file that does not exist where the flags say."""


class NonFiniteError(UserError, RuntimeError):
    """Training stopped: too many optimizer steps in a row had a non-finite loss or gradient norm."""


class TrainingPreempted(Exception):  # noqa: N818 - not an error: a clean stop with a committed checkpoint
    """Raised by the training loop after a stop signal, once the checkpoint of `step` is committed."""

    def __init__(self, step: int, checkpoint):
        super().__init__(f"preempted: stopped at step {step}, checkpoint {checkpoint} committed; run the same "
                         "command with --resume_from_checkpoint latest to continue")
        self.step, self.checkpoint = step, checkpoint


# A preempted run exits with this status once its checkpoint is committed. Not a failure code on purpose:
# accelerate's launcher (torchrun) reports any non-zero worker status as a crash, stops the other ranks and
# exits 1 itself. The Slurm templates know they asked for the stop, and requeue on 0 (see slurm/launch.sh).
# A preempted run differs from a finished one by its output: no train_results.json, no final model.
PREEMPTED_EXIT_CODE = 0
