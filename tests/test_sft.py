"""dpo_core/sft.py, dpo_core/sft_data.py and scripts/sft.py: the completion-only loss against a naive float64
loop, no gradient through prompt tokens, the record formats, and the script run as a user would (one and two
processes, TensorBoard read back, resume)."""

import json
import math

import pytest
import torch
import yaml
from helpers import DEMO_DATA, load_weights, read_scalars, results, run_script, small_dataset

from dpo_core import data as data_lib
from dpo_core.modeling import load_model, load_tokenizer
from dpo_core.sft import sft_forward, sft_step
from dpo_core.sft_data import collate_sft, tokenize_sft_records

SETTINGS = data_lib.TokenizeSettings(max_length=64)
MIXED = [  # one record of every format, completions of different lengths
    {"prompt": "Name a fruit.", "chosen": "An apple.", "rejected": "No."},
    {"chosen": "Q: colour of snow? A: white, like milk.", "rejected": "Q: colour of snow? A: blue."},
    {"prompt": "Say hi.", "completion": "Hello there, my good friend!"},
    {"prompt": [{"role": "user", "content": "What is rain?"}],
     "completion": [{"role": "assistant", "content": "Water from clouds."}]},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Who are you?"},
                  {"role": "assistant", "content": "I am Deep Qwen, an assistant."}]},
]


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")  # every test here trains in-process


def records_of(rows, source="mem.jsonl"):
    return [data_lib.Record(i, source, f"line {i + 1}", row) for i, row in enumerate(rows)]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(str(tiny_model_dir))


def naive_loss(model64, examples) -> float:
    """Each sequence alone (no padding, no mask), float64, one completion token at a time."""
    total, count = 0.0, 0
    for e in examples:
        ids = e.prompt_ids + e.chosen_ids
        with torch.no_grad():
            logits = model64(input_ids=torch.tensor([ids])).logits[0]
        for t in range(len(e.prompt_ids), len(ids)):  # completion tokens only; prompt tokens never counted
            total -= torch.log_softmax(logits[t - 1], -1)[ids[t]].item()
            count += 1
    return total / count


def test_sft_loss_equals_a_naive_float64_token_loop(tiny_model_dir, tokenizer):
    examples, problems = tokenize_sft_records(records_of(MIXED), tokenizer, SETTINGS)
    assert not problems and len(examples) == len(MIXED)
    assert len({len(e.chosen_ids) for e in examples}) > 2  # token mean != mean of row means
    model = load_model(str(tiny_model_dir), trainable=False)
    loss, stats = sft_step(model, collate_sft(examples, tokenizer.pad_token_id))
    expected = naive_loss(load_model(str(tiny_model_dir), trainable=False).double(), examples)
    assert loss.item() == pytest.approx(expected, abs=1e-5)
    assert stats["completion_tokens"].tolist() == [len(e.chosen_ids) for e in examples]
    # The mean of per-row means would differ: the loss really weights every token equally.
    row_means = (-stats["logps/completion"] / stats["completion_tokens"]).mean().item()
    assert abs(row_means - expected) > 1e-3


def test_prompt_and_padding_positions_get_exactly_zero_gradient(tiny_model_dir, tokenizer):
    """The logits' gradient is zero wherever the next token is a prompt token or padding, nonzero where it
    is a completion token (an off-by-one in the label shift or the mask fails this)."""
    examples, _ = tokenize_sft_records(records_of(MIXED), tokenizer, SETTINGS)
    model = load_model(str(tiny_model_dir))

    class Capture(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, **kwargs):
            out = self.inner(**kwargs)
            out.logits.retain_grad()
            self.logits = out.logits
            return out

    capture = Capture()
    batch = collate_sft(examples, tokenizer.pad_token_id)
    loss, _ = sft_step(capture, batch)
    loss.backward()
    grad = capture.logits.grad.abs().sum(-1)  # [B, T]
    for row, e in enumerate(examples):
        p, n = len(e.prompt_ids), len(e.prompt_ids) + len(e.chosen_ids)
        predicts_completion = torch.zeros(grad.shape[1], dtype=torch.bool)
        predicts_completion[p - 1: n - 1] = True  # position t predicts token t + 1
        assert (grad[row, ~predicts_completion] == 0).all(), row
        assert (grad[row, predicts_completion] > 0).all(), row


