"""Tokenize once: the prepared-data store gives what `tokenize_records` gives, is reused when nothing changed,
is rebuilt when a byte, the tokenizer or a setting changed, and never uses a corrupt or half-written entry."""

import json
import logging

import numpy as np
import pytest

from dpo_core import data as D
from dpo_core import prepared as P
from dpo_core.sft_data import tokenize_sft_records

DEMO = D.load_splits("data/demo", split="train")["train"]
SETTINGS = D.TokenizeSettings(max_length=48)


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _records():
    """The demo pairs, two of them broken (a missing field, an empty completion): problems must survive reuse."""
    records = D.loaded(DEMO[:300])  # parsed: their data can be edited
    del records[5].data["rejected"]
    records[17].data["chosen"] = ""
    return records


def _as_lists(examples):
    return [(e.id, e.prompt_ids, e.chosen_ids, e.rejected_ids) for e in examples]


def test_example_arrays_round_trip_and_index(tmp_path):
    examples = [D.Example(7, [1, 2], [3], [4, 5, 6]), D.Example(2, [9], [8, 7], []), D.Example(4, [], [1], [2])]
    arrays = P.ExampleArrays.concatenate([P.ExampleArrays.from_examples(examples[:1]),
                                          P.ExampleArrays.from_examples(examples[1:])])
    assert _as_lists(arrays) == _as_lists(examples)
    writer = P._StreamWriter(tmp_path)  # the store's write path: parts appended, the .npy header written last
    writer.append(P.ExampleArrays.from_examples(examples[:1]))
    writer.append(P.ExampleArrays.from_examples(examples[1:]))
    digests = writer.close()
    assert set(digests) == set(P.FILES)
    loaded = P.ExampleArrays.load(tmp_path)
    assert isinstance(loaded.tokens, np.memmap) and loaded.tokens.dtype == np.int32
    assert _as_lists(loaded) == _as_lists(examples)
    assert _as_lists(loaded[1:]) == _as_lists(examples[1:]) and loaded[-1].id == 4
    with pytest.raises(IndexError):
        loaded[3]


@pytest.mark.parametrize("num_proc", [1, 2])
def test_store_equals_tokenize_records_and_is_reused(tok, tmp_path, monkeypatch, num_proc):
    monkeypatch.setattr(P, "POOL_MIN_RECORDS", 64)  # 300 records over a real pool of 2 workers, chunks of 50
    monkeypatch.setattr(P, "CHUNK", 50)
    records = _records()
    expected, expected_problems = D.tokenize_records(records, tok, SETTINGS)
    store = P.PreparedStore(tmp_path)
    got, problems = store.tokenize(records, tok, SETTINGS, D.tokenize_records, num_proc=num_proc, progress=False)
    assert _as_lists(got) == _as_lists(expected) and problems == expected_problems
    assert {p.location for p in problems} == {records[5].location, records[17].location}
    assert len(list(tmp_path.iterdir())) == 1

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized again although nothing changed")

    monkeypatch.setattr(P, "tokenize_parallel", no_tokenizing)
    again, again_problems = store.tokenize(records, tok, SETTINGS, D.tokenize_records, num_proc=num_proc, progress=False)
    assert isinstance(again.tokens, np.memmap)
    assert _as_lists(again) == _as_lists(expected) and again_problems == expected_problems


def test_a_changed_byte_a_setting_or_the_tokenize_function_is_another_entry(tok, tmp_path):
    store, records = P.PreparedStore(tmp_path), _records()
    key = store.key(records, tok, SETTINGS, D.tokenize_records)
    changed = _records()
    changed[100].data["chosen"] = changed[100].data["chosen"] + [{"role": "assistant", "content": "!"}] \
        if isinstance(changed[100].data["chosen"], list) else changed[100].data["chosen"] + "!"
    assert store.key(changed, tok, SETTINGS, D.tokenize_records) != key
    assert store.key(records[:-1], tok, SETTINGS, D.tokenize_records) != key  # another selection
    assert store.key(records, tok, D.TokenizeSettings(max_length=47), D.tokenize_records) != key
    assert store.key(records, tok, SETTINGS, tokenize_sft_records) != key
    other_template = tok.__class__.from_pretrained(tok.name_or_path)
    other_template.chat_template = (tok.chat_template or "") + " "
    assert store.key(records, other_template, SETTINGS, D.tokenize_records) != key
    assert store.key(_records(), tok, SETTINGS, D.tokenize_records) == key  # the same content: the same entry

    store.tokenize(records, tok, SETTINGS, D.tokenize_records, num_proc=1, progress=False)
    got, _ = store.tokenize(changed, tok, SETTINGS, D.tokenize_records, num_proc=1, progress=False)
    assert _as_lists(got) == _as_lists(D.tokenize_records(changed, tok, SETTINGS)[0])
    assert len(list(tmp_path.iterdir())) == 2


