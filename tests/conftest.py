"""Shared fixtures: the tiny demo model and tokenizer, built once per test session."""

import pytest

from dpo_core.demo import build_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A directory with the tiny demo model and tokenizer (`from_pretrained`-ready)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny"))
