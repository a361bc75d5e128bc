"""dpo_core/optim.py: `--optim` (transformers' names, transformers' table), `--optim_args`,
`--lr_scheduler_kwargs`, the weight-decay groups, bitsandbytes' optimizers on CPU, and exact resume."""

import importlib.util
import warnings

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from helpers import load_weights, read_scalars, small_dataset
from safetensors.torch import load_file

import dpo_core.dpo as dpo_module
from dpo_core.config import DataArguments, DPOArguments, ModelArguments, TrainArguments, parse_config
from dpo_core.errors import ConfigError
from dpo_core.optim import (
    BNB_OPTIMIZERS,
    OPTIMIZERS,
    build_optimizer,
    check_optim_device,
    optimizer_cls_and_kwargs,
    parse_optim_args,
)

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _fresh_state(fresh_accelerate_state):
    """In-process runs one after another: each starts from a fresh accelerate state (tests/conftest.py)."""


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return small_dataset(tmp_path_factory.mktemp("data"), n_train=32, n_test=8)


def configs(model, data, out, *extra):
    return parse_config((ModelArguments, DataArguments, DPOArguments, TrainArguments),
                        ["--model_name_or_path", str(model), "--dataset_name", str(data), "--output_dir", str(out),
                         "--max_length", "64", "--learning_rate", "5e-3", "--logging_steps", "1", "--seed", "3",
                         "--per_device_train_batch_size", "4", *extra])


def test_optim_flags_are_validated():
    with pytest.raises(ConfigError, match="adamw_torch"):
        TrainArguments(optim="adam_typo")
    with pytest.raises(ConfigError, match="key=value"):
        TrainArguments(optim_args="momentum")
    with pytest.raises(ConfigError, match="JSON"):
        TrainArguments(lr_scheduler_kwargs="{num_cycles: 2")
    assert TrainArguments(lr_scheduler_kwargs='{"num_cycles": 2}').lr_scheduler_kwargs == {"num_cycles": 2}
    assert parse_optim_args("momentum=0.9, nesterov=True,foo=bar") == {"momentum": 0.9, "nesterov": True,
                                                                        "foo": "bar"}
    with pytest.raises(ConfigError, match="not arguments of torch.optim.sgd.SGD"):
        optimizer_cls_and_kwargs(TrainArguments(optim="sgd", optim_args="betas=1"))
    cls, kwargs = optimizer_cls_and_kwargs(TrainArguments(optim="sgd", optim_args="momentum=0.9,nesterov=True",
                                                          learning_rate=0.1))
    assert cls is torch.optim.SGD and kwargs == {"lr": 0.1, "momentum": 0.9, "nesterov": True}


def test_the_default_is_todays_adamw():
    cls, kwargs = optimizer_cls_and_kwargs(TrainArguments(learning_rate=3e-4, adam_beta2=0.98, adam_epsilon=1e-6))
    assert cls is torch.optim.AdamW and kwargs == {"lr": 3e-4, "betas": (0.9, 0.98), "eps": 1e-6}


@pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes not installed")
def test_bitsandbytes_optimizers_name_an_unsupported_device():
    for name in BNB_OPTIMIZERS:
        with pytest.raises(ConfigError, match=f"--optim {name}: bitsandbytes has no optimizer kernels for device 'mps'"):
            check_optim_device(name, torch.device("mps"))
        check_optim_device(name, torch.device("cpu"))  # supported: no error
    check_optim_device("adamw_torch", torch.device("mps"))


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimizer_steps_lowers_the_loss_and_keeps_no_decay_groups(tiny_model_dir, name):
    """A few steps on one batch (the tiny model's LM loss) change the weights and lower the loss; biases and
    norm weights sit in the weight-decay-free group."""
    if name in BNB_OPTIMIZERS and not HAS_BNB:
        pytest.skip("bitsandbytes not installed")
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = torch.randint(0, model.config.vocab_size, (4, 16))
    lr = {"sgd": 0.1}.get(name, 1e-2)
    optimizer = build_optimizer(model, TrainArguments(optim=name, learning_rate=lr, weight_decay=0.1),
                                device=torch.device("cpu"))
    decay, no_decay = optimizer.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all("norm" in names[id(p)] or p.dim() < 2 for p in no_decay["params"]) and no_decay["params"]
    assert all("norm" not in names[id(p)] and p.dim() >= 2 for p in decay["params"])
    before = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    losses = []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")
        for _ in range(4):
            loss = model(input_ids=ids, labels=ids).loss
            losses.append(loss.item())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    assert not torch.equal(before, model.model.layers[0].self_attn.q_proj.weight)
    assert losses[-1] < losses[0], losses


@pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes not installed")
def test_paged_optimizers_run_unpaged_on_cpu():
    """bitsandbytes 0.50 supports paged optimizers on CPU by falling back to ordinary state (it warns): the
    run goes on, so no error is raised for them on CPU."""
    model = torch.nn.Linear(128, 128)
    optimizer = build_optimizer(model, TrainArguments(optim="paged_adamw_8bit"), device=torch.device("cpu"))
    model(torch.randn(2, 128)).sum().backward()
    with pytest.warns(UserWarning, match="Paged optimizers are not supported on CPU"):
        optimizer.step()
    assert optimizer.state[model.weight]["state1"].dtype == torch.uint8  # 8-bit state, on the CPU


def test_lr_scheduler_kwargs_reach_the_scheduler(tmp_path):
    from dpo_core.runs import schedule_and_resume

    class FakeAccelerator:
        is_main_process = True

        def init_trackers(self, *args, **kwargs):
            pass

    model = torch.nn.Linear(4, 4)
    args = TrainArguments(output_dir=str(tmp_path), max_steps=10, learning_rate=1.0, report_to=["none"],
                          lr_scheduler_type="cosine_with_restarts", lr_scheduler_kwargs='{"num_cycles": 2}')
    optimizer = build_optimizer(model, args)
    scheduler, _, _ = schedule_and_resume(FakeAccelerator(), optimizer, args, 10)
    lrs = []
    for _ in range(10):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == 1.0 and lrs[5] == pytest.approx(1.0)  # two cycles: the second restarts at step 5


@pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes not installed")
def test_adamw_8bit_resume_equals_the_uninterrupted_run(tiny_model_dir, data_dir, tmp_path):
    """The 8-bit optimizer state (quantized moments and their absmax) goes into the checkpoint through
    accelerate's save_state: resuming at step 2 of 4 gives the uninterrupted run's weights (1e-6)."""
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    dpo_module.run_dpo(*configs(tiny_model_dir, data_dir, full, "--optim", "adamw_8bit", "--max_steps", "4",
                                "--save_steps", "2"))
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    dpo_module.run_dpo(*configs(tiny_model_dir, data_dir, resumed, "--optim", "adamw_8bit", "--max_steps", "4",
                                "--resume_from_checkpoint", str(full / "checkpoints" / "checkpoint-2")))
    assert set(read_scalars(resumed / "logs")["train/loss"]) == {3, 4}
    a, b = load_weights(full), load_weights(resumed)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)
    initial = load_weights(tiny_model_dir)
    changed = sum(not torch.equal(a[k], initial[k]) for k in a if k in initial)
    assert changed > 0


@pytest.mark.slow
@pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes not installed")
def test_paged_adamw_8bit_with_qlora_runs(tiny_model_dir, data_dir, tmp_path):
    out = tmp_path / "qlora"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")
        metrics = dpo_module.run_dpo(*configs(tiny_model_dir, data_dir, out, "--optim", "paged_adamw_8bit",
                                              "--use_lora", "--lora_r", "4", "--load_in_4bit", "--max_steps", "2"))
    assert metrics["global_step"] == 2 and metrics["skipped_steps"] == 0
    losses = read_scalars(out / "logs")["train/loss"]
    assert set(losses) == {1, 2} and losses[1] != losses[2]
    assert load_file(out / "adapter_model.safetensors")
