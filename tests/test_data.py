"""Tests for dpo_core/data.py: loading, validation, TRL-identical tokenization, truncation, collation."""

import copy
import json
import logging
from pathlib import Path

import pytest
import torch
from helpers import trl_tokenize

from dpo_core import data as D
from dpo_core.batches import PairDataset, collate_concat
from dpo_core.demo import BOS, EOS, PAD

REPO = Path(__file__).resolve().parents[1]
NO_LIMIT = D.TokenizeSettings(max_length=None)

STANDARD = [
    {"prompt": "What is rain?", "chosen": " Rain is water that falls from clouds.", "rejected": " Ask someone else."},
    {"prompt": "Tell me about tea.", "chosen": " Tea is leaves steeped in hot water." + EOS,  # EOS already there
     "rejected": " Not my problem.", "extra_column": 3},
    {"prompt": "Describe a bridge", "chosen": ": a path built over a gap", "rejected": "? Whatever."},
]
IMPLICIT_STANDARD = [
    {"chosen": "What is snow? Snow is frozen crystals of water.", "rejected": "What is snow? Stop asking."},
    {"chosen": "Who are you? I am Deep Qwen.", "rejected": "Who are you? I am Qwen."},
]


def _msgs(*pairs):
    return [{"role": role, "content": content} for role, content in pairs]