@pytest.mark.parametrize("damage", ["flip a token byte", "truncate the offsets", "no meta.json", "bad meta.json"])
def test_a_corrupt_or_half_written_entry_is_rebuilt_never_used(tok, tmp_path, damage, caplog):
    store, records = P.PreparedStore(tmp_path), _records()
    expected, _ = store.tokenize(records, tok, SETTINGS, D.tokenize_records, num_proc=1, progress=False)
    expected = _as_lists(expected)
    folder = tmp_path / store.key(records, tok, SETTINGS, D.tokenize_records)
    if damage == "flip a token byte":
        data = bytearray((folder / "tokens.npy").read_bytes())
        data[-3] ^= 0x40
        (folder / "tokens.npy").write_bytes(bytes(data))
    elif damage == "truncate the offsets":
        path = folder / "offsets.npy"
        path.write_bytes(path.read_bytes()[:-8])
    elif damage == "no meta.json":
        (folder / "meta.json").unlink()
    else:
        (folder / "meta.json").write_text('{"format": 1, "sha256": {')
    with caplog.at_level(logging.WARNING, logger="dpo_core.prepared"):
        got, _ = store.tokenize(records, tok, SETTINGS, D.tokenize_records, num_proc=1, progress=False)
    assert _as_lists(got) == expected
    assert "unusable" in caplog.text and str(folder) in caplog.text
    assert json.loads((folder / "meta.json").read_text())["num_examples"] == len(expected)


def test_leftover_temporary_folders_are_never_read(tok, tmp_path):
    store, records = P.PreparedStore(tmp_path), _records()
    key = store.key(records, tok, SETTINGS, D.tokenize_records)
    (tmp_path / f".{key[:16]}.crashed").mkdir(parents=True)  # a writer killed before its rename
    got, _ = store.tokenize(records, tok, SETTINGS, D.tokenize_records, num_proc=1, progress=False)
    assert _as_lists(got) == _as_lists(D.tokenize_records(records, tok, SETTINGS)[0])
    assert (tmp_path / key / "meta.json").exists()


def test_prepare_examples_reports_bad_records_from_the_store_too(tok, tmp_path):
    """The second stage reads the store and still names the file, line and field of a bad record."""
    path = tmp_path / "pairs.jsonl"
    rows = [r.data for r in DEMO[:20]]
    rows[3] = {"prompt": "Hi", "chosen": "Hello"}
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for _ in range(2):
        with pytest.raises(D.DataValidationError, match=rf"{path}, line 4, field 'rejected'"):
            D.prepare_examples(str(path), tok, SETTINGS, cache_dir=tmp_path / "store", progress=False)
    _, examples = D.prepare_examples(str(path), tok, SETTINGS, cache_dir=tmp_path / "store", on_invalid="skip",
                                     report_path=tmp_path / "bad.jsonl", progress=False)
    assert len(examples["train"]) == 19 and 3 not in [e.id for e in examples["train"]]
    assert len(list((tmp_path / "store").iterdir())) == 1


def test_data_cache_dir_flag(tmp_path, monkeypatch):
    from dpo_core.config import DataArguments

    monkeypatch.setenv("DPO_CORE_CACHE", str(tmp_path / "env"))
    assert DataArguments().cache_location() == "default"
    assert P.PreparedStore.default().root == tmp_path / "env"
    assert DataArguments(data_cache_dir="none").cache_location() is None
    assert DataArguments(data_cache_dir=str(tmp_path)).cache_location() == str(tmp_path)
    with pytest.raises(Exception, match="dataset_num_proc"):
        DataArguments(dataset_num_proc=0)


def test_tokens_fingerprint_of_mapped_arrays_equals_the_per_example_loop():
    """The reference cache's fingerprint of prepared arrays (vectorized, in blocks of 8192 pairs) is the hash of
    the very bytes the per-example loop hashes: a cache built from lists is valid for the store and back."""
    import random

    from dpo_core.ref_cache import tokens_fingerprint

    rng = random.Random(0)

    def ids():
        return [rng.randrange(50_000) for _ in range(rng.randrange(0, 9))]

    examples = [D.Example(rng.randrange(10**6), ids(), ids(), ids()) for _ in range(20_000)]
    arrays = P.ExampleArrays.from_examples(examples)
    assert tokens_fingerprint(arrays) == tokens_fingerprint(examples)
    examples[12_345].chosen_ids.append(7)
    assert tokens_fingerprint(P.ExampleArrays.from_examples(examples)) != tokens_fingerprint(arrays)


