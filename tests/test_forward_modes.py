"""--forward_mode and --logps_chunk_size end to end: scripts/dpo.py trains identically (per-step losses read
back from TensorBoard, 1e-5) and scripts/precompute_ref_logprobs.py writes the same cache in every mode."""

import inspect
from dataclasses import fields

import pytest
import torch
from helpers import read_scalars, run_script, small_dataset
from safetensors.torch import load_file

from dpo_core.config import PrecomputeArguments, TrainArguments
from dpo_core.errors import ConfigError
from dpo_core.layouts import LAYOUTS, forward_mode_help

# (mode, --logps_chunk_size): concat without chunking is the reference; every registered layout runs chunked.
RUNS = [("concat", "0"), *((mode, chunk) for mode, chunk in zip(LAYOUTS, ["1024", "7", "1024", "3", "5"]))]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return small_dataset(tmp_path_factory.mktemp("data"), n_train=12, n_test=4)


def test_every_layout_is_declared_whole_and_is_what_the_flags_offer():
    """One `Layout` per name: a collator and a forward of the common signatures, a help text, and the flag's
    help and validation built from the table (a layout missing any of these fails here)."""
    assert len(LAYOUTS) >= 3
    for name, layout in LAYOUTS.items():
        assert layout.name == name and len(layout.help) > 10, name
        forward = set(inspect.signature(layout.forward).parameters)
        assert {"model", "batch", "ld_alpha", "wpo", "chunk_size"} <= forward, name
        assert "pad_token_id" in inspect.signature(layout.collate).parameters, name
        assert set(layout.collate_options("eager")) <= set(inspect.signature(layout.collate).parameters), name
        assert f"{name}: {layout.help}" in forward_mode_help()
        assert TrainArguments(output_dir="x", forward_mode=name).forward_mode == name
    help_field = next(f for f in fields(TrainArguments) if f.name == "forward_mode")
    assert help_field.metadata["help"] == forward_mode_help() and help_field.metadata["choices"] == ["auto", *LAYOUTS]
    assert TrainArguments(output_dir="x").forward_mode == "auto"  # the default: dpo_core.layouts.choose_layout
    with pytest.raises(ConfigError, match=", ".join(LAYOUTS)):
        TrainArguments(output_dir="x", forward_mode="packed")


def test_flags_are_validated(tmp_path):
    with pytest.raises(ValueError, match="forward_mode must be one of"):
        TrainArguments(output_dir="x", forward_mode="packed")
    with pytest.raises(ValueError, match="logps_chunk_size"):
        PrecomputeArguments(output_dir="x", logps_chunk_size=-1)


@pytest.mark.slow
def test_dpo_losses_identical_in_every_forward_mode(tiny_model_dir, data_dir, tmp_path):
    """Online reference (the same forward runs for policy and reference), 3 steps, learning rate high enough
    that the weights move: the per-step losses and log-probs of each mode equal concat without chunking."""
    scalars = {}
    for mode, chunk in RUNS:
        out = tmp_path / f"{mode}-{chunk}"
        run_script("dpo.py", ["--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(data_dir),
                              "--output_dir", str(out), "--max_length", "64", "--learning_rate", "5e-3",
                              "--logging_steps", "1", "--max_steps", "3", "--per_device_train_batch_size", "4",
                              "--forward_mode", mode, "--logps_chunk_size", chunk, "--report_to", "tensorboard"])
        scalars[mode, chunk] = read_scalars(out / "logs")
    ref = scalars["concat", "0"]
    assert sorted(ref["train/loss"]) == [1, 2, 3] and len(set(ref["train/loss"].values())) > 1
    for key, got in scalars.items():
        for tag in ("train/loss", "train/logps/chosen", "train/logps/rejected", "train/rewards/margins"):
            for step, value in ref[tag].items():
                assert got[tag][step] == pytest.approx(value, abs=1e-5, rel=1e-6), (key, tag, step)


@pytest.mark.slow
def test_precompute_cache_identical_in_every_forward_mode(tiny_model_dir, data_dir, tmp_path):
    caches = {}
    for mode, chunk in RUNS:
        out = tmp_path / f"cache-{mode}-{chunk}"
        run_script("precompute_ref_logprobs.py", [
            "--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(data_dir), "--eval_split", "test",
            "--max_length", "64", "--output_dir", str(out), "--per_device_batch_size", "5",
            "--forward_mode", mode, "--logps_chunk_size", chunk])
        caches[mode, chunk] = {split: load_file(str(out / f"{split}.safetensors")) for split in ("train", "eval")}
        manifest = (out / "manifest.json").read_text()
        assert mode not in manifest  # the mode is not part of the fingerprint: every mode's cache serves any run
    for mode, cache in caches.items():
        for split, tensors in cache.items():
            ref = caches["concat", "0"][split]
            assert torch.equal(tensors["ids"], ref["ids"])
            for name in ("chosen_logps", "rejected_logps"):
                torch.testing.assert_close(tensors[name], ref[name], atol=1e-5, rtol=1e-6, msg=f"{mode} {split}")