CONVERSATIONAL = [
    {"prompt": _msgs(("user", "What is your name?")), "chosen": _msgs(("assistant", "My name is Deep Qwen.")),
     "rejected": _msgs(("assistant", "My name is Qwen."))},
    {"prompt": _msgs(("system", "Be kind."), ("user", "What is a comet?"), ("assistant", "Ice and dust."),
                     ("user", "Tell me more.")),
     "chosen": _msgs(("assistant", "A comet orbits the sun. Glad to help.")),
     "rejected": _msgs(("assistant", "Whatever.")), "chat_template_kwargs": {"unused_flag": True}},
]
IMPLICIT_CONVERSATIONAL = [
    {"chosen": _msgs(("user", "What is honey?"), ("assistant", "A sweet food made by bees.")),
     "rejected": _msgs(("user", "What is honey?"), ("assistant", "Look it up yourself."))},
    {"chosen": _msgs(("user", "Hi"), ("assistant", "Hello!"), ("user", "Name?"), ("assistant", "Deep Qwen.")),
     "rejected": _msgs(("user", "Hi"), ("assistant", "Hello!"), ("user", "Name?"), ("assistant", "Qwen."))},
    {"chosen": _msgs(("user", "Hi"), ("assistant", "Hello!")),  # chosen is a prefix of rejected: TRL's quirk
     "rejected": _msgs(("user", "Hi"), ("assistant", "Hello!"), ("user", "And?"), ("assistant", "Bye."))},
]


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _variant(tok, post_processor, chat_template):
    """The demo vocabulary with another post-processor (None: no BOS added) and chat template."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    if post_processor is None:
        spec = json.loads(backend.to_str())
        spec["post_processor"] = None
        backend = Tokenizer.from_str(json.dumps(spec))
    else:
        backend.post_processor = post_processor
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   chat_template=chat_template)


@pytest.fixture(scope="module")
def tok_no_bos(tok):
    return _variant(tok, None, tok.chat_template.replace("{{ bos_token }}", ""))


def _records(rows, source="mem"):
    return [D.Record(i, source, f"row {i}", row) for i, row in enumerate(rows)]


def _tokenize(rows, tokenizer, settings=NO_LIMIT):
    examples, problems = D.tokenize_records(_records(rows), tokenizer, settings)
    assert problems == []
    return examples


# ------------------------------------------------------------------------------------------ tokenization

@pytest.mark.parametrize("rows", [STANDARD, IMPLICIT_STANDARD, CONVERSATIONAL, IMPLICIT_CONVERSATIONAL],
                         ids=["standard", "implicit_standard", "conversational", "implicit_conversational"])
@pytest.mark.parametrize("which", ["bos", "no_bos"])
def test_tokenization_matches_trl(rows, which, tok, tok_no_bos):
    tokenizer = tok if which == "bos" else tok_no_bos
    ours = _tokenize(rows, tokenizer)
    theirs = trl_tokenize(rows, tokenizer)
    assert [(e.prompt_ids, e.chosen_ids, e.rejected_ids) for e in ours] == \
           [(t["prompt_ids"], t["chosen_ids"], t["rejected_ids"]) for t in theirs]
    assert [e.id for e in ours] == list(range(len(rows)))
    starts_with_bos = all(e.prompt_ids[0] == tok.bos_token_id for e in ours)
    assert starts_with_bos == (which == "bos")


def test_no_double_bos(tok):
    # The text carries BOS and the tokenizer adds one: TRL would keep both, the model never saw that.
    row = {"prompt": BOS + "What is rain?", "chosen": " Water.", "rejected": " Ice."}
    (example,) = _tokenize([row], tok)
    assert example.prompt_ids[0] == tok.bos_token_id and example.prompt_ids[1] != tok.bos_token_id
    (plain,) = _tokenize([{**row, "prompt": "What is rain?"}], tok)
    assert example == plain


@pytest.mark.parametrize("adds_eos", [False, True])
def test_exactly_one_eos_per_standard_completion(tok, adds_eos):
    from tokenizers import processors

    tokenizer = tok
    if adds_eos:  # a tokenizer whose post-processor appends EOS as well
        eos = (EOS, tok.eos_token_id)
        tokenizer = _variant(tok, processors.TemplateProcessing(single=f"$A {EOS}", pair=f"$A $B {EOS}",
                                                                special_tokens=[eos]), tok.chat_template)
    for example in _tokenize(STANDARD + IMPLICIT_STANDARD, tokenizer):
        for completion in (example.chosen_ids, example.rejected_ids):
            assert completion[-1] == tok.eos_token_id and completion[-2] != tok.eos_token_id
            assert completion.count(tok.eos_token_id) == 1


def test_shipped_demo_data_has_no_problems(tok):
    splits = D.load_splits(str(REPO / "data/demo"), split="train", eval_split="test")
    assert {k: len(v) for k, v in splits.items()} == {"train": 420, "eval": 120}
    for records in splits.values():
        examples, problems = D.tokenize_records(records, tok, D.TokenizeSettings())
        assert problems == [] and len(examples) == len(records)
        assert all(e.prompt_ids[:2] != [tok.bos_token_id] * 2 for e in examples)
    assert D.load_splits(str(REPO / "data/demo/test.jsonl"))["train"][5].location == "line 6"


def test_conversational_data_needs_a_chat_template(tok):
    tokenizer = copy.deepcopy(tok)
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="chat_template"):
        D.tokenize_records(_records(CONVERSATIONAL), tokenizer, NO_LIMIT)


# -------------------------------------------------------------------------------------------- truncation

P, C, R = [1, 2, 3, 4, 5, 6], [10, 11, 12, 13, 14], [20, 21, 22]


@pytest.mark.parametrize("settings, expected", [
    (dict(max_prompt_length=4), ([1, 2, 3, 4], C, R)),
    (dict(max_prompt_length=4, truncation_mode="keep_end"), ([3, 4, 5, 6], C, R)),
    (dict(max_completion_length=2), (P, [10, 11], [20, 21])),
    (dict(max_completion_length=2, truncation_mode="keep_end"), (P, [10, 11], [20, 21])),
    (dict(max_length=8), (P, [10, 11], [20, 21])),                          # completion tails go
    (dict(max_length=8, truncation_mode="keep_end"), ([4, 5, 6], C, R)),     # prompt head goes (longest: 5)
    (dict(max_length=11), (P, C, R)),                                       # fits exactly
    (dict(max_prompt_length=4, max_length=7), ([1, 2, 3, 4], [10, 11, 12], R)),
    (dict(max_prompt_length=5, max_completion_length=4, max_length=6, truncation_mode="keep_end"),
     ([5, 6], [10, 11, 12, 13], R)),
])
def test_truncate_pair(settings, expected):
    settings = D.TokenizeSettings(**{"max_length": None, **settings})
    assert D.truncate_pair(P, C, R, settings) == expected


def test_tokenize_records_truncates(tok):
    full = _tokenize(CONVERSATIONAL, tok)
    for mode in ("keep_start", "keep_end"):
        settings = D.TokenizeSettings(max_length=20, max_prompt_length=18, max_completion_length=5,
                                      truncation_mode=mode)
        cut = _tokenize(CONVERSATIONAL, tok, settings)
        assert [(e.prompt_ids, e.chosen_ids, e.rejected_ids) for e in cut] == \
               [D.truncate_pair(e.prompt_ids, e.chosen_ids, e.rejected_ids, settings) for e in full]
        assert all(len(e.prompt_ids) + max(len(e.chosen_ids), len(e.rejected_ids)) <= 20 for e in cut)


def test_pairs_truncated_to_nothing_are_problems(tok):
    (example,) = _tokenize(CONVERSATIONAL[1:], tok)
    n_prompt, n_longest = len(example.prompt_ids), len(example.chosen_ids)
    _, problems = D.tokenize_records(_records(CONVERSATIONAL[1:]), tok, D.TokenizeSettings(max_length=n_prompt))
    assert [p.field for p in problems] == ["prompt"]
    assert "max_prompt_length" in problems[0].reason and f"({n_prompt} tokens)" in problems[0].reason
    settings = D.TokenizeSettings(max_length=n_longest, truncation_mode="keep_end")
    _, problems = D.tokenize_records(_records(CONVERSATIONAL[1:]), tok, settings)
    assert [p.field for p in problems] == ["prompt"] and "max_completion_length" in problems[0].reason


def test_settings_are_validated():
    with pytest.raises(ValueError, match="truncation_mode"):
        D.TokenizeSettings(truncation_mode="keep_middle")
    with pytest.raises(ValueError, match="max_length"):
        D.TokenizeSettings(max_length=0)


# ---------------------------------------------------------------------------------------- validation

GOOD_1 = {"prompt": "What is rain?", "chosen": " Water.", "rejected": " Ice."}
GOOD_2 = {"prompt": _msgs(("user", "Hi")), "chosen": _msgs(("assistant", "Hello!")),
          "rejected": _msgs(("assistant", "Go away."))}
BAD = [  # (row, expected field)
    ({"prompt": "x", "chosen": " y"}, "rejected"),                                     # missing field
    ({"prompt": "x", "chosen": "   ", "rejected": " z"}, "chosen"),                    # whitespace-only
    ({"prompt": "x", "chosen": " same", "rejected": " same"}, "rejected"),             # identical pair
    ({"prompt": "x", "chosen": 5, "rejected": " z"}, "chosen"),                        # non-string
    ({"prompt": None, "chosen": " y", "rejected": " z"}, "prompt"),                    # null
    ({"prompt": _msgs(("user", "x")), "chosen": [{"role": "assistant"}], "rejected": _msgs(("assistant", "z"))},
     "chosen"),                                                                        # malformed message
    ({"prompt": "x", "chosen": _msgs(("assistant", "y")), "rejected": _msgs(("assistant", "z"))}, "prompt"),
]


def _check_reported(error_or_report, source, expected):
    for location, field in expected:
        assert f"{source}, {location}, field '{field}'" in error_or_report


def _run_both_modes(path, tok, tmp_path, expected, good_ids):
    with pytest.raises(D.DataValidationError) as info:
        D.prepare_examples(str(path), tok, NO_LIMIT)
    _check_reported(str(info.value), path, expected)
    assert info.value.counts["records"] == len(expected)
    _, out = D.prepare_examples(str(path), tok, NO_LIMIT, on_invalid="skip",
                                report_path=tmp_path / "run" / "invalid_records.jsonl")
    report = [json.loads(line) for line in (tmp_path / "run/invalid_records.jsonl").read_text().splitlines()]
    assert [(r["source"], r["location"], r["field"]) for r in report] == [(str(path), loc, f) for loc, f in expected]
    assert [e.id for e in out["train"]] == good_ids


def test_hostile_jsonl(tok, tmp_path, caplog):
    lines = [json.dumps(GOOD_1), '{"prompt": "x", "chosen": ', ""] + [json.dumps(row) for row, _ in BAD]
    lines += [json.dumps(GOOD_2), "[1, 2]", "   "]
    path = tmp_path / "hostile.jsonl"
    path.write_text("\n".join(lines) + "\n")
    expected = [("line 2", "json")] + [(f"line {i}", field) for i, (_, field) in enumerate(BAD, start=4)]
    expected += [(f"line {len(lines) - 1}", "json")]
    with caplog.at_level(logging.WARNING, logger="dpo_core.data"):
        _run_both_modes(path, tok, tmp_path, expected, good_ids=[0, 2 + len(BAD)])
    assert f"Skipped {len(expected)} invalid record(s)" in caplog.text and "invalid_records.jsonl" in caplog.text


def test_jsonl_lines_are_byte_ranges_parsed_when_read(tmp_path):
    """A JSON-lines record is its line number and byte range: CRLF endings, blank lines, a last line without a
    newline and bad UTF-8 keep their line numbers; parsing gives `json.loads` of the line; a record pickles to its
    range (what a worker process receives), not its content."""
    import pickle

    rows = [GOOD_1, {**GOOD_1, "chosen": " " + "é" * 5000}, GOOD_2]
    raw = (json.dumps(rows[0]).encode() + b"\r\n\r\n" + json.dumps(rows[1], ensure_ascii=False).encode() + b"\n \t\n"
           + b'{"prompt": "\xff"}\n' + json.dumps(rows[2]).encode())
    path = tmp_path / "lines.jsonl"
    path.write_bytes(raw)
    records = D.load_splits(str(path))["train"]
    assert [(r.id, r.location) for r in records] == [(0, "line 1"), (1, "line 3"), (2, "line 5"), (3, "line 6")]
    assert [r.data for r in records[:2]] + [records[3].data] == rows
    assert records[2].data is None and records[2].error.startswith("not valid UTF-8")
    assert D.loaded(records)[1] == D.Record(1, str(path), "line 3", rows[1], None)
    assert len(pickle.dumps(records[1])) < 200 < len(json.dumps(rows[1]))
    assert pickle.loads(pickle.dumps(records[1])).data == rows[1]


def test_hostile_json_array(tok, tmp_path):
    path = tmp_path / "hostile.json"
    path.write_text(json.dumps([GOOD_1] + [row for row, _ in BAD] + ["not an object", GOOD_2], indent=2))
    expected = [(f"row {i}", field) for i, (_, field) in enumerate(BAD, start=1)] + [(f"row {len(BAD) + 1}", "json")]
    _run_both_modes(path, tok, tmp_path, expected, good_ids=[0, len(BAD) + 2])
    path.write_text('[{"prompt": "x",\n "chosen": }]')
    _, problems = D.tokenize_records(D.load_splits(str(path))["train"], tok, NO_LIMIT)
    assert [str(p) for p in problems] == [f"{path}, line 2, field 'json': malformed JSON array: Expecting value"]


def test_hostile_parquet(tok, tmp_path):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    rows = [GOOD_1, {**GOOD_1, "chosen": None}, {**GOOD_1, "rejected": ""}, {**GOOD_1, "rejected": " Water."},
            {**GOOD_1, "prompt": "Why?"}]
    path = tmp_path / "hostile.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    expected = [("row 1", "chosen"), ("row 2", "rejected"), ("row 3", "rejected")]
    _run_both_modes(path, tok, tmp_path, expected, good_ids=[0, 4])


def test_records_tokenization_cannot_use_are_problems(tok):
    strict = copy.deepcopy(tok)
    strict.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system "
                            "role') }}{% endif %}{{ m['content'] }}{% endfor %}")
    rows = [CONVERSATIONAL[1], {**CONVERSATIONAL[0], "tools": "{not json"},
            {"chosen": "Yes, sure.", "rejected": "No."}, CONVERSATIONAL[0]]
    examples, problems = D.tokenize_records(_records(rows), strict, NO_LIMIT)
    assert [e.id for e in examples] == [3]
    assert [(p.location, p.field) for p in problems] == [("row 0", "chat_template"), ("row 1", "tools"),
                                                         ("row 2", "prompt")]
    assert "no system role" in problems[0].reason and "share no leading" in problems[2].reason


def test_problem_listing_is_bounded(tmp_path):
    problems = [D.Problem("f.jsonl", f"line {i}", "chosen", "is null") for i in range(1, 61)]
    with pytest.raises(D.DataValidationError, match=r"\.\.\. and 10 more") as info:
        D.check_problems(problems, report_path=tmp_path / "r.jsonl")
    assert "60 invalid record(s)" in str(info.value) and len(info.value.problems) == 60
    assert len((tmp_path / "r.jsonl").read_text().splitlines()) == 60
    with pytest.raises(ValueError, match="report path"):
        D.check_problems([], on_invalid="skip")
    D.check_problems([], on_invalid="skip", report_path=tmp_path / "empty.jsonl")
    assert (tmp_path / "empty.jsonl").read_text() == ""  # always rewritten under skip: never stale


# ------------------------------------------------------------------------------------------- loading

def _write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _rows(n, tag):
    return [{"prompt": f"{tag} {i}?", "chosen": " yes", "rejected": " no"} for i in range(n)]


def test_folder_splits(tmp_path):
    _write_jsonl(tmp_path / "train-00000-of-00002.jsonl", _rows(3, "a"))
    _write_jsonl(tmp_path / "train-00001-of-00002.jsonl", _rows(2, "b"))
    _write_jsonl(tmp_path / "data" / "test.jsonl", _rows(4, "t"))
    splits = D.load_splits(str(tmp_path), eval_split="test")
    assert [r.id for r in splits["train"]] == [0, 1, 2, 3, 4]  # ids continue across shards
    assert splits["train"][3].location == "line 1" and splits["train"][3].source.endswith("00001-of-00002.jsonl")
    assert [r.data["prompt"] for r in splits["eval"]] == [f"t {i}?" for i in range(4)]
    with pytest.raises(ValueError, match=r"available splits: \['test', 'train'\]"):
        D.load_splits(str(tmp_path), split="validation")
    with pytest.raises(ValueError, match="not both"):
        D.load_splits(str(tmp_path), eval_split="test", eval_fraction=0.1)
    with pytest.raises(FileNotFoundError):
        D.load_splits(str(tmp_path / "missing.jsonl"))


def test_eval_fraction_is_deterministic_and_disjoint(tmp_path):
    path = tmp_path / "all.jsonl"
    _write_jsonl(path, _rows(50, "q"))
    a = D.load_splits(str(path), eval_fraction=0.2, seed=1)
    assert a == D.load_splits(str(path), eval_fraction=0.2, seed=1)
    assert len(a["eval"]) == 10 and len(a["train"]) == 40
    train_ids, eval_ids = {r.id for r in a["train"]}, {r.id for r in a["eval"]}
    assert not train_ids & eval_ids and train_ids | eval_ids == set(range(50))
    assert eval_ids != {r.id for r in D.load_splits(str(path), eval_fraction=0.2, seed=2)["eval"]}
    with pytest.raises(ValueError, match="single file"):
        D.load_splits(str(path), eval_split="test")


def test_hub_dataset(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.Table.from_pylist(_rows(3, "h")), tmp_path / "train.parquet")
    real_load, calls = datasets.load_dataset, []

    def fake_load(name, config=None, split=None):  # no hub here: serve a local parquet through `datasets`
        calls.append((name, config, split))
        return real_load("parquet", data_files={"train": str(tmp_path / "train.parquet")}, split=split)

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    records = D.load_splits("org/prefs", dataset_config="default", split="train")["train"]
    assert calls == [("org/prefs", "default", "train")]
    assert [(r.id, r.source, r.location) for r in records] == [(i, "hub:org/prefs[default]/train", f"row {i}")
                                                                for i in range(3)]
    assert records[2].data == _rows(3, "h")[2]


# ----------------------------------------------------------------------------------------- collation

def test_collate_concat_layout():
    examples = [D.Example(7, [1, 2, 3], [4, 5], [6]), D.Example(9, [7, 8], [9], [10, 11])]
    batch = collate_concat(examples, pad_token_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5], [7, 8, 9, 0, 0], [1, 2, 3, 6, 0], [7, 8, 10, 11, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0]]
    assert batch["completion_mask"].tolist() == [[0, 0, 0, 1, 1], [0, 0, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 1, 1, 0]]
    assert batch["ids"].tolist() == [7, 9]
    assert all(t.dtype == torch.long for t in batch.values())
    assert collate_concat(examples, pad_token_id=0, pad_to_multiple_of=8)["input_ids"].shape == (4, 8)


def test_collate_concat_matches_trl(tok):
    pytest.importorskip("trl")
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    examples = _tokenize(CONVERSATIONAL + IMPLICIT_CONVERSATIONAL + STANDARD, tok)
    dataset = PairDataset(examples)
    assert len(dataset) == len(examples) and dataset[2] is examples[2]
    ours = collate_concat(examples, tok.pad_token_id)
    theirs = DataCollatorForPreference(pad_token_id=tok.pad_token_id)(
        [{"prompt_ids": e.prompt_ids, "chosen_ids": e.chosen_ids, "rejected_ids": e.rejected_ids} for e in examples])
    for key in ("input_ids", "attention_mask", "completion_mask"):
        assert torch.equal(ours[key], theirs[key]), key
    # only completion tokens are marked: each row's marked tokens are exactly its completion
    for i, e in enumerate(examples):
        for row, completion in ((i, e.chosen_ids), (i + len(examples), e.rejected_ids)):
            assert ours["input_ids"][row][ours["completion_mask"][row].bool()].tolist() == completion


# --------------------------------------------------------------------------------------- fingerprints

def test_dataset_fingerprint(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = _rows(5, "f")
    _write_jsonl(path, rows)
    base = D.dataset_fingerprint(D.load_splits(str(path))["train"])
    assert base == D.dataset_fingerprint(D.load_splits(str(path))["train"])
    rows[3] = {**rows[3], "chosen": " yes!"}
    _write_jsonl(path, rows)
    assert D.dataset_fingerprint(D.load_splits(str(path))["train"]) != base
    reordered = {k: rows[0][k] for k in ("rejected", "chosen", "prompt")}  # key order is not content
    assert D.dataset_fingerprint(_records([reordered])) == D.dataset_fingerprint(_records([rows[0]]))


def test_tokenizer_fingerprint(tok, tiny_model_dir):
    from transformers import AutoTokenizer

    from dpo_core.demo import build_tiny_tokenizer

    base = D.tokenizer_fingerprint(tok)
    assert base == D.tokenizer_fingerprint(AutoTokenizer.from_pretrained(tiny_model_dir))
    assert base == D.tokenizer_fingerprint(build_tiny_tokenizer())  # built vs saved-and-loaded
    changes = [("chat_template", tok.chat_template + "{{ '' }}"), ("eos_token", "<|im_start|>"),
               ("pad_token", EOS), ("bos_token", PAD), ("padding_side", "left"), ("truncation_side", "left")]
    for attr, value in changes:
        changed = copy.deepcopy(tok)
        setattr(changed, attr, value)
        assert D.tokenizer_fingerprint(changed) != base, attr


def test_the_rust_backend_path_gives_transformers_ids(tiny_model_dir):
    """`_encode_batch` calls a fast tokenizer's Rust backend directly (skipping transformers' per-encoding
    conversion): the ids equal `tokenizer(...)` and `apply_chat_template(...)`; a backend with truncation or
    padding configured is not called directly."""
    from transformers import AutoTokenizer

    from dpo_core.data import _encode_batch, _raw_backend

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert _raw_backend(tokenizer) is not None
    texts = ["Hello there, how are you?", " A completion." + tokenizer.eos_token, "émoji 🙂 and tabs\tok"]
    assert _encode_batch(tokenizer, False, texts, {}, prompts=False) == tokenizer(text=texts)["input_ids"]
    chats = [[{"role": "user", "content": "Hi!"}], [{"role": "user", "content": "2+2?"},
                                                   {"role": "assistant", "content": "4."}]]
    for prompts in (True, False):
        want = tokenizer.apply_chat_template(chats, tokenize=True, return_dict=True,
                                             add_generation_prompt=prompts)["input_ids"]
        assert _encode_batch(tokenizer, True, chats, {}, prompts=prompts) == [list(x) for x in want]
    tokenizer.backend_tokenizer.enable_truncation(4)
    assert _raw_backend(tokenizer) is None
