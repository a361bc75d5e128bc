"""dpo_core.generation: chat-template prompts, greedy answers equal to a manual greedy loop, left padding,
seeded per-prompt sampling, the sampler's distribution, question files, and scripts/generate.py."""

import json

import pytest
import torch
from helpers import run_script

from dpo_core.generation import PerRowSampler, chat_prompt_ids, generate, generate_ids, read_questions
from dpo_core.modeling import load_model, load_tokenizer

QUESTIONS = ["What is your name?", "Tell me about a very long river that flows to the sea, please.", "Hi"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(str(tiny_model_dir), trainable=False), load_tokenizer(str(tiny_model_dir))


def manual_greedy(model, prompt: list[int], n: int, eos: int) -> list[int]:
    """Full recomputation every step, one sequence, no padding, no cache."""
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            token = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            out.append(token)
            ids.append(token)
            if token == eos:
                break
    return out


def test_prompt_is_the_chat_template_with_generation_prompt(tiny):
    _, tok = tiny
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    expected = tok.apply_chat_template(messages, tokenize=True, return_dict=True, add_generation_prompt=True)
    assert chat_prompt_ids(tok, "Hi", "Be brief.") == list(expected["input_ids"])
    assert tok.decode(chat_prompt_ids(tok, "Hi")).endswith("<|im_start|>assistant\n")


def test_greedy_batched_left_padded_equals_manual_loop(tiny):
    model, tok = tiny
    answers = generate(model, tok, QUESTIONS, max_new_tokens=10, batch_size=2)  # rows of different lengths
    for question, answer in zip(QUESTIONS, answers):
        ids = manual_greedy(model, chat_prompt_ids(tok, question), 10, tok.eos_token_id)
        assert answer == tok.decode(ids, skip_special_tokens=True).strip()
    assert generate(model, tok, QUESTIONS, max_new_tokens=10, batch_size=3) == answers  # deterministic


def test_sampling_is_seeded_per_prompt_whatever_the_batching(tiny):
    model, tok = tiny
    prompts = [chat_prompt_ids(tok, q) for q in QUESTIONS]
    kwargs = dict(max_new_tokens=8, do_sample=True, temperature=1.3, top_p=0.95)
    together = generate_ids(model, tok, prompts, seeds=[5, 6, 7], batch_size=3, **kwargs)
    alone = [generate_ids(model, tok, [p], seeds=[s], batch_size=1, **kwargs)[0] for p, s in zip(prompts, [5, 6, 7])]
    assert together == alone
    assert generate_ids(model, tok, prompts, seeds=[8, 9, 10], batch_size=3, **kwargs) != together
    greedy = generate_ids(model, tok, prompts, max_new_tokens=8)
    assert together != greedy  # sampling at temperature 1.3 from a random model does not retrace argmax
    assert generate(model, tok, QUESTIONS, seed=3, **kwargs) == generate(model, tok, QUESTIONS, seed=3, **kwargs)


def test_sampler_draws_from_the_warped_distribution():
    """4000 draws from a 5-token distribution: frequencies within 0.03 of softmax(logits / T); top-p cuts
    the tail exactly (tokens outside the nucleus are never drawn)."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]])
    n = 4000
    for temperature, top_p in ((1.0, 1.0), (0.7, 1.0), (1.0, 0.8)):
        counts = torch.zeros(5)
        sampler = PerRowSampler(list(range(n)), temperature=temperature, top_p=top_p)
        out = sampler(torch.zeros((n, 1), dtype=torch.long), logits.repeat(n, 1))
        assert torch.isfinite(out).sum(-1).eq(1).all()  # exactly one token survives per row
        counts += torch.bincount(out.argmax(-1), minlength=5)
        probs = torch.softmax(logits[0] / temperature, -1)
        if top_p < 1:  # the smallest set of top tokens whose mass reaches top_p
            keep = (probs.cumsum(-1) - probs) < top_p
            probs = torch.where(keep, probs, 0.0) / probs[keep].sum()
            assert counts[~keep].sum() == 0
        assert (counts / n - probs).abs().max() < 0.03


def test_read_questions(tmp_path):
    txt = tmp_path / "q.txt"
    txt.write_text("# identity\nWho are you?\n\n  What is rain?  \n")
    assert read_questions(txt) == ["Who are you?", "What is rain?"]
    jsonl = tmp_path / "q.jsonl"
    jsonl.write_text('"Who are you?"\n{"question": "Why?"}\n{"prompt": "How?"}\n')
    assert read_questions(jsonl) == ["Who are you?", "Why?", "How?"]
    jsonl.write_text('{"question": "ok"}\n{"q": 1}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_questions(jsonl)


@pytest.mark.slow
def test_generate_script_side_by_side(tiny_model_dir, tmp_path):
    out = tmp_path / "answers.json"
    proc = run_script("generate.py", ["--models", f"a={tiny_model_dir}", f"b={tiny_model_dir}",
                                      "--question", "What is your name?", "--question", "What is rain?",
                                      "--max_new_tokens", "6", "--output_file", str(out)])
    answers_block, stats_block = proc.stdout.strip().split("\n\n")[-2:]
    table = [line for line in answers_block.splitlines() if line.startswith("|")]
    assert table[0] == "| question | a | b |" and len(table) == 4
    saved = json.loads(out.read_text())
    model, tok = load_model(str(tiny_model_dir), trainable=False), load_tokenizer(str(tiny_model_dir))
    expected = generate(model, tok, ["What is your name?", "What is rain?"], max_new_tokens=6)
    assert [row["answers"]["a"] for row in saved["answers"]] == expected
    assert [row["answers"]["b"] for row in saved["answers"]] == expected
    # the words-per-answer table: one row per model, mean words counted here independently
    stats = [line.split("|")[1:-1] for line in stats_block.splitlines()[2:]]
    mean_words = sum(len(a.split()) for a in expected) / len(expected)
    assert [cells[0].strip() for cells in stats] == ["a", "b"]
    assert all(int(cells[1]) == 2 and abs(float(cells[2]) - mean_words) < 0.051 for cells in stats)
    assert saved["stats"]["a"]["answers"] == 2