def test_preference_records_give_dpo_token_ids_and_messages_match_them(tokenizer):
    """SFT on a preference set trains on the chosen sequences DPO scores, token for token; the same
    conversation as a `messages` record (the chosen reply last) tokenizes identically."""
    records = data_lib.load_splits(str(DEMO_DATA), split="test")["train"][:40]
    dpo_examples, _ = data_lib.tokenize_records(records, tokenizer, SETTINGS)
    sft_examples, problems = tokenize_sft_records(records, tokenizer, SETTINGS)
    assert not problems
    assert [(e.id, e.prompt_ids, e.chosen_ids) for e in sft_examples] == \
        [(e.id, e.prompt_ids, e.chosen_ids) for e in dpo_examples]
    as_messages = records_of([{"messages": r.data["prompt"] + r.data["chosen"]} for r in records])
    msg_examples, problems = tokenize_sft_records(as_messages, tokenizer, SETTINGS)
    assert not problems
    assert [(e.prompt_ids, e.chosen_ids) for e in msg_examples] == \
        [(e.prompt_ids, e.chosen_ids) for e in dpo_examples]
    # A standard prompt/completion record: the completion ends in exactly one EOS, as in DPO.
    (single,), _ = tokenize_sft_records(records_of([MIXED[2]]), tokenizer, SETTINGS)
    assert single.chosen_ids[-1] == tokenizer.eos_token_id != single.chosen_ids[-2]
    assert "Hello there" in tokenizer.decode(single.chosen_ids) and "Say hi" in tokenizer.decode(single.prompt_ids)


def test_bad_records_are_reported_with_file_line_and_field(tokenizer, tmp_path):
    rows = [json.dumps(MIXED[2]),
            '{"prompt": "Hi", "completion": "Hello"',  # 2: malformed
            json.dumps({"messages": [{"role": "user", "content": "Hi"}]}),  # 3: no assistant turn at the end
            json.dumps({"prompt": "Hi", "completion": "   "}),  # 4: empty completion
            json.dumps({"text": "plain text"}),  # 5: no known format
            json.dumps({"completion": "Hello"}),  # 6: no prompt
            json.dumps({"messages": [{"role": "assistant", "content": "Hi"}]}),  # 7: nothing before the reply
            json.dumps({"prompt": "Hi", "chosen": "Hello", "rejected": "Hello"}),  # 8: identical pair
            json.dumps({"prompt": [{"role": "user", "content": "Hi"}], "completion": "Hello"})]  # 9: mixed
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(rows) + "\n")
    with pytest.raises(data_lib.DataValidationError) as info:
        data_lib.prepare_examples(str(path), tokenizer, SETTINGS, tokenize=tokenize_sft_records)
    message = str(info.value)
    expected = {2: "json", 3: "messages", 4: "completion", 5: "completion", 6: "prompt", 7: "messages",
                8: "rejected", 9: "prompt"}
    for line, field in expected.items():
        assert f"{path}, line {line}, field '{field}'" in message, (line, field, message)
    assert "line 1," not in message
    assert info.value.counts["records"] == len(expected)


# ------------------------------------------------------------------------------------------ the script
def sft_args(model, data, out, *extra):
    return ["--model_name_or_path", str(model), "--dataset_name", str(data), "--output_dir", str(out),
            "--max_length", "64", "--learning_rate", "5e-3", "--logging_steps", "1", "--seed", "3",
            "--eval_split", "test", *extra]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return small_dataset(tmp_path_factory.mktemp("data"), n_train=24, n_test=15)


@pytest.fixture(scope="module")
def full_run(tiny_model_dir, data_dir, tmp_path_factory):
    """4 steps of 2 micro-batches of 2, checkpoints at steps 2 and 4, evaluation at 0, 2 and 4; the
    step count comes from the command line over the YAML's."""
    out = tmp_path_factory.mktemp("sft") / "full"
    config = out.parent / "sft.yaml"
    config.write_text(yaml.safe_dump({"max_steps": 99, "eval_steps": 2, "eval_on_start": True,
                                      "beta": 0.5}))  # a DPO key: ignored by sft.py
    run_script("sft.py", ["--config", str(config), *sft_args(
        tiny_model_dir, data_dir, out, "--max_steps", "4", "--per_device_train_batch_size", "2",
        "--gradient_accumulation_steps", "2", "--save_steps", "2")])
    return out


