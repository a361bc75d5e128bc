"""Shared fixtures: the tiny demo model and tokenizer, built once per test session."""

import os
from pathlib import Path

# No hub is reachable here: a name that looks like a hub id fails at once instead of after the client's retries
# (set before huggingface_hub is imported; it reads this once). The push tests set their own local endpoint.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

from dpo_core.demo import build_tiny_model  # noqa: E402

# The scripts the tests start (`python scripts/X.py`, `accelerate launch`) import the dpo_core of this checkout,
# not the one installed elsewhere (an editable install of another clone or worktree).
_ROOT = str(Path(__file__).resolve().parents[1])
os.environ["PYTHONPATH"] = os.pathsep.join([_ROOT, *filter(None, [os.environ.get("PYTHONPATH")])])


@pytest.fixture(scope="session", autouse=True)
def prepared_data_store(tmp_path_factory):
    """Prepared data goes to a folder of this session (the scripts the tests start inherit it), not ~/.cache."""
    os.environ["DPO_CORE_CACHE"] = str(tmp_path_factory.mktemp("prepared-data"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A directory with the tiny demo model and tokenizer (`from_pretrained`-ready)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def resume_data(tmp_path_factory):
    """48 training pairs (6 optimizer steps per epoch in `helpers.resume_args`)."""
    from helpers import small_dataset

    return small_dataset(tmp_path_factory.mktemp("resume-data"), n_train=48, n_test=8)


@pytest.fixture(scope="session")
def resume_reference(tiny_model_dir, resume_data, tmp_path_factory):
    """The uninterrupted 2-process run that interrupted runs must reproduce."""
    from helpers import resume_args, run_script

    out = tmp_path_factory.mktemp("resume-reference") / "run"
    run_script("dpo.py", resume_args(tiny_model_dir, resume_data, out), processes=2)
    return out


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread (two threads on a busy 2-core machine mostly wait); a module
    opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fresh_accelerate_state():
    """Resets accelerate's process-wide state after a test that ran training in this process."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