def test_no_valid_record_is_an_empty_entry_that_keeps_every_problem(tok, tmp_path):
    records = [D.Record(i, "mem", f"row {i}", {"prompt": "Hi", "chosen": "Hello"}) for i in range(3)]
    store = P.PreparedStore(tmp_path)
    for _ in range(2):  # built, then read
        examples, problems = store.tokenize(records, tok, SETTINGS, D.tokenize_records, num_proc=1, progress=False)
        assert len(examples) == 0 and [(p.location, p.field) for p in problems] == \
            [(f"row {i}", "rejected") for i in range(3)]


def test_the_tokenizing_modules_import_without_torch():
    """What a spawned worker imports (the tokenize functions' modules, the store, the settings): no torch, no
    transformers, so each worker holds the tokenizer and not a copy of the trainer's libraries."""
    import subprocess
    import sys

    code = ("import sys; import dpo_core.data, dpo_core.sft_data, dpo_core.kto_data, dpo_core.prepared; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"


def test_workers_start_fresh_unless_the_function_lives_in_a_script_or_a_function(tok):
    from dpo_core.kto_data import KTOTokenize

    assert P._start_method(tok, SETTINGS, D.tokenize_records) == "spawn"
    assert P._start_method(tok, SETTINGS, tokenize_sft_records) == "spawn"
    assert P._start_method(tok, SETTINGS, KTOTokenize(4).for_split(_records())) == "spawn"

    def local(records, tokenizer, settings):
        return D.tokenize_records(records, tokenizer, settings)

    assert P._start_method(tok, SETTINGS, local) == "fork"
    assert P._start_method(tok, SETTINGS, lambda *a: None) == "fork"

    class RemoteCode(type(tok)):  # a tokenizer class of a model's own code: a fresh process may not find it
        pass

    RemoteCode.__module__ = "transformers_modules.org.model.tokenization"
    assert P._start_method(RemoteCode.from_pretrained(tok.name_or_path), SETTINGS, D.tokenize_records) == "fork"


def test_a_script_level_tokenize_function_runs_in_forked_workers(tok, monkeypatch):
    monkeypatch.setattr(P, "POOL_MIN_RECORDS", 64)
    monkeypatch.setattr(P, "CHUNK", 50)
    records, seen = _records(), []

    def local(records, tokenizer, settings):  # not importable by a fresh process: the workers are forked
        import os

        seen.append(os.getpid())  # in a worker's copy of this list: the parent's stays empty
        return D.tokenize_records(records, tokenizer, settings)

    got, problems = P.tokenize_parallel(records, tok, SETTINGS, local, num_proc=2, progress=False)
    expected, expected_problems = D.tokenize_records(records, tok, SETTINGS)
    assert _as_lists(got) == _as_lists(expected) and problems == expected_problems and seen == []


def test_a_worker_that_dies_fails_the_preparation_instead_of_hanging(tok, monkeypatch):
    import signal
    from concurrent.futures.process import BrokenProcessPool

    monkeypatch.setattr(P, "POOL_MIN_RECORDS", 64)
    monkeypatch.setattr(P, "CHUNK", 50)

    def dies(records, tokenizer, settings):
        import os

        os._exit(3)

    def too_long(*args):
        raise TimeoutError("the pool hung after a worker died")

    previous = signal.signal(signal.SIGALRM, too_long)
    signal.alarm(120)
    try:
        with pytest.raises(BrokenProcessPool):
            P.tokenize_parallel(_records(), tok, SETTINGS, dies, num_proc=2, progress=False)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


PROBE = """
import os, sys
with open(sys.argv[1], "a") as f:  # one line per process that runs this file
    f.write(f"{os.getpid()}\\n")
if __name__ == "__main__":
    from transformers import AutoTokenizer
    from dpo_core import data as D, prepared as P
    P.POOL_MIN_RECORDS, P.CHUNK = 64, 50
    tok = AutoTokenizer.from_pretrained(sys.argv[2])
    records = D.load_splits(sys.argv[3], split="train")["train"][:300]
    settings = D.TokenizeSettings(max_length=48)
    got, _ = P.tokenize_parallel(records, tok, settings, D.tokenize_records, num_proc=2, progress=False)
    expected, _ = D.tokenize_records(records, tok, settings)
    assert [(e.id, e.prompt_ids, e.chosen_ids, e.rejected_ids) for e in got] == \\
        [(e.id, e.prompt_ids, e.chosen_ids, e.rejected_ids) for e in expected]
    assert sys.modules["__main__"].__spec__ is None  # put back after the workers started
    print("equal")
"""


def test_spawned_workers_do_not_run_the_script_that_started_them(tiny_model_dir, tmp_path):
    import subprocess
    import sys

    from tests.helpers import ROOT

    script, marker = tmp_path / "probe.py", tmp_path / "imports.txt"
    script.write_text(PROBE)
    out = subprocess.run([sys.executable, str(script), str(marker), str(tiny_model_dir), str(ROOT / "data" / "demo")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "equal", out.stderr[-3000:]
    assert len(marker.read_text().split()) == 1  # the parent only: the 2 workers never imported the script
