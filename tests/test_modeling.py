"""dpo_core/modeling.py: LoRA and QLoRA training through scripts/dpo.py and the precompute, the adapter
reference (no second copy of the weights), saved and merged adapters, checkpoints and resume."""

import importlib.util
import json
import math

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from helpers import ROOT, load_weights, read_scalars, results, run_script, small_dataset
from safetensors.torch import load_file

import dpo_core.dpo as dpo_module
import dpo_core.runs as runs_module
from dpo_core.config import DataArguments, DPOArguments, ModelArguments, TrainArguments, parse_config

LN2 = math.log(2.0)
HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None


@pytest.fixture(autouse=True)
def _fresh_state(fresh_accelerate_state):
    """In-process runs one after another: each starts from a fresh accelerate state (tests/conftest.py)."""


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return small_dataset(tmp_path_factory.mktemp("data"), n_train=32, n_test=8)


def lora_args(model, data, out, *extra):
    return ["--model_name_or_path", str(model), "--dataset_name", str(data), "--output_dir", str(out),
            "--max_length", "64", "--learning_rate", "5e-3", "--logging_steps", "1", "--seed", "3",
            "--per_device_train_batch_size", "4", "--use_lora", "--lora_r", "4", *extra]


def configs(*argv):
    return parse_config((ModelArguments, DataArguments, DPOArguments, TrainArguments), list(argv))


def count_model_loads(monkeypatch):
    """Counts `AutoModelForCausalLM.from_pretrained` calls (every model dpo_core loads goes through it)."""
    from transformers import AutoModelForCausalLM

    real, calls = AutoModelForCausalLM.from_pretrained, []

    def counted(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", counted)
    return calls


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, data_dir, tmp_path_factory):
    """scripts/dpo.py --use_lora (all-linear, r 4, alpha 32), 3 steps, a checkpoint, --merge_adapter."""
    out = tmp_path_factory.mktemp("lora") / "run"
    run_script("dpo.py", lora_args(tiny_model_dir, data_dir, out, "--max_steps", "3", "--save_steps", "3",
                                   "--merge_adapter"))
    return out


def test_lora_and_sync_flags_are_validated():
    with pytest.raises(ValueError, match="not both"):
        ModelArguments(use_lora=True, load_in_4bit=True, load_in_8bit=True)
    from dpo_core.modeling import load_model_from_args

    for flag in ("load_in_4bit", "load_in_8bit", "merge_adapter"):
        # checked where the model is loaded (a directory holding an adapter implies LoRA), before any loading
        args = ModelArguments(model_name_or_path="no-adapter-here", **{flag: True})
        with pytest.raises(ValueError, match=f"--{flag} needs --use_lora"):
            load_model_from_args(args)
    with pytest.raises(ValueError, match="all-linear stands alone"):
        ModelArguments(use_lora=True, lora_target_modules=["all-linear", "q_proj"])
    with pytest.raises(ValueError, match="lora_r"):
        ModelArguments(use_lora=True, lora_r=0)
    with pytest.raises(ValueError, match="--ref_logprobs"):
        DPOArguments(sync_ref_model=True, ref_logprobs="cache")
    with pytest.raises(ValueError, match="--reference_free"):
        DPOArguments(sync_ref_model=True, reference_free=True)
    with pytest.raises(ValueError, match="mixup_alpha"):
        DPOArguments(sync_ref_model=True, ref_model_mixup_alpha=1.5)
    with pytest.raises(ValueError, match="sync_steps"):
        DPOArguments(sync_ref_model=True, ref_model_sync_steps=0)
    assert ModelArguments(use_lora=True, lora_target_modules="q_proj").lora_target_modules == ["q_proj"]


