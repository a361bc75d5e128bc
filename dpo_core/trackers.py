"""The experiment trackers `--report_to` takes, each declared once: its package, its pip extra, what it needs
from the run to start (or to continue a resumed run without logging a step twice), and the id to store so that
a resume continues the same tracker run.

Trackers are accelerate's own (`Accelerator(log_with=...)`, `init_trackers`, `log`). A new tracker is one
`Tracker(...)` entry below. The started runs' ids go to `<output_dir>/trackers.json` (copied into every
checkpoint by `dpo_core.checkpoints.save_checkpoint`; `scripts/evaluate.py` reads it to log into the same run).
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .errors import ConfigError

NONE = "none"
ALL = "all"
RUNS_FILE = "trackers.json"  # {"project": ..., "run_name": ..., "runs": {tracker: run id}}
DEFAULT_PROJECT = "dpo_core"


@dataclass(frozen=True)
class RunInfo:
    """What a tracker's start-up arguments are made of.

    project: `--project_name` (accelerate's `init_trackers(project_name)`: wandb/trackio/comet/swanlab project,
    mlflow experiment, TensorBoard folder under `<output_dir>/logs`); run_name: `--run_name`; resumed_step: the
    checkpoint's step (0: fresh start); run_id: this tracker's stored id of the run to continue (None: new run).
    """

    project: str
    run_name: str
    output_dir: str
    resumed_step: int = 0
    run_id: str | None = None


@dataclass(frozen=True)
class Tracker:
    """One tracker.

    name: accelerate's name for it (`log_with`).
    package: the module that must be importable; extra: the pip extra of dpo_core that installs it.
    init_kwargs: `RunInfo -> kwargs` for accelerate's `init_trackers(init_kwargs={name: ...})`.
    run_id: accelerate's unwrapped tracker object -> the id to store for a resume (None: nothing to store).
    log_table: `(accelerate's tracker, name, columns, rows)`: a table, where the tracker has them
    (`scripts/evaluate.py`'s results).
    """

    name: str
    package: str
    extra: str
    init_kwargs: Callable[[RunInfo], dict] = field(default=lambda run: {})
    run_id: Callable[[Any], str | None] | None = None
    log_table: Callable[[Any, str, list[str], list[list]], None] | None = None


def _tensorboard(run: RunInfo) -> dict:
    # purge_step: after a resume at step k, TensorBoard discards events an earlier attempt logged past k (it
    # may have run on after the checkpoint before being killed): no duplicate steps, step k itself kept.
    return {"purge_step": run.resumed_step + 1 if run.resumed_step else None}


def _wandb(run: RunInfo) -> dict:
    # The same run id continues the run (wandb drops steps at or below the last one it holds).
    return {"name": run.run_name, **({"id": run.run_id, "resume": "allow"} if run.run_id else {})}


def _mlflow(run: RunInfo) -> dict:
    # The experiment is the project; a stored run_id reopens that run (its run_name is then left as it is).
    return {"run_id": run.run_id} if run.run_id else {"run_name": run.run_name}


def _trackio(run: RunInfo) -> dict:
    # trackio finds the run to continue by its name within the project.
    return {"name": run.run_name, "resume": "allow" if run.resumed_step else "never"}


def _wandb_table(tracker, name: str, columns: list[str], rows: list[list]) -> None:
    tracker.log_table(name, columns=columns, data=rows)  # a wandb.Table


def _mlflow_table(tracker, name: str, columns: list[str], rows: list[list]) -> None:
    import mlflow  # the tracker's run is the active one

    mlflow.log_dict({"columns": columns, "data": rows}, f"{name}.json")  # an artifact of the run


def _tensorboard_table(tracker, name: str, columns: list[str], rows: list[list]) -> None:
    lines = ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    tracker.writer.add_text(name, "\n".join(lines))
    tracker.writer.flush()


def _comet_ml(run: RunInfo) -> dict:
    import comet_ml  # only called for an enabled tracker: the package is there

    return {"experiment_key": run.run_id, "mode": "get_or_create" if run.run_id else "create",
            "experiment_config": comet_ml.ExperimentConfig(name=run.run_name)}


def _aim(run: RunInfo) -> dict:
    # accelerate names the Aim run after the project and puts its repository in <output_dir>/logs.
    return {"experiment": run.run_name}


def _swanlab(run: RunInfo) -> dict:
    return {"experiment_name": run.run_name}


def _clearml(run: RunInfo) -> dict:
    return {"project_name": run.project, "task_name": run.run_name}


def _dvclive(run: RunInfo) -> dict:
    return {"dir": os.path.join(run.output_dir, "dvclive"), "resume": bool(run.resumed_step)}


TRACKERS: dict[str, Tracker] = {tracker.name: tracker for tracker in (
    Tracker("tensorboard", "tensorboard", "tensorboard", _tensorboard, log_table=_tensorboard_table),
    Tracker("wandb", "wandb", "wandb", _wandb, run_id=lambda run: run.id, log_table=_wandb_table),
    Tracker("mlflow", "mlflow", "mlflow", _mlflow, run_id=lambda run: run.info.run_id, log_table=_mlflow_table),
    Tracker("trackio", "trackio", "trackio", _trackio, run_id=lambda run: run.name),
    Tracker("comet_ml", "comet_ml", "comet_ml", _comet_ml, run_id=lambda experiment: experiment.get_key()),
    Tracker("aim", "aim", "aim", _aim),
    Tracker("swanlab", "swanlab", "swanlab", _swanlab),
    Tracker("clearml", "clearml", "clearml", _clearml),
    Tracker("dvclive", "dvclive", "dvclive", _dvclive),
)}


def report_to_choices() -> list[str]:
    return [*TRACKERS, ALL, NONE]


def check_report_to(names: list[str]) -> None:
    """`--report_to` validation (names only; `enabled_trackers` checks the packages at the start of a run)."""
    unknown = [n for n in names if n not in TRACKERS and n not in (ALL, NONE)]
    if unknown:
        raise ConfigError(f"--report_to: unknown {unknown}; choose from {', '.join(report_to_choices())}")
    for alone in (NONE, ALL):
        if alone in names and len(set(names)) > 1:
            raise ConfigError(f"--report_to: {alone} stands alone, got {names}")


def installed(tracker: Tracker) -> bool:
    return importlib.util.find_spec(tracker.package) is not None


def enabled_trackers(names: list[str]) -> list[str]:
    """The trackers to start (none for `none`; `all`: every registered tracker whose package is installed); a
    missing package is a `ConfigError` naming the pip extra, raised at the start of a run, before any model
    loads."""
    if ALL in names:
        return [name for name, tracker in TRACKERS.items() if installed(tracker)]
    names = [n for n in dict.fromkeys(names) if n != NONE]
    for name in names:
        tracker = TRACKERS[name]
        if not installed(tracker):
            raise ConfigError(f"--report_to {name} needs the {tracker.package} package: "
                              f"pip install 'dpo_core[{tracker.extra}]'")
    return names


def tracker_init_kwargs(names: list[str], run: RunInfo, run_ids: dict | None = None) -> dict:
    """`init_kwargs` of `Accelerator.init_trackers` for these trackers (`run_ids`: the stored ids of the
    runs to continue, per tracker)."""
    run_ids = run_ids or {}
    return {name: TRACKERS[name].init_kwargs(RunInfo(run.project, run.run_name, run.output_dir, run.resumed_step,
                                                     run_ids.get(name))) for name in names}


def run_name_of(args) -> str:
    """`--run_name`, default the output directory's name (as transformers' run_name defaults to output_dir)."""
    return args.run_name or Path(os.path.abspath(args.output_dir)).name


def start_trackers(accelerator, names: list[str], run: RunInfo, config: dict,
                   run_ids: dict | None = None, *, write_ids: bool = True) -> dict[str, str]:
    """`init_trackers` with every tracker's arguments; on the main process, the started runs' ids are written
    to `<output_dir>/trackers.json` (unless `write_ids` is False) and returned."""
    accelerator.init_trackers(run.project, config=config, init_kwargs=tracker_init_kwargs(names, run, run_ids))
    if not accelerator.is_main_process:
        return {}
    ids = {}
    for name in names:
        if TRACKERS[name].run_id is not None:
            ids[name] = TRACKERS[name].run_id(accelerator.get_tracker(name, unwrap=True))
    if write_ids:
        write_run_ids(run.output_dir, run, ids)
    return ids


def log_table(accelerator, names: list[str], name: str, columns: list[str], rows: list[list]) -> list[str]:
    """The table to every tracker of `names` that has tables (main process); returns those trackers."""
    done = []
    for tracker_name in names:
        table = TRACKERS[tracker_name].log_table
        if table is not None and accelerator.is_main_process:
            table(accelerator.get_tracker(tracker_name), name, columns, rows)
            done.append(tracker_name)
    return done


def tracker_config(config: dict) -> dict:
    """A resolved config as every tracker records it: scalars and strings (TensorBoard's hparams take no
    more); anything else as JSON."""
    return {k: (v if isinstance(v, (int, float, str, bool)) else json.dumps(v)) for k, v in config.items()}


def write_run_ids(directory: str | Path, run: RunInfo, ids: dict) -> None:
    path = Path(directory) / RUNS_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"project": run.project, "run_name": run.run_name, "runs": ids}, indent=1))
    os.replace(tmp, path)


def read_run_ids(directory: str | Path | None) -> dict:
    """The `trackers.json` of a run directory or checkpoint ({} when absent)."""
    path = Path(directory) / RUNS_FILE if directory else None
    return json.loads(path.read_text()) if path is not None and path.exists() else {}
