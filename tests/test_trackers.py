"""The tracker registry: `--report_to` is validated against it, a missing package is named with its pip extra
before anything loads, and each tracker's start-up arguments come from its one entry."""

from dataclasses import fields

import pytest

from dpo_core import trackers
from dpo_core.config import TrainArguments
from dpo_core.errors import ConfigError


def test_report_to_takes_the_registered_trackers_or_none():
    for name in trackers.TRACKERS:
        assert TrainArguments(output_dir="x", report_to=[name]).report_to == [name]
    assert TrainArguments(output_dir="x", report_to="none").report_to == ["none"]  # a YAML string
    with pytest.raises(ConfigError, match="unknown \\['tensorbord'\\]"):
        TrainArguments(output_dir="x", report_to=["tensorbord"])
    with pytest.raises(ConfigError, match="none stands alone"):
        TrainArguments(output_dir="x", report_to=["none", "tensorboard"])
    choices = next(f for f in fields(TrainArguments) if f.name == "report_to").metadata["choices"]
    assert choices == [*trackers.TRACKERS, "none"]  # the flag's choices come from the registry
    assert trackers.enabled_trackers(["none"]) == []
    assert trackers.enabled_trackers(["tensorboard", "tensorboard"]) == ["tensorboard"]


def test_a_missing_tracker_package_names_its_pip_extra(monkeypatch):
    fake = trackers.Tracker("faketracker", "no_such_package_for_dpo_core", "faketracker")
    monkeypatch.setitem(trackers.TRACKERS, "faketracker", fake)
    TrainArguments(output_dir="x", report_to=["faketracker"])  # names are checked at parse time, packages later
    with pytest.raises(ConfigError, match=r"pip install 'dpo_core\[faketracker\]'"):
        trackers.enabled_trackers(["faketracker"])


def test_tensorboard_purges_what_a_killed_attempt_logged_after_the_resumed_step():
    assert trackers.tracker_init_kwargs(["tensorboard"], 0) == {"tensorboard": {"purge_step": None}}
    assert trackers.tracker_init_kwargs(["tensorboard"], 6) == {"tensorboard": {"purge_step": 7}}
