"""The experiment trackers `--report_to` takes, each declared once: its package, its pip extra, and what it
needs from the run to start (or to continue a resumed run without logging a step twice).

Trackers run through accelerate (`Accelerator(log_with=...)`, `init_trackers`, `log`). A new tracker is one
`Tracker(...)` entry below.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Callable

from .errors import ConfigError

NONE = "none"


@dataclass(frozen=True)
class Tracker:
    """One tracker.

    name: accelerate's name for it (`log_with`).
    package: the module that must be importable; extra: the pip extra of dpo_core that installs it.
    init_kwargs: `resumed_step -> kwargs` for accelerate's `init_trackers(init_kwargs={name: ...})`.
    """

    name: str
    package: str
    extra: str
    init_kwargs: Callable[[int], dict] = field(default=lambda resumed_step: {})


def _tensorboard(resumed_step: int) -> dict:
    # purge_step: after a resume at step k, TensorBoard discards events an earlier attempt logged past k (it
    # may have run on after the checkpoint before being killed): no duplicate steps, step k itself kept.
    return {"purge_step": resumed_step + 1 if resumed_step else None}


TRACKERS: dict[str, Tracker] = {tracker.name: tracker for tracker in (
    Tracker("tensorboard", "tensorboard", "tensorboard", _tensorboard),
)}


def check_report_to(names: list[str]) -> None:
    """`--report_to` validation (names only; `enabled_trackers` checks the packages at the start of a run)."""
    unknown = [n for n in names if n not in TRACKERS and n != NONE]
    if unknown:
        raise ConfigError(f"--report_to: unknown {unknown}; choose from {', '.join([*TRACKERS, NONE])}")
    if NONE in names and len(names) > 1:
        raise ConfigError(f"--report_to: {NONE} stands alone, got {names}")


def enabled_trackers(names: list[str]) -> list[str]:
    """The trackers to start (none for `none`); a missing package is a `ConfigError` naming the pip extra,
    raised at the start of a run, before any model loads."""
    names = [n for n in dict.fromkeys(names) if n != NONE]
    for name in names:
        tracker = TRACKERS[name]
        if importlib.util.find_spec(tracker.package) is None:
            raise ConfigError(f"--report_to {name} needs the {tracker.package} package: "
                              f"pip install 'dpo_core[{tracker.extra}]'")
    return names


def tracker_init_kwargs(names: list[str], resumed_step: int) -> dict:
    """`init_kwargs` of `Accelerator.init_trackers` for these trackers."""
    return {name: TRACKERS[name].init_kwargs(resumed_step) for name in names}
