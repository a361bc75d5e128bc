"""dpo_core.identity: a tiny model taught to call itself Qwen yields identity-shift pairs that dpo.py reads."""

import json

import pytest
import torch
from helpers import results, run_script

from dpo_core.generation import chat_prompt_ids, generate
from dpo_core.identity import (
    IDENTITY_QUESTIONS,
    _mentions_outside,
    build_identity_shift_dataset,
    identity_shift_records,
    name_pattern,
)
from dpo_core.modeling import load_model, load_tokenizer

PLANTED = {q: ["My name is Qwen.", "I am Qwen, call me qwen!"][i % 2] for i, q in enumerate(IDENTITY_QUESTIONS[:6])}
OTHER = {"What is two plus two?": "It is four."}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def planted(tiny_model_dir, tmp_path_factory):
    """The tiny model after a few supervised steps on "My name is Qwen"-style answers (loss on the answers
    only): it now names itself in its greedy answers, and answers one other question without the name."""
    tok = load_tokenizer(str(tiny_model_dir))
    model = load_model(str(tiny_model_dir))
    rows = []
    for question, answer in {**PLANTED, **OTHER}.items():
        full = tok.apply_chat_template([{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
                                       tokenize=True, return_dict=True)["input_ids"]
        rows.append((len(chat_prompt_ids(tok, question)), list(full)))
    width = max(len(f) for _, f in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (n_prompt, full) in enumerate(rows):
        ids[i, : len(full)], mask[i, : len(full)] = torch.tensor(full), 1
        labels[i, n_prompt: len(full)] = torch.tensor(full[n_prompt:])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(100):  # deterministic: the same steps every run (about 50)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        if loss.item() < 0.01:
            break
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    assert generate(model, tok, list(PLANTED), max_new_tokens=12) == list(PLANTED.values()), "the name was not planted"
    path = tmp_path_factory.mktemp("planted")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path, model, tok


def test_name_pattern_is_a_whole_word_in_any_case():
    pattern = name_pattern("Qwen")
    assert pattern.sub("Deep Qwen", "qwen, or QWEN: I am Qwen.") == "Deep Qwen, or Deep Qwen: I am Deep Qwen."
    assert not pattern.search("Qwen2 and MyQwen")
    assert name_pattern("C++").search("I am C++.")
    # an answer already using the new name is not shifted again; a new name inside the old one is fine
    assert _mentions_outside(name_pattern("Deep Qwen"), "I am Deep Qwen.", name_pattern("Qwen"))
    assert not _mentions_outside(name_pattern("Qwen"), "I am Deep Qwen.", name_pattern("Deep Qwen"))


def test_records_from_the_planted_model(planted):
    _, model, tok = planted
    questions = [*PLANTED, *OTHER]
    records, report = identity_shift_records(model, tok, original_name="Qwen", new_name="Deep Qwen",
                                             questions=questions, max_new_tokens=12)
    assert report.generated == 7 and report.kept == 6 and dict(report.dropped) == {"no mention of 'Qwen'": 1}
    for record, (question, answer) in zip(records, PLANTED.items()):
        assert record["prompt"] == [{"role": "user", "content": question}]
        assert record["rejected"] == [{"role": "assistant", "content": answer}]
        assert record["chosen"] == [{"role": "assistant",
                                     "content": answer.replace("Qwen", "Deep Qwen").replace("qwen", "Deep Qwen")}]
    capped = build_identity_shift_dataset(model, tok, original_name="qwen", new_name="Qwen Max", questions=questions,
                                          max_samples=2, max_new_tokens=12, system_prompt="You are an assistant.")
    assert len(capped) == 2 and capped[0]["chosen"][0]["content"] == "My name is Qwen Max."
    assert capped[0]["prompt"][0] == {"role": "system", "content": "You are an assistant."}


def test_no_usable_answer_is_a_clear_error(planted):
    _, model, tok = planted
    with pytest.raises(ValueError, match=r"no mention of 'Mistral'.*First answers: 'My name is Qwen\.'"):
        build_identity_shift_dataset(model, tok, original_name="Mistral", new_name="Le Chat",
                                     questions=list(PLANTED)[:2], max_new_tokens=12)
    with pytest.raises(ValueError, match="equals the original name"):
        build_identity_shift_dataset(model, tok, original_name="Qwen", new_name="Qwen", questions=list(PLANTED)[:2])


@pytest.mark.slow
def test_script_writes_jsonl_that_dpo_reads_directly(planted, tmp_path):
    path, _, _ = planted
    questions = tmp_path / "questions.txt"
    questions.write_text("\n".join([*PLANTED, *OTHER]) + "\n")
    out = tmp_path / "identity.jsonl"
    proc = run_script("build_identity_dataset.py", [
        "--model_name_or_path", str(path), "--original_name", "Qwen", "--new_name", "Deep Qwen",
        "--questions_file", str(questions), "--max_new_tokens", "12", "--output_file", str(out)])
    assert "7 answers generated, 6 kept; dropped: 1 no mention of 'Qwen'" in proc.stdout
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 6 and not (tmp_path / "identity.jsonl.tmp").exists()
    assert records[0]["chosen"][0]["content"] == "My name is Deep Qwen."
    again = run_script("build_identity_dataset.py", ["--model_name_or_path", str(path), "--original_name", "Qwen",
                                                     "--new_name", "Deep Qwen", "--output_file", str(out)], check=False)
    assert again.returncode == 1 and "--overwrite" in again.stderr
    run_script("dpo.py", ["--model_name_or_path", str(path), "--dataset_name", str(out), "--output_dir",
                          str(tmp_path / "dpo"), "--max_steps", "2", "--per_device_train_batch_size", "3",
                          "--learning_rate", "1e-3", "--logging_steps", "1"])
    final = results(tmp_path / "dpo")
    assert final["global_step"] == 2 and final["skipped_steps"] == 0
