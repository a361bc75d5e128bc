"""`--push_to_hub`: the run's output directory (and with `--hub_strategy checkpoint` each committed
checkpoint, into the repository's `last-checkpoint/` folder, as transformers does) uploaded with
`huggingface_hub` from the main process.

The token is huggingface_hub's to find (`HF_TOKEN`, else the `huggingface-cli login` cache): no token is
passed, read, logged or written here. The repository is `--hub_model_id`, else the name of `--output_dir` in
the token owner's namespace (transformers' default); `create_repo(exist_ok=True)` makes it (private with
`--hub_private_repo`), `--hub_revision` is a branch created from main when missing.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .errors import ConfigError

logger = logging.getLogger(__name__)

LAST_CHECKPOINT = "last-checkpoint"
# Not uploaded with the final output directory: checkpoints (pushed on their own with --hub_strategy
# checkpoint), unfinished files.
FINAL_IGNORE = ["checkpoints/**", "**/*.tmp", "*.tmp", "**/*.tmp.*"]


def check_hub_args(train_args) -> None:
    """Flag combinations known only once the preset is applied (call at the start of a run)."""
    if getattr(train_args, "push_to_hub", False) and train_args.hub_strategy == "checkpoint" \
            and not train_args.save_steps:
        raise ConfigError("--hub_strategy checkpoint pushes each saved checkpoint: give --save_steps")


def hub_repo_id(train_args) -> str:
    """`--hub_model_id`, else the output directory's name (the token owner's namespace), as transformers."""
    return train_args.hub_model_id or Path(train_args.output_dir).absolute().name


def push_folder(folder: str | Path, train_args, *, path_in_repo: str | None = None, commit_message: str,
                ignore_patterns: list[str] | None = None) -> str:
    """Creates the repository (and branch) if missing and uploads `folder` in one commit; returns the
    commit's URL. Call from the main process only."""
    from huggingface_hub import HfApi

    api = HfApi()  # no token argument: huggingface_hub resolves HF_TOKEN or the login cache itself
    repo = api.create_repo(hub_repo_id(train_args), private=train_args.hub_private_repo or None,
                           exist_ok=True,
                           repo_type="model")
    if train_args.hub_revision:
        api.create_branch(repo.repo_id, branch=train_args.hub_revision, exist_ok=True, repo_type="model")
    commit = api.upload_folder(repo_id=repo.repo_id, folder_path=str(folder), path_in_repo=path_in_repo,
                               revision=train_args.hub_revision, commit_message=commit_message,
                               ignore_patterns=ignore_patterns, repo_type="model")
    logger.info("pushed %s to %s", folder, commit)
    return str(commit)


def push_output_dir(output_dir: str | Path, train_args) -> str:
    """The final push: the whole output directory but its checkpoints."""
    return push_folder(output_dir, train_args, commit_message="End of training (dpo_core)",
                       ignore_patterns=FINAL_IGNORE)


def checkpoint_pusher(accelerator, train_args):
    """With `--push_to_hub --hub_strategy checkpoint`: a function `(checkpoint_dir) -> None` uploading a
    committed checkpoint into `last-checkpoint/` of the repository from the main process (a failed upload
    is logged, and training goes on); None otherwise."""
    if not (getattr(train_args, "push_to_hub", False) and train_args.hub_strategy == "checkpoint"):
        return None

    def push(checkpoint: Path) -> None:
        if not accelerator.is_main_process:
            return
        try:
            push_folder(checkpoint, train_args, path_in_repo=LAST_CHECKPOINT,
                        commit_message=f"Training in progress, {Path(checkpoint).name} (dpo_core)")
        except Exception as e:  # noqa: BLE001 - the checkpoint is committed locally; the next one retries
            logger.warning("pushing %s to the hub failed (%s); training goes on", checkpoint, type(e).__name__)

    return push
