"""dpo_core/model_card.py: the README.md model card of every final save, read back with
`huggingface_hub.ModelCard.load`: front matter, body, loading instructions, no secrets."""

import json

import pytest
from helpers import small_dataset
from huggingface_hub import ModelCard

import dpo_core.dpo as dpo_module
from dpo_core.config import DataArguments, DPOArguments, ModelArguments, TrainArguments, parse_config
from dpo_core.model_card import redact_argv, write_model_card

SECRET = "hf_secretCARDtoken9876543210"
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _fresh_state(fresh_accelerate_state):
    """In-process runs one after another: each starts from a fresh accelerate state (tests/conftest.py)."""


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return small_dataset(tmp_path_factory.mktemp("data"), n_train=16, n_test=8)


@pytest.fixture(scope="module")
def licensed_model(tiny_model_dir, tmp_path_factory):
    """The tiny model with a README.md whose front matter says `license: apache-2.0`."""
    import shutil

    folder = tmp_path_factory.mktemp("licensed") / "model"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny\n")
    return folder


def configs(model, data, out, *extra):
    return parse_config((ModelArguments, DataArguments, DPOArguments, TrainArguments),
                        ["--model_name_or_path", str(model), "--dataset_name", str(data), "--output_dir", str(out),
                         "--max_length", "64", "--learning_rate", "1e-3", "--logging_steps", "1",
                         "--per_device_train_batch_size", "4", "--max_steps", "2", *extra])


def test_a_dpo_run_writes_a_card_the_hub_reads(licensed_model, data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    out = tmp_path / "run"
    dpo_module.run_dpo(*configs(licensed_model, data_dir, out, "--eval_split", "test", "--loss_type", "sigmoid",
                                "sft", "--loss_weights", "1.0", "0.1"))
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == str(licensed_model)
    assert card.data.library_name == "transformers"
    assert card.data.tags == ["dpo", "dpo_core", "sigmoid", "sft"]
    assert card.data.license == "apache-2.0"
    assert card.data.datasets is None  # a local folder is no hub dataset
    metrics = json.loads((out / "train_results.json").read_text())
    assert f"| eval_rewards/accuracies | {metrics['eval_rewards/accuracies']:.6g} |" in card.text
    assert "AutoModelForCausalLM.from_pretrained(" in card.text and "loss_type:\n- sigmoid\n- sft" in card.text
    assert "![training curves](training_curves.png)" in card.text and (out / "training_curves.png").stat().st_size
    assert SECRET not in (out / "README.md").read_text()


def test_a_lora_run_says_peft_and_how_to_load_the_adapter(tiny_model_dir, data_dir, tmp_path):
    out = tmp_path / "lora"
    dpo_module.run_dpo(*configs(tiny_model_dir, data_dir, out, "--use_lora", "--lora_r", "4", "--report_to",
                                "none"))
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "peft" and card.data.base_model == str(tiny_model_dir)
    assert card.data.license is None
    assert "AutoPeftModelForCausalLM.from_pretrained(" in card.text and "PeftModel.from_pretrained" in card.text
    assert "training_curves.png" not in card.text  # --report_to none: no curves to plot


def test_hub_dataset_license_from_config_and_no_secret(tiny_model_dir, tmp_path, monkeypatch):
    """A hub dataset name goes into `datasets`; a license from the base's config.json; a config field whose
    name says token is redacted, and so is a secret-looking flag of the command line."""
    from dataclasses import dataclass

    monkeypatch.setenv("HF_TOKEN", SECRET)

    @dataclass
    class Extra:
        hub_token: str = SECRET

    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"license": "mit"}))
    out = tmp_path / "out"
    out.mkdir()
    model_args = ModelArguments(model_name_or_path=str(base))
    data_args = DataArguments(dataset_name="trl-lib/ultrafeedback_binarized")
    path = write_model_card(out, configs=(model_args, data_args, DPOArguments(), Extra()), metrics={"loss": 0.5},
                            argv=["scripts/dpo.py", "--hub_token", SECRET, f"--api_key={SECRET}", "--beta", "0.1"])
    card = ModelCard.load(path)
    assert card.data.datasets == ["trl-lib/ultrafeedback_binarized"] and card.data.license == "mit"
    text = path.read_text()
    assert SECRET not in text and "hub_token: <redacted>" in text
    assert "--hub_token '<redacted>' '--api_key=<redacted>' --beta 0.1" in text
    assert redact_argv(["--beta", "0.1"]) == ["--beta", "0.1"]


def test_an_sft_run_card(tiny_model_dir, data_dir, tmp_path):
    from dpo_core.config import SFTConfig
    from dpo_core.sft import train_sft

    out = tmp_path / "sft"
    train_sft(SFTConfig(model_name_or_path=str(tiny_model_dir), dataset_name=str(data_dir), output_dir=str(out),
                        max_length=64, max_steps=2, per_device_train_batch_size=4, report_to=["none"]))
    card = ModelCard.load(out / "README.md")
    assert card.data.tags == ["sft", "dpo_core"] and card.data.library_name == "transformers"
    assert "supervised fine-tuning" in card.text
