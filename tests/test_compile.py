"""--torch_compile: the decoder blocks compiled in place (dpo_core/compiling.py) give eager mode's numbers.

- In process (aot_eager: dynamo + AOT autograd, the tracing where compiled semantics can differ, without
  inductor's code generation): every layout's log-probs and gradients, through the chunked head, with LoRA,
  equal eager to 1e-5.
- End to end (inductor, the default backend): two processes, LoRA, the auto layout, a checkpoint and a resume;
  every step's loss equals an uninterrupted eager run's to 1e-5, and the graphs compiled are logged and stop
  growing after the first step (--pad_to_multiple_of keeps the shapes few).
"""

import copy

import pytest
import torch
from helpers import read_scalars_as_shown, run_script, small_dataset
from test_architectures import _pairs, make_model

from dpo_core.compiling import compile_blocks, compiled_graphs, decoder_blocks
from dpo_core.errors import ConfigError
from dpo_core.layouts import LAYOUTS, make_collator
from dpo_core.modeling import enable_gradient_checkpointing


def _logps_and_grads(model, mode, pairs):
    model.zero_grad()
    out = LAYOUTS[mode].forward(model, make_collator(mode, 0, model, pad_to_multiple_of=16)(pairs), chunk_size=5)
    (out.chosen_logps.sum() - 0.5 * out.rejected_logps.sum()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return torch.cat([out.chosen_logps, out.rejected_logps]).detach(), grads


def _llama(lora: bool):
    """The tiny sdpa Llama in training mode, with a LoRA adapter (q, v; no dropout) when `lora`."""
    model = make_model("llama", "sdpa").train()
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    return model


def _assert_same_in_every_layout(want_model, got_model, pairs):
    """Per-sequence log-probs (1e-5) and every parameter's gradient (1e-5 + 1e-4 rel) equal, in every layout."""
    for mode in LAYOUTS:
        want, want_grads = _logps_and_grads(want_model, mode, pairs)
        got, got_grads = _logps_and_grads(got_model, mode, pairs)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-6, msg=mode)
        assert want_grads.keys() == got_grads.keys() and want_grads, mode
        for name in want_grads:
            torch.testing.assert_close(got_grads[name], want_grads[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_compiled_blocks_equal_eager_in_every_layout(lora):
    eager = _llama(lora)
    compiled = copy.deepcopy(eager)
    assert compile_blocks(compiled, backend="aot_eager") == len(decoder_blocks(eager)) == 2
    pairs, before = _pairs((8, 20), (2, 9)), compiled_graphs()
    _assert_same_in_every_layout(eager, compiled, pairs)
    assert compiled_graphs() > before  # the blocks really ran compiled
    # the parameters keep their names: checkpoints and adapters load into an eager model
    assert [n for n, _ in compiled.named_parameters()] == [n for n, _ in eager.named_parameters()]


def test_a_model_without_repeated_blocks_is_refused():
    with pytest.raises(ConfigError, match="no repeated decoder blocks"):
        compile_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU()))


@pytest.mark.slow
def test_compiled_two_process_lora_run_with_resume_equals_eager(tiny_model_dir, tmp_path):
    data = small_dataset(tmp_path / "data", n_train=48, n_test=8)

    def args(out, steps, *extra):
        return ["--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(data), "--output_dir", str(out),
                "--max_length", "64", "--learning_rate", "5e-3", "--lr_scheduler_type", "constant",
                "--logging_steps", "1", "--seed", "3", "--max_steps", str(steps), "--save_steps", "2",
                "--per_device_train_batch_size", "2", "--use_lora", "--lora_r", "4", "--eval_steps", "0",
                "--pad_to_multiple_of", "32", *extra]

    run_script("dpo.py", args(tmp_path / "eager", 6), processes=2)
    out = tmp_path / "compiled"
    first = run_script("dpo.py", args(out, 4, "--torch_compile"), processes=2)
    assert "torch.compile: 2 decoder blocks" in first.stdout + first.stderr
    run_script("dpo.py", args(out, 6, "--torch_compile", "--resume_from_checkpoint", "latest"), processes=2)
    want, got = read_scalars_as_shown(tmp_path / "eager" / "logs"), read_scalars_as_shown(out / "logs")
    assert sorted(got["train/loss"]) == list(range(1, 7))
    for step, loss in want["train/loss"].items():
        assert abs(got["train/loss"][step] - loss) < 1e-5, (step, got["train/loss"][step], loss)
    graphs = got["train/compiled_graphs"]
    assert graphs[1] >= 1 and graphs[4] == graphs[2] and graphs[6] == graphs[5]  # no recompiles after warm-up


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_gradient_checkpointing_equals_plain_in_every_layout(lora):
    """--gradient_checkpointing (transformers' per-layer recomputation) under every layout's masks and positions
    and the chunked head (its own recomputation per chunk): the same log-probs and gradients (1e-5)."""
    plain = _llama(lora)
    checkpointed = copy.deepcopy(plain)
    enable_gradient_checkpointing(checkpointed)  # what dpo.py and sft.py call
    assert checkpointed.is_gradient_checkpointing
    pairs = _pairs((8, 20), (2, 9))
    _assert_same_in_every_layout(plain, checkpointed, pairs)
