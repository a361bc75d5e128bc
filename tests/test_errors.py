"""Typed errors: a user error is one line `error: ...` (exit 1); a bug keeps its whole traceback."""

import subprocess
import sys
import textwrap

import pytest
from helpers import ROOT, run_main, run_script, subprocess_env

from dpo_core import errors
from dpo_core.cli import run_cli


def test_every_user_error_kind_is_a_user_error_and_the_builtin_callers_catch():
    kinds = {errors.ConfigError: ValueError, errors.DataError: ValueError, errors.RefCacheError: ValueError,
             errors.OutputExistsError: FileExistsError, errors.MissingError: FileNotFoundError,
             errors.NonFiniteError: RuntimeError}
    for kind, builtin in kinds.items():
        assert issubclass(kind, errors.UserError) and issubclass(kind, builtin), kind
    from dpo_core.records import DataValidationError

    assert issubclass(DataValidationError, errors.DataError)
    assert not issubclass(errors.TrainingPreempted, errors.UserError)


def test_run_cli_prints_a_user_error_on_one_line_and_exits_1(capsys):
    def main(argv):
        raise errors.DataError("data/x.jsonl line 3: field 'chosen' is null")

    with pytest.raises(SystemExit) as stop:
        run_cli(main)
    assert stop.value.code == 1
    assert capsys.readouterr().err == "error: data/x.jsonl line 3: field 'chosen' is null\n"


@pytest.mark.parametrize("bug", [ValueError, RuntimeError, KeyError, FileNotFoundError])
def test_run_cli_lets_any_other_exception_through_with_its_traceback(bug):
    def main(argv):
        raise bug("a bug, not bad input")

    with pytest.raises(bug, match="a bug"):
        run_cli(main)


@pytest.mark.slow
def test_a_value_error_inside_the_model_forward_keeps_its_traceback(tiny_model_dir, tmp_path):
    """A ValueError raised inside a (patched) model forward during `scripts/dpo.py` is a bug: the script must
    print its full traceback, naming the function it came from, not one `error:` line."""
    code = textwrap.dedent(f"""
        import sys, runpy
        from transformers.models.llama import modeling_llama

        def broken_forward(self, *args, **kwargs):
            raise ValueError("shape mismatch deep inside the model")

        modeling_llama.LlamaModel.forward = broken_forward
        sys.argv = ["dpo.py", "--model_name_or_path", {str(tiny_model_dir)!r}, "--dataset_name",
                    {str(ROOT / "data" / "demo")!r}, "--output_dir", {str(tmp_path / "run")!r}, "--max_steps", "1",
                    "--per_device_train_batch_size", "2", "--max_length", "64", "--report_to", "none"]
        runpy.run_path({str(ROOT / "scripts" / "dpo.py")!r}, run_name="__main__")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env(),
                          timeout=300)
    assert proc.returncode != 0
    assert "Traceback (most recent call last)" in proc.stderr
    assert "broken_forward" in proc.stderr and "ValueError: shape mismatch deep inside the model" in proc.stderr
    assert "error: shape mismatch" not in proc.stderr


@pytest.mark.parametrize("path", ["runs/no-such-model", "./no-such-model", "/tmp/nowhere/model", "bad name!"])
def test_a_missing_model_directory_is_named_in_our_words(tmp_path, path, capsys, fresh_accelerate_state):
    code, _, err = run_main("dpo.py", ["--model_name_or_path", path, "--dataset_name", str(ROOT / "data" / "demo"),
                                       "--output_dir", str(tmp_path / "run"), "--max_steps", "1",
                                       "--report_to", "none"], capsys)
    assert code == 1, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"error: {path}: no such model directory"), last
    assert "Traceback" not in err and "Repo id must" not in err


@pytest.mark.slow
def test_bad_flags_are_one_line_errors_naming_the_flag(tmp_path, capsys):
    # The script itself, in a new interpreter: the exit code and the last line a user sees.
    proc = run_script("dpo.py", ["--model_name_or_path", "x", "--output_dir", str(tmp_path), "--beta", "-1"],
                      check=False, timeout=300)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1] == "error: --beta must be > 0, got -1.0"
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("beta: [unclosed\n")
    code, _, err = run_main("dpo.py", ["--config", str(bad_yaml)], capsys)
    assert code == 1 and err.strip().splitlines()[-1].startswith(f"error: {bad_yaml}: not valid YAML")
    code, _, err = run_main("dpo.py", ["--config", str(tmp_path / "missing.yaml")], capsys)
    assert code == 1 and "no such file" in err.strip().splitlines()[-1]