def test_adapter_reference_is_the_base_model_and_checkpointing_keeps_gradients(tiny_model_dir):
    """With the adapter disabled the LoRA model gives the base model's logits (a separate load, 1e-6);
    gradient checkpointing gives the adapter the same gradients as without (1e-6)."""
    from dpo_core.modeling import adapter_reference, load_model, load_model_from_args

    args = ModelArguments(model_name_or_path=str(tiny_model_dir), use_lora=True, lora_r=4)
    model = load_model_from_args(args)
    torch.manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.1)  # B = 0 at init: make the adapter change the outputs
    ids = torch.randint(0, 1000, (2, 12))
    base = load_model(str(tiny_model_dir), trainable=False)(input_ids=ids).logits
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        with adapter_reference(model, None) as ref:
            reference = ref(input_ids=ids).logits
    assert (adapted - base).abs().max() > 1e-2
    torch.testing.assert_close(reference, base, atol=1e-6, rtol=0)
    assert model.training  # the mode is left alone

    def adapter_grads(gradient_checkpointing):
        m = load_model_from_args(ModelArguments(model_name_or_path=str(tiny_model_dir), use_lora=True, lora_r=4,
                                                lora_dropout=0.0,
                                                gradient_checkpointing=gradient_checkpointing))
        m.load_state_dict(model.state_dict())
        if gradient_checkpointing:
            m.gradient_checkpointing_enable()
        m.train()
        m(input_ids=ids).logits.logsumexp(-1).mean().backward()
        return {n: p.grad for n, p in m.named_parameters() if p.requires_grad}

    plain, checkpointed = adapter_grads(False), adapter_grads(True)
    assert plain.keys() == checkpointed.keys() and all(n.count("lora_") for n in plain)
    for name, grad in plain.items():
        assert grad is not None and checkpointed[name] is not None, name
        torch.testing.assert_close(checkpointed[name], grad, atol=1e-6, rtol=0)