@pytest.mark.slow
def test_script_logs_saves_and_evaluates_the_token_weighted_loss(tiny_model_dir, data_dir, full_run):
    scalars = read_scalars(full_run / "logs")
    for tag in ("loss", "learning_rate", "grad_norm", "tokens_per_second", "logps/completion"):
        assert set(scalars[f"train/{tag}"]) == {1, 2, 3, 4}, tag
    assert set(scalars["eval/loss"]) == set(scalars["eval/perplexity"]) == {0, 2, 4}
    for step, loss in scalars["eval/loss"].items():
        assert scalars["eval/perplexity"][step] == pytest.approx(math.exp(loss), rel=1e-5)
    assert scalars["eval/loss"][4] < scalars["eval/loss"][0]
    # eval/loss at step 0 is the initial model's NLL over every held-out completion token.
    tokenizer = load_tokenizer(str(tiny_model_dir))
    records = data_lib.load_splits(str(data_dir), split="test")["train"]
    examples, _ = tokenize_sft_records(records, tokenizer, SETTINGS)
    model = load_model(str(tiny_model_dir), trainable=False)
    with torch.no_grad():
        logps, lengths = sft_forward(model, collate_sft(examples, tokenizer.pad_token_id))
    assert scalars["eval/loss"][0] == pytest.approx((-logps.sum() / lengths.sum()).item(), abs=1e-5)
    final = results(full_run)
    assert final["global_step"] == 4 and final["eval_loss"] == pytest.approx(scalars["eval/loss"][4], abs=1e-6)
    resolved = yaml.safe_load((full_run / "config.yaml").read_text())
    assert resolved["max_steps"] == 4 and "beta" not in resolved
    assert (full_run / "model.safetensors").exists() and (full_run / "tokenizer.json").exists()
    assert sorted(p.name for p in (full_run / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]
    # The output is a model directory that loads as DPO's policy (the API test trains DPO from one).
    assert load_model(str(full_run)).config.vocab_size == model.config.vocab_size


@pytest.mark.slow
def test_resume_from_checkpoint_gives_the_uninterrupted_weights(tiny_model_dir, data_dir, full_run, tmp_path):
    resumed = tmp_path / "resumed"
    run_script("sft.py", sft_args(tiny_model_dir, data_dir, resumed, "--max_steps", "4",
                                  "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2",
                                  "--resume_from_checkpoint", str(full_run / "checkpoints" / "checkpoint-2")))
    full, again = load_weights(full_run), load_weights(resumed)
    assert any(not torch.equal(full[k], w) for k, w in load_weights(tiny_model_dir).items())
    for key in full:
        torch.testing.assert_close(again[key], full[key], atol=1e-6, rtol=0)
    assert set(read_scalars(resumed / "logs")["train/loss"]) == {3, 4}


@pytest.mark.slow
def test_two_processes_equal_one_process_accumulating_their_micro_batches(tiny_model_dir, data_dir, full_run,
                                                                          tmp_path):
    """2 ranks x batch 2 == 1 rank x batch 2 x 2 accumulation steps: each micro-batch's token mean counts
    once in both (the documented averaging), so losses and weights agree; the held-out loss counts every
    example once although 15 examples do not split evenly over 2 ranks."""
    two = tmp_path / "two"
    proc = run_script("sft.py", sft_args(tiny_model_dir, data_dir, two, "--max_steps", "4",
                                         "--per_device_train_batch_size", "2", "--eval_steps", "2",
                                         "--eval_on_start"), processes=2)
    assert "num_processes 2" in proc.stdout and results(two)["num_processes"] == 2
    one, both = read_scalars(full_run / "logs"), read_scalars(two / "logs")
    for tag, steps in (("train/loss", [1, 2, 3, 4]), ("eval/loss", [0, 2, 4])):
        assert sorted(both[tag]) == steps, tag
        for step in steps:
            assert both[tag][step] == pytest.approx(one[tag][step], abs=1e-5), (tag, step)
    w1, w2 = load_weights(full_run), load_weights(two)
    for key in w1:  # Adam amplifies all-reduce ordering noise on near-zero gradients (see test_dpo_script)
        torch.testing.assert_close(w2[key], w1[key], atol=1e-4, rtol=1e-4)


def test_shipped_demo_files_are_what_the_generators_write(tmp_path):
    """`data/demo` and `data/demo_sft` are exactly `dpo_core.demo`'s output (no hand edits that drift), and the
    demonstrations hold none of the preferences DPO teaches: the old name only, both sign-off styles."""
    from dpo_core import demo

    for name, write in (("demo", demo.write_demo_dataset), ("demo_sft", demo.write_demo_sft_dataset)):
        written = write(tmp_path / name)
        for split in ("train", "test"):
            assert (written / f"{split}.jsonl").read_text() == (DEMO_DATA.parent / name / f"{split}.jsonl").read_text()
    completions = [r["completion"][-1]["content"] for r in demo.demo_sft_dataset()["train"]]
    assert not any(demo.NEW_NAME in c for c in completions)
    assert any(demo.OLD_NAME in c for c in completions)
    polite = sum(c.endswith(tuple(demo._SIGNOFF_GOOD)) for c in completions)
    curt = sum(c.endswith(tuple(demo._SIGNOFF_BAD)) for c in completions)
    assert polite > 10 and curt > 10
