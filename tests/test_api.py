"""The Python API: lazy package exports, the flat configs, the scripts as thin wrappers over `train_dpo` /
`train_sft`, and the README's example run as written."""

import importlib.util
import json
import re
import subprocess
import sys
from dataclasses import fields

import pytest
import yaml
from helpers import ROOT, subprocess_env

import dpo_core
from dpo_core.config import DPOArguments, DPOConfig, SFTConfig, parse_config, save_config

OPTIONAL = {"generate": "dpo_core.generation", "build_identity_shift_dataset": "dpo_core.identity"}


def test_import_is_light_and_every_export_resolves():
    code = "import sys, dpo_core; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, env=subprocess_env())
    for name in dpo_core.__all__:
        if name in OPTIONAL and importlib.util.find_spec(OPTIONAL[name]) is None:
            continue  # that module is not part of this checkout
        assert callable(getattr(dpo_core, name)), name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        dpo_core.nope  # noqa: B018


def test_flat_configs_hold_every_group_and_run_every_groups_checks():
    for flat, groups in ((DPOConfig, ("ModelArguments", "DataArguments", "DPOArguments", "TrainArguments")),
                         (SFTConfig, ("ModelArguments", "DataArguments", "TrainArguments"))):
        names = {f.name for f in fields(flat)}
        for group in groups:
            assert {f.name for f in fields(getattr(sys.modules["dpo_core.config"], group))} <= names, group
        for f in fields(flat):
            assert len(f.metadata.get("help", "")) > 5, f"{flat.__name__}.{f.name} has no help"
    assert "beta" not in {f.name for f in fields(SFTConfig)}
    assert SFTConfig().learning_rate == 2e-5 and DPOConfig().learning_rate == 1e-6
    for kwargs, message in (({"torch_dtype": "int3"}, "--torch_dtype"), ({"truncation_mode": "middle"},
                            "--truncation_mode"), ({"report_to": "tensorbord"}, "--report_to")):
        for flat in (DPOConfig, SFTConfig):  # model, data and train checks all run
            with pytest.raises(ValueError, match=message):
                flat(**kwargs)
    with pytest.raises(ValueError, match="--beta"):
        DPOConfig(beta=0)
    assert DPOConfig(loss_type="ipo").loss_type == ["ipo"]  # DPOArguments' normalisation runs too


def load_script(name):
    spec = importlib.util.spec_from_file_location(f"script_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name,flat,train", [("dpo", DPOConfig, "train_dpo"), ("sft", SFTConfig, "train_sft")])
def test_scripts_pass_yaml_plus_flags_to_the_api(name, flat, train, tmp_path, monkeypatch):
    """Both scripts read the quick-start DPO recipe (sft.py ignores its DPO keys), let flags override it,
    refuse unknown keys, and hand one flat config to the API function."""
    script, seen = load_script(name), []
    monkeypatch.setattr(script, train, seen.append)
    script.main(["--config", str(ROOT / "recipes" / "quickstart.yaml"), "--output_dir", "o", "--max_steps", "7"])
    (config,) = seen
    recipe = yaml.safe_load((ROOT / "recipes" / "quickstart.yaml").read_text())
    assert type(config) is flat and config.max_steps == 7 and config.output_dir == "o"
    assert config.learning_rate == recipe["learning_rate"] and config.dataset_name == recipe["dataset_name"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rat: 0.1\n")
    with pytest.raises(ValueError, match=r"unknown keys \['learning_rat'\]"):
        script.main(["--config", str(bad)])


def test_flat_config_round_trips_through_its_config_yaml(tmp_path):
    first = parse_config((DPOConfig,), ["--model_name_or_path", "m", "--output_dir", "o", "--beta", "0.25",
                                        "--loss_type", "sigmoid", "sft", "--loss_weights", "1", "0.2"])
    save_config(tmp_path / "config.yaml", *first)
    assert parse_config((DPOConfig,), ["--config", str(tmp_path / "config.yaml")]) == first
    # The SFT recipe is a valid sft.py config, and a DPO run's resolved config feeds sft.py too.
    (sft,) = parse_config((SFTConfig,), ["--config", str(ROOT / "recipes" / "sft_quickstart.yaml")])
    assert sft.max_steps > 0 and sft.eval_split == "test"
    parse_config((SFTConfig,), ["--config", str(tmp_path / "config.yaml")], yaml_ignore=(DPOArguments,))


def readme_example() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Python API"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_readme_python_api_example_runs_and_sft_then_dpo_learn(tmp_path):
    """The README's example as written (from a directory holding data/): SFT lowers the held-out loss and
    raises the chosen log-prob; DPO starts from the SFT output, whose held-out chosen log-probs it
    measures exactly as SFT did (the same token ids), and lifts preference accuracy from ties."""
    (tmp_path / "data").symlink_to(ROOT / "data")
    proc = subprocess.run([sys.executable, "-c", readme_example()], cwd=tmp_path, env=subprocess_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "held-out perplexity" in proc.stdout and "held-out preference accuracy" in proc.stdout
    sft = json.loads((tmp_path / "runs/api/sft/train_results.json").read_text())
    dpo = json.loads((tmp_path / "runs/api/dpo/train_results.json").read_text())
    assert sft["eval_loss"] < 0.75 * sft["eval_start_loss"], sft
    assert sft["eval_logps/completion"] > sft["eval_start_logps/completion"] + 10
    assert dpo["eval_start_logps/chosen"] == pytest.approx(sft["eval_logps/completion"], abs=1e-4)
    assert dpo["eval_start_rewards/ties"] == 1.0
    assert dpo["eval_rewards/accuracies"] > 0.6, dpo
    assert (tmp_path / "runs/api/dpo/model.safetensors").exists()