@pytest.mark.slow
def test_lora_run_trains_only_the_adapter_and_merges_exactly(lora_run, tiny_model_dir):
    """Outputs: the adapter (no full weights), a checkpoint holding the adapter only, and merged weights that
    equal base + alpha / r * B @ A (recomputed in float64 from the saved base and adapter: 1e-6), with every
    weight LoRA does not target bitwise the base's. Step 1: the adapter starts at B = 0, so policy ==
    reference and the loss is ln 2."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from dpo_core.modeling import load_model

    assert (lora_run / "adapter_model.safetensors").exists() and (lora_run / "adapter_config.json").exists()
    assert (lora_run / "tokenizer.json").exists() and not (lora_run / "model.safetensors").exists()
    adapter = load_file(lora_run / "adapter_model.safetensors")
    assert adapter and all(".lora_A." in k or ".lora_B." in k for k in adapter)
    assert any(v.abs().max() > 0 for k, v in adapter.items() if ".lora_B." in k)  # trained away from 0
    ckpt = load_file(lora_run / "checkpoints" / "checkpoint-3" / "model.safetensors")
    assert len(ckpt) == len(adapter) and all(".lora_" in k for k in ckpt)
    losses = read_scalars(lora_run / "logs")["train/loss"]
    assert losses[1] == pytest.approx(LN2, abs=1e-6) and losses[3] != pytest.approx(LN2, abs=1e-3)

    config = json.loads((lora_run / "adapter_config.json").read_text())
    scaling = config["lora_alpha"] / config["r"]
    base, merged = load_weights(tiny_model_dir), load_weights(lora_run / "merged")
    assert base.keys() == merged.keys()
    targeted = 0
    for key, weight in base.items():
        prefix = "base_model.model." + key.removesuffix(".weight")
        if f"{prefix}.lora_A.weight" in adapter:
            a, b = adapter[f"{prefix}.lora_A.weight"].double(), adapter[f"{prefix}.lora_B.weight"].double()
            torch.testing.assert_close(merged[key].double(), weight.double() + scaling * b @ a, atol=1e-6, rtol=0)
            targeted += 1
        else:
            assert torch.equal(merged[key], weight), key  # embeddings, norms, lm_head: untouched
    assert targeted == 14  # all-linear: 7 projections x 2 layers, not the output head

    ids = torch.randint(0, 1000, (2, 10))
    full = AutoModelForCausalLM.from_pretrained(lora_run / "merged")(input_ids=ids).logits
    with_adapter = PeftModel.from_pretrained(load_model(str(tiny_model_dir)), str(lora_run))(input_ids=ids).logits
    torch.testing.assert_close(full, with_adapter, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_two_process_lora_run_equals_one_process(lora_run, tiny_model_dir, data_dir, tmp_path):
    """2 ranks x 2 pairs (gloo, DDP over the adapter) == 1 rank x 4 pairs: same losses and adapter."""
    out = tmp_path / "two"
    proc = run_script("dpo.py", lora_args(tiny_model_dir, data_dir, out, "--max_steps", "3",
                                          "--per_device_train_batch_size", "2"), processes=2)
    assert "num_processes 2" in proc.stdout and results(out)["num_processes"] == 2
    one, two = read_scalars(lora_run / "logs")["train/loss"], read_scalars(out / "logs")["train/loss"]
    assert one.keys() == two.keys() == {1, 2, 3}
    for step in one:
        assert two[step] == pytest.approx(one[step], abs=1e-5)
    a, b = load_file(lora_run / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_a_saved_adapter_is_a_starting_policy_for_dpo_and_the_precompute(lora_run, tiny_model_dir, data_dir,
                                                                         tmp_path, monkeypatch):
    """`--model_name_or_path <adapter dir>`: base + adapter, trained further; its reference is the adapter
    as loaded (a frozen copy, TRL's choice), so step 1 is ln 2 although base and adapter differ. The precompute
    gives the same reference, and its cache is accepted by the run (the fingerprint covers the adapter)."""
    from dpo_core.modeling import weights_fingerprint

    calls = count_model_loads(monkeypatch)
    out = tmp_path / "again"
    dpo_module.run_dpo(*configs(*lora_args(lora_run, data_dir, out, "--max_steps", "2")))
    assert len(calls) == 1  # the base only: no reference model
    losses = read_scalars(out / "logs")["train/loss"]
    assert losses[1] == pytest.approx(LN2, abs=1e-6)
    before, after = load_file(lora_run / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_model_dir)

    spec = importlib.util.spec_from_file_location("precompute", ROOT / "scripts" / "precompute_ref_logprobs.py")
    precompute = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(precompute)
    AcceleratorState._reset_state(True)
    precompute.main(["--model_name_or_path", str(lora_run), "--dataset_name", str(data_dir), "--max_length", "64",
                     "--seed", "3", "--output_dir", str(tmp_path / "cache")])
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["fingerprint"]["reference_weights"] == weights_fingerprint(str(lora_run))
    assert weights_fingerprint(str(lora_run)) != weights_fingerprint(str(tiny_model_dir))
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    cached = tmp_path / "cached"
    dpo_module.run_dpo(*configs(*lora_args(lora_run, data_dir, cached, "--max_steps", "2", "--ref_logprobs",
                                             str(tmp_path / "cache"))))
    for step, value in read_scalars(cached / "logs")["train/loss"].items():
        assert value == pytest.approx(losses[step], abs=1e-5), step


@pytest.mark.slow
def test_adapter_fingerprint_changes_with_the_adapter_weights(lora_run, tmp_path):
    import shutil

    from dpo_core.modeling import weights_fingerprint

    copy = tmp_path / "adapter"
    copy.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(lora_run / name, copy / name)
    assert weights_fingerprint(str(copy)) == weights_fingerprint(str(lora_run))
    weights = load_file(copy / "adapter_model.safetensors")
    key = next(iter(weights))
    weights[key] = weights[key] + 1e-3
    from safetensors.torch import save_file

    save_file(weights, copy / "adapter_model.safetensors")
    assert weights_fingerprint(str(copy)) != weights_fingerprint(str(lora_run))


@pytest.mark.slow
@pytest.mark.parametrize("quant", [
    None,
    pytest.param("--load_in_4bit", marks=pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes not installed")),
    pytest.param("--load_in_8bit", marks=pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes not installed")),
])
def test_lora_and_qlora_resume_exactly_with_no_reference_model(quant, tiny_model_dir, data_dir, tmp_path,
                                                              monkeypatch):
    """Checkpoints hold the trainable weights only; a resumed run ends with the uninterrupted run's adapter,
    bit for bit. The reference is the (quantized) base with the adapter disabled: one model load, ln 2 at step 1.
    bitsandbytes runs on CPU (0.50: 4-bit NF4 and 8-bit kernels), so QLoRA is tested here for real."""
    extra = [quant] if quant else []
    calls = count_model_loads(monkeypatch)
    layers = []
    real_save = runs_module.save_final

    def save_final(accelerator, model, *args):
        layers.append(type(accelerator.unwrap_model(model).base_model.model.model.layers[0].mlp.up_proj.base_layer))
        return real_save(accelerator, model, *args)

    monkeypatch.setattr(runs_module, "save_final", save_final)
    full = tmp_path / "full"
    dpo_module.run_dpo(*configs(*lora_args(tiny_model_dir, data_dir, full, "--max_steps", "3", "--save_steps",
                                             "2", *extra)))
    assert len(calls) == 1
    expected = {None: "Linear", "--load_in_4bit": "Linear4bit", "--load_in_8bit": "Linear8bitLt"}[quant]
    assert layers[0].__name__ == expected
    assert read_scalars(full / "logs")["train/loss"][1] == pytest.approx(LN2, abs=1e-6)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    resumed = tmp_path / "resumed"
    dpo_module.run_dpo(*configs(*lora_args(tiny_model_dir, data_dir, resumed, "--max_steps", "3", *extra,
                                             "--resume_from_checkpoint",
                                             str(full / "checkpoints" / "checkpoint-2"))))
    assert set(read_scalars(resumed / "logs")["train/loss"]) == {3}
    a, b = load_file(full / "adapter_model.safetensors"), load_file(resumed / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_sync_ref_model_with_lora_is_refused(tiny_model_dir, data_dir, tmp_path):
    with pytest.raises(ValueError, match="--sync_ref_model with LoRA"):
        dpo_module.run_dpo(*configs(*lora_args(tiny_model_dir, data_dir, tmp_path / "x", "--max_steps", "1",
                                                 "--sync_ref_model")))


@pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes not installed")
def test_qlora_gradients_equal_the_dequantized_model_even_after_an_evaluation(tiny_model_dir):
    """Adapter gradients of the 4-bit model == those of the same model with every 4-bit layer replaced by a
    float layer holding its dequantized weight (1e-6), before and after an eval-mode forward (bitsandbytes'
    CPU repacking would corrupt them: see `keep_4bit_cpu_layout`)."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit

    from dpo_core.modeling import load_model_from_args

    model = load_model_from_args(ModelArguments(model_name_or_path=str(tiny_model_dir), use_lora=True, lora_r=4,
                                                lora_dropout=0.0, load_in_4bit=True))
    torch.manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.1)
    ids = torch.randint(0, 1000, (2, 8))

    def grads():
        model.zero_grad()
        model.train()
        model(input_ids=ids).logits.logsumexp(-1).mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    before = grads()
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    after = grads()
    quantized = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
                 if isinstance(child, bnb.nn.Linear4bit)]
    assert len(quantized) == 14
    for parent, name, child in quantized:
        weight = dequantize_4bit(child.weight.data, child.weight.quant_state).float()
        linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        linear.weight = torch.nn.Parameter(weight, requires_grad=False)
        setattr(parent, name, linear)
    expected = grads()
    assert before.keys() == after.keys() == expected.keys() and len(expected) == 28
    for key in expected:
        torch.testing.assert_close(before[key], expected[key], atol=1e-6, rtol=0)
        torch.testing.assert_close(after[key], expected[key], atol=1e-6, rtol=0)
