"""Dataset mixtures: several sources in one --dataset_name (or a YAML dataset_mixture block), each a seeded
selection by fraction or count, every record keeping its file and line, the same in every script."""

import json

import pytest
import yaml
from helpers import run_main, small_dataset

from dpo_core import data as D
from dpo_core.config import DataArguments
from dpo_core.config.parsing import parse_config
from dpo_core.errors import ConfigError
from dpo_core.records import Source, dataset_fingerprint, load_splits, mixture_spec, parse_sources


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _rows(n, tag):
    return [{"prompt": f"{tag} question {i}?", "chosen": f"{tag} good {i}", "rejected": f"{tag} bad {i}"}
            for i in range(n)]


@pytest.fixture
def two_files(tmp_path):
    return _write(tmp_path / "a.jsonl", _rows(40, "a")), _write(tmp_path / "b.jsonl", _rows(30, "b"))


def test_parse_sources():
    assert parse_sources("data/a.jsonl:0.5 org/set:train:2000 data/demo org/x:test ./c.jsonl:1.0") == [
        Source("data/a.jsonl", None, 0.5), Source("org/set", "train", 2000), Source("data/demo"),
        Source("org/x", "test"), Source("./c.jsonl", None, 1.0)]
    for bad, words in (("a.jsonl:0.0", "fraction"), ("a.jsonl:1.5", "fraction"), ("a.jsonl:0", "count")):
        with pytest.raises(ConfigError, match=words):
            parse_sources(bad)


def test_each_source_gives_its_share_seeded_in_file_order_with_unique_ids(two_files):
    a, b = two_files
    train = load_splits(f"{a}:0.25 {b}:12", seed=3)["train"]
    from_a = [r for r in train if r.source == str(a)]
    from_b = [r for r in train if r.source == str(b)]
    assert len(from_a) == 10 and len(from_b) == 12 and train == from_a + from_b
    assert [r.id for r in train] == list(range(22))
    lines = [int(r.location.split()[1]) for r in from_a]
    assert lines == sorted(lines) and all(r.data["prompt"] == f"a question {n - 1}?" for r, n in zip(from_a, lines))
    assert train == load_splits(f"{a}:0.25 {b}:12", seed=3)["train"]
    other = load_splits(f"{a}:0.25 {b}:12", seed=4)["train"]
    assert [r.location for r in other] != [r.location for r in train]
    # a carve-out and a limit apply to the mixture as a whole
    splits = load_splits(f"{a}:0.25 {b}:12", seed=3, eval_fraction=0.5, max_train_samples=5)
    assert len(splits["eval"]) == 11 and len(splits["train"]) == 5


def test_a_count_above_the_source_and_a_split_of_a_file_are_errors(two_files):
    a, b = two_files
    with pytest.raises(ConfigError, match=rf"asks for 31 records, {b} has 30"):
        load_splits(f"{a} {b}:31")
    with pytest.raises(ConfigError, match="single file"):
        load_splits(f"{a}:train {b}")


def test_folder_sources_take_their_split_and_the_eval_split(tmp_path):
    one = small_dataset(tmp_path / "one", n_train=20, n_test=6)
    two = small_dataset(tmp_path / "two", n_train=10, n_test=4)
    splits = load_splits(f"{one}:0.5 {two}", eval_split="test")
    assert len(splits["train"]) == 20 and len(splits["eval"]) == 10
    assert {r.source for r in splits["eval"]} == {str(one / "test.jsonl"), str(two / "test.jsonl")}
    assert len(load_splits(f"{one}:test {two}:test:2")["train"]) == 8


def test_a_bad_record_is_named_by_its_own_source(tmp_path, two_files, tiny_model_dir):
    from transformers import AutoTokenizer

    a, _ = two_files
    rows = _rows(8, "c")
    rows[5]["chosen"] = None
    c = _write(tmp_path / "c.jsonl", rows)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    with pytest.raises(D.DataValidationError, match=rf"{c}, line 6, field 'chosen'"):
        D.prepare_examples(f"{a}:5 {c}", tok, D.TokenizeSettings(max_length=64))


def test_the_mixture_is_in_the_fingerprint(two_files):
    a, b = two_files
    fp = dataset_fingerprint(load_splits(f"{a}:0.5 {b}")["train"])
    assert fp != dataset_fingerprint(load_splits(f"{a}:0.6 {b}")["train"])
    assert fp != dataset_fingerprint(load_splits(f"{b} {a}:0.5")["train"])
    assert fp == dataset_fingerprint(load_splits(f"{a}:0.5 {b}")["train"])


def test_yaml_block_and_command_line_give_the_same_mixture(tmp_path, two_files):
    a, b = two_files
    config = tmp_path / "mix.yaml"
    config.write_text(yaml.safe_dump({"dataset_mixture": {"datasets": [
        {"id": str(a), "weight": 0.5}, {"id": str(b), "count": 12}]}}))
    (from_yaml,) = parse_config((DataArguments,), ["--config", str(config)])
    (from_cli,) = parse_config((DataArguments,), ["--dataset_name", f"{a}:0.5", f"{b}:12"])
    assert from_yaml.dataset_name == from_cli.dataset_name == f"{a}:0.5 {b}:12"
    with pytest.raises(ConfigError, match="not both"):
        parse_config((DataArguments,), ["--config", str(config), "--dataset_name", str(a)])
    with pytest.raises(ConfigError, match="weight or count"):
        mixture_spec({"datasets": [{"id": "x", "weight": 0.5, "count": 3}]})
    with pytest.raises(ConfigError, match=r"datasets\[0\]: unknown keys \['columns'\]"):
        mixture_spec({"datasets": [{"id": "x", "columns": ["a"]}]})
    with pytest.raises(ConfigError, match="fraction"):
        DataArguments(dataset_name=f"{a}:2.5")


@pytest.mark.slow
def test_precompute_and_dpo_read_the_same_mixture(tmp_path, tiny_model_dir, capsys, fresh_accelerate_state):
    """The reference cache of a mixture is accepted by DPO on the same mixture (same records, same ids) and
    refused for another mixture."""
    data = small_dataset(tmp_path / "demo", n_train=24, n_test=8)
    mix = [f"{data}:0.5", f"{data / 'test.jsonl'}:6"]
    common = ["--model_name_or_path", str(tiny_model_dir), "--max_length", "64", "--dataset_name", *mix]
    code, _, err = run_main("precompute_ref_logprobs.py", [*common, "--output_dir", str(tmp_path / "cache")], capsys)
    assert code == 0, err[-3000:]
    assert json.loads((tmp_path / "cache" / "manifest.json").read_text())["splits"]["train"]["num_examples"] == 18
    code, _, err = run_main("dpo.py", [*common, "--ref_logprobs", str(tmp_path / "cache"), "--output_dir",
                                       str(tmp_path / "run"), "--max_steps", "2", "--per_device_train_batch_size", "4",
                                       "--report_to", "none"], capsys)
    assert code == 0, err[-3000:]
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["dataset_name"] == " ".join(mix)
    other = ["--model_name_or_path", str(tiny_model_dir), "--max_length", "64", "--dataset_name", f"{data}:0.5",
             f"{data / 'test.jsonl'}:5"]
    code, _, err = run_main("dpo.py", [*other, "--ref_logprobs", str(tmp_path / "cache"), "--output_dir",
                                       str(tmp_path / "run2"), "--max_steps", "1", "--report_to", "none"], capsys)
    assert code == 1 and "error:" in err and "dataset/train" in err and "Traceback" not in err
