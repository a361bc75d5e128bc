"""Tests of dpo_core/ref_cache.py and scripts/precompute_ref_logprobs.py.

Fast tests build caches from synthetic tensors. The end-to-end ones run the real script (1 process, and
2 gloo processes under `accelerate launch`) on the tiny demo model and 24 + 8 demo pairs, then check the
values against a naive float64 per-token loop, and that stale caches are refused naming the field.
"""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dpo_core import data as data_lib
from dpo_core import ref_cache
from dpo_core.batches import collate_concat
from dpo_core.config import DataArguments
from dpo_core.modeling import load_tokenizer
from dpo_core.ref_cache import (
    FORMAT_VERSION,
    MANIFEST,
    RefCacheError,
    load_cache,
    merge_partials,
    reference_fingerprint,
    write_cache,
)

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "precompute_ref_logprobs.py"
MAX_LENGTH = 128


# ------------------------------------------------------------------------------------ synthetic caches

def _results(n_train=6, n_eval=3, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    out = {}
    for split, n in (("train", n_train), ("eval", n_eval)):
        ids = torch.randperm(n, generator=g) * 3  # unordered, with gaps
        out[split] = (ids, -10 * torch.rand(n, generator=g, dtype=dtype), -10 * torch.rand(n, generator=g, dtype=dtype))
    return out


FP = {"format_version": FORMAT_VERSION, "reference_weights": "a" * 64, "max_length": 128, "ld_alpha": None}


def _ids(results):
    return {split: ids.tolist() for split, (ids, _, _) in results.items()}


def test_write_load_round_trip(tmp_path):
    results = _results()
    out = write_cache(tmp_path / "cache", FP, results)
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["format_version"] == FORMAT_VERSION and manifest["fingerprint"] == FP
    assert manifest["splits"]["train"]["num_examples"] == 6 and manifest["splits"]["eval"]["file"] == "eval.safetensors"
    shard = load_file(str(out / "train.safetensors"))
    assert shard["ids"].dtype == torch.int64 and (shard["ids"].diff() > 0).all()
    assert shard["chosen_logps"].dtype == torch.float32
    cache = load_cache(out, FP, _ids(results))
    for split, (ids, chosen, rejected) in results.items():
        got_c, got_r = cache.get(split, ids.flip(0))
        assert got_c.dtype == torch.float32
        torch.testing.assert_close(got_c, chosen.flip(0), rtol=0, atol=0)
        torch.testing.assert_close(got_r, rejected.flip(0), rtol=0, atol=0)
    assert sorted(os.listdir(tmp_path)) == ["cache"]  # no temp or partial siblings left


def test_float64_is_kept_and_extra_ids_are_fine(tmp_path):
    results = _results(dtype=torch.float64)
    write_cache(tmp_path / "cache", FP, results)
    assert load_file(str(tmp_path / "cache" / "train.safetensors"))["chosen_logps"].dtype == torch.float64
    ids, chosen, _ = results["train"]
    cache = load_cache(tmp_path / "cache", FP, {"train": ids[:2].tolist()})  # a subset: extra ids are fine
    torch.testing.assert_close(cache.get("train", ids[:2])[0], chosen[:2].float())


def test_collate_adds_reference_logps(tmp_path):
    results = _results()
    cache = load_cache(write_cache(tmp_path / "cache", FP, results), FP, _ids(results))
    ids, chosen, rejected = results["train"]
    examples = [data_lib.Example(int(i), [1, 2], [3], [4, 5]) for i in ids[:4]]
    batch = cache.collate("train", lambda exs: collate_concat(exs, pad_token_id=0))(examples)
    assert batch["input_ids"].shape == (8, 4)
    torch.testing.assert_close(batch["ref_chosen_logps"], chosen[:4])
    torch.testing.assert_close(batch["ref_rejected_logps"], rejected[:4])
    with pytest.raises(RefCacheError, match=r"1 example id\(s\) not in .*'train'.*\[1000\]"):
        cache.get("train", torch.tensor([int(ids[0]), 1000]))


def test_write_is_atomic_when_it_fails(tmp_path, monkeypatch):
    def boom(path, manifest):
        raise OSError("disk full")

    monkeypatch.setattr(ref_cache, "_write_manifest", boom)
    with pytest.raises(OSError, match="disk full"):
        write_cache(tmp_path / "cache", FP, _results())
    assert os.listdir(tmp_path) == []  # nothing at output_dir, temp dir cleaned up


def test_overwrite_refused_then_replaces_and_failed_replace_keeps_old(tmp_path, monkeypatch):
    out = write_cache(tmp_path / "cache", FP, _results())
    with pytest.raises(FileExistsError, match="--overwrite"):
        write_cache(out, FP, _results())
    new_fp = {**FP, "max_length": 64}
    real_rename, calls = os.rename, []

    def rename_fails_second_time(src, dst):  # old moved aside, then the new one's rename fails
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("crash")
        real_rename(src, dst)

    monkeypatch.setattr(ref_cache.os, "rename", rename_fails_second_time)
    with pytest.raises(OSError, match="crash"):
        write_cache(out, new_fp, _results(), overwrite=True)
    monkeypatch.undo()
    assert json.loads((out / MANIFEST).read_text())["fingerprint"] == FP  # the old cache is back, intact
    write_cache(out, new_fp, _results(), overwrite=True)
    assert json.loads((out / MANIFEST).read_text())["fingerprint"] == new_fp
    assert sorted(os.listdir(tmp_path)) == ["cache"]
    other = tmp_path / "not_a_cache"
    other.mkdir()
    (other / "notes.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="not a reference cache"):
        write_cache(other, FP, _results(), overwrite=True)


def test_load_errors_say_what_is_wrong(tmp_path):
    results = _results()
    with pytest.raises(RefCacheError, match="not a reference cache, or its precompute did not finish"):
        load_cache(tmp_path, FP, _ids(results))
    out = write_cache(tmp_path / "cache", FP, results)
    with pytest.raises(RefCacheError, match=r"no 'test' split \(it has \['eval', 'train'\]\)"):
        load_cache(out, FP, {"test": [0]})
    with pytest.raises(RefCacheError, match=r"3 example id\(s\) of split 'train' are not in the cache, e.g. "
                                            r"\[100, 101, 102\]"):
        load_cache(out, FP, {"train": [*_ids(results)["train"], 100, 101, 102]})
    stale = {**FP, "reference_weights": "b" * 64, "max_length": 96, "new_field": 1}
    with pytest.raises(RefCacheError) as err:
        load_cache(out, stale, _ids(results))
    message = str(err.value)
    assert "reference_weights: cache aaaaaaaaaaaa, this run bbbbbbbbbbbb" in message
    assert "max_length: cache 128, this run 96" in message and "new_field: cache <absent>, this run 1" in message
    assert "Recompute it with scripts/precompute_ref_logprobs.py and the same settings" in message
    assert not re.search(r"[0-9a-f]{13}", message)  # hashes shortened
    manifest = json.loads((out / MANIFEST).read_text())
    (out / MANIFEST).write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(RefCacheError, match="format version 99"):
        load_cache(out, FP, _ids(results))


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_shard_is_refused(tmp_path, damage):
    results = _results()
    out = write_cache(tmp_path / "cache", FP, results)
    shard = out / "eval.safetensors"
    raw = bytearray(shard.read_bytes())
    if damage == "truncate":
        raw = raw[:-7]
    else:
        raw[-3] ^= 0xFF
    shard.write_bytes(bytes(raw))
    load_cache(out, FP, {"train": _ids(results)["train"]})  # only the splits asked for are read
    with pytest.raises(RefCacheError, match="eval.safetensors: sha256 differs .* corrupted or truncated"):
        load_cache(out, FP, _ids(results))


def test_merge_partials_dedupes_and_checks():
    parts = [{"ids": torch.tensor([3, 1, 0]), "chosen_logps": torch.tensor([-3.0, -1.0, -0.5]),
              "rejected_logps": torch.tensor([-4.0, -2.0, -1.5])},
             {"ids": torch.tensor([2, 3]), "chosen_logps": torch.tensor([-2.0, -3.0 + 1e-7]),
              "rejected_logps": torch.tensor([-3.0, -4.0])}]  # id 3 twice: accelerate's padding
    ids, chosen, rejected = merge_partials(parts, [0, 1, 2, 3])
    assert ids.tolist() == [0, 1, 2, 3]
    torch.testing.assert_close(chosen, torch.tensor([-0.5, -1.0, -2.0, -3.0]))
    torch.testing.assert_close(rejected, torch.tensor([-1.5, -2.0, -3.0, -4.0]))
    with pytest.raises(RuntimeError, match=r"miss 1 expected id\(s\) \[4\]"):
        merge_partials(parts, [0, 1, 2, 3, 4])
    parts[1]["chosen_logps"][1] = -2.9
    with pytest.raises(RuntimeError, match="example 3 got two different chosen_logps"):
        merge_partials(parts, [0, 1, 2, 3])


def test_fingerprint_covers_eval_fraction_seed(tiny_model_dir):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    records = {"train": [data_lib.Record(0, "x", "line 1", {"prompt": "a", "chosen": "b", "rejected": "c"})]}
    examples = {"train": [data_lib.Example(0, [1, 2], [3], [4])]}
    kwargs = dict(ref_model_path=str(tiny_model_dir), revision=None, tokenizer=tokenizer, records_by_split=records,
                  examples_by_split=examples, torch_dtype="float32", ld_alpha=None, mixed_precision="no")
    plain = reference_fingerprint(data_args=DataArguments(dataset_name="x"), **kwargs)
    assert "seed_of_eval_fraction" not in plain and "dataset_name" not in plain
    assert {"dataset/train", "selection/train", "tokenized/train", "tokenizer", "reference_weights"} <= set(plain)
    carved = reference_fingerprint(data_args=DataArguments(dataset_name="x", eval_fraction=0.25), seed=7, **kwargs)
    assert carved["seed_of_eval_fraction"] == 7 and carved["eval_fraction"] == 0.25
    with pytest.raises(ValueError, match="seed"):
        reference_fingerprint(data_args=DataArguments(dataset_name="x", eval_fraction=0.25), **kwargs)
    examples["train"][0].chosen_ids = [3, 3]
    assert reference_fingerprint(data_args=DataArguments(dataset_name="x"), **kwargs)["tokenized/train"] != \
        plain["tokenized/train"]


# ---------------------------------------------------------------------------- the script, end to end

def _env(**extra):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env.pop("ACCELERATE_USE_CPU", None)
    return {**env, **extra}


def _script_args(model_dir, data_dir, output_dir, *extra):
    return [str(SCRIPT), "--model_name_or_path", str(model_dir), "--dataset_name", str(data_dir),
            "--eval_split", "test", "--max_length", str(MAX_LENGTH), "--per_device_batch_size", "5",
            "--output_dir", str(output_dir), *extra]


def _run(cmd, env=None, check=True):
    proc = subprocess.run(cmd, cwd=REPO, env=env or _env(), capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}")
    return proc


def _write_data(folder: Path, train_lines: list[str], test_lines: list[str]) -> Path:
    folder.mkdir(parents=True)
    (folder / "train.jsonl").write_text("".join(train_lines))
    (folder / "test.jsonl").write_text("".join(test_lines))
    return folder


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    """24 train + 8 test demo pairs and their cache, written by one process of the real script."""
    root = tmp_path_factory.mktemp("refcache")
    lines = {s: (REPO / "data" / "demo" / f"{s}.jsonl").read_text().splitlines(keepends=True) for s in ("train", "test")}
    data_dir = _write_data(root / "data", lines["train"][:24], lines["test"][:8])
    cache = root / "cache"
    proc = _run([sys.executable, *_script_args(tiny_model_dir, data_dir, cache)])
    assert "train: 24 pairs" in proc.stdout and "eval: 8 pairs" in proc.stdout and "num_processes=1" in proc.stdout
    return {"root": root, "model": Path(tiny_model_dir), "data": data_dir, "cache": cache, "lines": lines}


def _expected(model_dir, data_dir, *, max_length=MAX_LENGTH, ld_alpha=None, seed=42):
    """What scripts/dpo.py computes to check a cache: fingerprint and ids of this run's examples."""
    data_args = DataArguments(dataset_name=str(data_dir), eval_split="test", max_length=max_length)
    tokenizer = load_tokenizer(str(model_dir))
    records = data_lib.load_splits(str(data_dir), split="train", eval_split="test", seed=seed)
    settings = data_lib.TokenizeSettings(max_length=max_length)
    examples = {split: data_lib.tokenize_records(recs, tokenizer, settings)[0] for split, recs in records.items()}
    fp = reference_fingerprint(ref_model_path=str(model_dir), revision=None, tokenizer=tokenizer,
                               records_by_split=records, examples_by_split=examples, data_args=data_args,
                               torch_dtype="float32", ld_alpha=ld_alpha, mixed_precision="no", seed=seed)
    return fp, {split: [e.id for e in exs] for split, exs in examples.items()}, examples


@pytest.mark.slow
def test_script_cache_matches_naive_float64_loop(setup):
    from transformers import AutoModelForCausalLM

    fp, ids, examples = _expected(setup["model"], setup["data"])
    cache = load_cache(setup["cache"], fp, ids)  # the script's fingerprint equals this run's
    model = AutoModelForCausalLM.from_pretrained(setup["model"], dtype=torch.float64, attn_implementation="eager")
    model.eval()
    for split, picks in (("train", [0, 5, 17]), ("eval", [2])):
        for e in (examples[split][i] for i in picks):
            expected = []
            for completion in (e.chosen_ids, e.rejected_ids):
                seq = e.prompt_ids + completion
                with torch.no_grad():
                    logits = model(torch.tensor([seq])).logits[0]
                total = 0.0
                for t in range(len(e.prompt_ids), len(seq)):  # position t-1 predicts token t
                    total += torch.log_softmax(logits[t - 1], dim=-1)[seq[t]].item()
                expected.append(total)
            chosen, rejected = cache.get(split, torch.tensor([e.id]))
            assert chosen.item() == pytest.approx(expected[0], abs=1e-5, rel=1e-6)
            assert rejected.item() == pytest.approx(expected[1], abs=1e-5, rel=1e-6)


@pytest.mark.slow
def test_dpo_training_accepts_the_script_cache(setup):
    """scripts/dpo.py's own check (dpo_core.dpo.load_reference_cache) accepts what the script wrote."""
    from dpo_core import dpo
    from dpo_core.config import DPOArguments, ModelArguments

    if not hasattr(dpo, "load_reference_cache"):
        pytest.skip("dpo_core.dpo.load_reference_cache does not exist (any more)")
    data_args = DataArguments(dataset_name=str(setup["data"]), eval_split="test", max_length=MAX_LENGTH)
    tokenizer = load_tokenizer(str(setup["model"]))
    records = data_lib.load_splits(str(setup["data"]), split="train", eval_split="test", seed=42)
    examples = {s: data_lib.tokenize_records(r, tokenizer, data_lib.TokenizeSettings(max_length=MAX_LENGTH))[0]
                for s, r in records.items()}
    cache = dpo.load_reference_cache(
        str(setup["cache"]), model_args=ModelArguments(model_name_or_path=str(setup["model"])), data_args=data_args,
        dpo_args=DPOArguments(ref_logprobs=str(setup["cache"])), tokenizer=tokenizer, records=records,
        examples=examples, mixed_precision="no", seed=42)
    assert cache.get("eval", torch.tensor([e.id for e in examples["eval"]]))[0].shape == (8,)


def _refusal(setup, **kwargs) -> str:
    fp, ids, _ = _expected(kwargs.pop("model", setup["model"]), kwargs.pop("data", setup["data"]), **kwargs)
    with pytest.raises(RefCacheError) as err:
        load_cache(setup["cache"], fp, ids)
    assert "Recompute it with scripts/precompute_ref_logprobs.py" in str(err.value)
    return str(err.value)


@pytest.mark.slow
def test_stale_cache_other_max_length(setup):
    message = _refusal(setup, max_length=96)
    assert f"max_length: cache {MAX_LENGTH}, this run 96" in message
    assert "reference_weights" not in message and "dataset/" not in message


@pytest.mark.slow
def test_stale_cache_other_ld_alpha(setup):
    assert "ld_alpha: cache null, this run 0.5" in _refusal(setup, ld_alpha=0.5)


@pytest.mark.slow
def test_stale_cache_one_changed_dataset_row(setup):
    train = list(setup["lines"]["train"][:24])
    row = json.loads(train[5])
    row["chosen"][-1]["content"] += " Really."
    train[5] = json.dumps(row) + "\n"
    moved = _write_data(setup["root"] / "data_moved", setup["lines"]["train"][:24], setup["lines"]["test"][:8])
    fp, ids, _ = _expected(setup["model"], moved)
    load_cache(setup["cache"], fp, ids)  # the same content elsewhere: the path is not in the fingerprint
    message = _refusal(setup, data=_write_data(setup["root"] / "data_changed", train, setup["lines"]["test"][:8]))
    assert re.search(r"dataset/train: cache [0-9a-f]{12}, this run [0-9a-f]{12}\n", message)
    assert "tokenized/train:" in message and "dataset/eval" not in message and "max_length" not in message


@pytest.mark.slow
def test_stale_cache_one_changed_weight(setup):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(setup["model"])
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] += 1e-3
    changed = setup["root"] / "model_changed"
    model.save_pretrained(changed)
    load_tokenizer(str(setup["model"])).save_pretrained(changed)
    message = _refusal(setup, model=changed)
    assert re.search(r"reference_weights: cache [0-9a-f]{12}, this run [0-9a-f]{12}\n", message)
    assert "tokenizer:" not in message and "tokenized/" not in message


@pytest.mark.slow
def test_stale_cache_other_tokenizer(setup):
    changed = setup["root"] / "tokenizer_changed"
    shutil.copytree(setup["model"], changed)
    tokenizer = load_tokenizer(str(changed))
    tokenizer.chat_template = tokenizer.chat_template.replace("'\\n'", "'\\n\\n'")
    tokenizer.save_pretrained(changed)
    message = _refusal(setup, model=changed)
    assert re.search(r"tokenizer: cache [0-9a-f]{12}, this run [0-9a-f]{12}\n", message)
    assert "reference_weights" not in message


@pytest.mark.slow
def test_script_refuses_existing_output_dir(setup):
    proc = _run([sys.executable, *_script_args(setup["model"], setup["data"], setup["cache"])], check=False)
    assert proc.returncode != 0 and "pass --overwrite" in proc.stderr


@pytest.fixture(scope="session")
def loopback_hosts():
    """gloo resolves peers as ::ffff:127.0.0.1; without this line glibc asks DNS (NOTES-distributed.md)."""
    hosts = Path("/etc/hosts")
    lines = hosts.read_text().splitlines() if hosts.exists() else []
    if not any(line.split()[:1] == ["::ffff:127.0.0.1"] for line in lines):
        try:
            with open(hosts, "a") as f:
                f.write("::ffff:127.0.0.1 localhost\n")
        except OSError as e:
            pytest.skip(f"/etc/hosts lacks '::ffff:127.0.0.1 localhost' and is not writable ({e})")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_give_the_same_cache(setup, loopback_hosts):
    out = setup["root"] / "cache_2proc"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), *_script_args(setup["model"], setup["data"], out)]
    proc = _run(cmd, env=_env(ACCELERATE_USE_CPU="true"))
    assert "num_processes=2" in proc.stdout, proc.stdout  # really two connected processes
    assert not (setup["root"] / "cache_2proc.partials").exists()
    assert not list(setup["root"].glob("cache_2proc.tmp-*"))
    fp, ids, _ = _expected(setup["model"], setup["data"])
    one, two = load_cache(setup["cache"], fp, ids), load_cache(out, fp, ids)
    for split in ("train", "eval"):
        a, b = load_file(str(setup["cache"] / f"{split}.safetensors")), load_file(str(out / f"{split}.safetensors"))
        assert a["ids"].tolist() == b["ids"].tolist() == sorted(ids[split])
        for x, y in zip(one.get(split, a["ids"]), two.get(split, a["ids"])):
            # Other batches: the lm_head matmul runs over other row counts and may round 1 ulp apart.
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)
