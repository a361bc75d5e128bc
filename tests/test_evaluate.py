"""scripts/evaluate.py and dpo_core.evaluate: every number recomputed independently (float64, one pair and
one sequence at a time), one process against two, a model against itself, the reward model's win rate,
the sampled KL against an exact enumeration, TensorBoard curves and the PNG."""

import json
import math
import struct

import pytest
import torch
from helpers import run_script, small_dataset

from dpo_core import data as data_lib
from dpo_core.demo import build_tiny_model
from dpo_core.evaluate import kl_summary, named_paths, sampled_log_ratios
from dpo_core.generation import chat_prompt_ids
from dpo_core.modeling import load_model, load_tokenizer
from dpo_core.report import read_training_curves

BETA = 0.1
CURVES = {"train/loss": {1: 0.69, 2: 0.6, 3: 0.5}, "eval/rewards/accuracies": {2: 0.75, 3: 1.0}}


pytestmark = pytest.mark.usefixtures("one_thread")


def sharpened_policy(path):
    """Another random tiny model, its output layer scaled: distributions far from the reference's."""
    build_tiny_model(path, seed=1)
    model = load_model(str(path))
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    model.save_pretrained(path)
    return path


def tiny_reward_model(path, tokenizer):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id)
    model = LlamaForSequenceClassification(config)
    with torch.no_grad():
        model.score.weight.mul_(50.0)  # scores that differ visibly between answers
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_run(path):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(path / "logs"))
    for tag, points in CURVES.items():
        for step, value in points.items():
            writer.add_scalar(tag, value, step)
    writer.close()
    return path


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    tok = load_tokenizer(str(tiny_model_dir))
    paths = {"ref": tiny_model_dir, "pol": sharpened_policy(root / "pol"), "data": small_dataset(root / "data", 4, 12),
             "rm": tiny_reward_model(root / "rm", tok), "run": write_run(root / "run")}
    args = ["--models", f"pol={paths['pol']}", f"same={paths['ref']}", "--reference_model", str(paths["ref"]),
            "--dataset_name", str(paths["data"]), "--eval_split", "test", "--max_length", "64", "--beta", str(BETA),
            "--per_device_eval_batch_size", "5", "--kl_samples", "2", "--kl_max_prompts", "3",
            "--max_new_tokens", "6", "--generation_prompts", "3", "--reward_model", str(paths["rm"]),
            "--run_dirs", f"myrun={paths['run']}"]
    one = run_script("evaluate.py", [*args, "--output_dir", str(root / "one")])
    two = run_script("evaluate.py", [*args, "--output_dir", str(root / "two")], processes=2)
    return {**paths, "one": root / "one", "two": root / "two", "stdout": one.stdout, "stdout2": two.stdout}


def results(out):
    return json.loads((out / "results.json").read_text())


def naive_logps(model, prompt, completion):
    """Float64, one sequence, a Python loop over completion tokens: (sum log p, [per-position logits])."""
    ids = prompt + completion
    logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    total, rows = 0.0, []
    for t in range(len(prompt), len(ids)):
        total += torch.log_softmax(logits[t - 1], -1)[ids[t]].item()
        rows.append(logits[t - 1])
    return total, rows


def naive_pair_logps(pol, ref, e):
    """`naive_logps` of both models on an example's two completions: (pc, pr, rc, rr, pol_rows, ref_rows), the rows
    of the chosen completion."""
    pc, pol_rows = naive_logps(pol, e.prompt_ids, e.chosen_ids)
    pr, _ = naive_logps(pol, e.prompt_ids, e.rejected_ids)
    rc, ref_rows = naive_logps(ref, e.prompt_ids, e.chosen_ids)
    rr, _ = naive_logps(ref, e.prompt_ids, e.rejected_ids)
    return pc, pr, rc, rr, pol_rows, ref_rows


@pytest.mark.slow
def test_metrics_equal_a_naive_float64_recomputation(setup):
    tok = load_tokenizer(str(setup["ref"]))
    pol = load_model(str(setup["pol"]), trainable=False).double()
    ref = load_model(str(setup["ref"]), trainable=False).double()
    settings = data_lib.TokenizeSettings(max_length=64)
    _, examples = data_lib.prepare_examples(str(setup["data"]), tok, settings, split="train", eval_split="test")
    margins, wins, ties, nll, n_tokens, kl = [], 0, 0, 0.0, 0, 0.0
    with torch.no_grad():
        for e in examples["eval"]:
            pc, pr, rc, rr, pol_rows, ref_rows = naive_pair_logps(pol, ref, e)
            margin = BETA * ((pc - rc) - (pr - rr))
            tol = 1e-5 * BETA * (abs(pc) + abs(pr))
            wins += margin > tol
            ties += abs(margin) <= tol
            margins.append(margin)
            nll -= pc
            n_tokens += len(e.chosen_ids)
            for p_logits, q_logits in zip(pol_rows, ref_rows):
                p, q = torch.softmax(p_logits, -1), torch.softmax(q_logits, -1)
                kl += sum(p[v].item() * (math.log(p[v].item()) - math.log(q[v].item())) for v in range(len(p)))
    got = results(setup["one"])["models"]["pol"]
    n = len(margins)
    assert got["num_pairs"] == n == 12 and got["num_chosen_tokens"] == n_tokens
    assert 0 < wins < n  # a test set where accuracy is neither trivially 0 nor 1
    assert got["accuracy"] == pytest.approx(wins / n, abs=1e-4)
    assert got["ties"] == pytest.approx(ties / n, abs=1e-4)
    assert got["accuracy_ties_half"] == pytest.approx((wins + ties / 2) / n, abs=1e-4)
    assert got["reward_margin"]["mean"] == pytest.approx(sum(margins) / n, abs=1e-4)
    ordered = torch.tensor(margins, dtype=torch.float64)
    for q in ("0.0", "0.25", "0.5", "0.95", "1.0"):
        assert got["reward_margin"]["quantiles"][q] == pytest.approx(torch.quantile(ordered, float(q)).item(), abs=1e-4)
    assert sum(got["reward_margin"]["histogram"]["counts"]) == n
    assert got["perplexity"] == pytest.approx(math.exp(nll / n_tokens), rel=1e-3)
    assert got["kl_token_level"] == pytest.approx(kl / n_tokens, rel=1e-4, abs=1e-6)
    assert got["kl_token_level"] > 0.1
    ref_nll = -sum(naive_logps(ref, e.prompt_ids, e.chosen_ids)[0] for e in examples["eval"])
    reference = results(setup["one"])["models"]["reference"]
    assert reference["perplexity"] == pytest.approx(math.exp(ref_nll / n_tokens), rel=1e-3)


@pytest.mark.slow
def test_a_model_against_itself(setup):
    models = results(setup["one"])["models"]
    same = models["same"]
    assert same["accuracy"] == 0.0 and same["ties"] == 1.0 and same["accuracy_ties_half"] == 0.5
    assert same["reward_margin"]["mean"] == 0.0 and same["kl_token_level"] == 0.0
    assert same["kl_sampled"]["mean"] == 0.0 and same["kl_sampled"]["stderr"] == 0.0
    assert same["kl_sampled"]["num_samples"] == 6 and same["kl_sampled"]["num_prompts"] == 3
    assert same["win_rate"]["ties"] == 1.0 and same["win_rate"]["win_rate"] == 0.0
    assert same["perplexity"] == models["reference"]["perplexity"]
    assert models["pol"]["kl_sampled"]["mean"] > 0


@pytest.mark.slow
def test_two_processes_give_the_results_of_one(setup):
    assert "num_processes 2" in setup["stdout2"] and "num_processes 1" in setup["stdout"]
    one, two = results(setup["one"]), results(setup["two"])
    one.pop("settings"), two.pop("settings")  # output_dir differs

    def compare(a, b, where):
        if isinstance(a, dict):
            assert a.keys() == b.keys(), where
            for key in a:
                compare(a[key], b[key], f"{where}/{key}")
        elif isinstance(a, list):
            assert len(a) == len(b), where
            for i, (x, y) in enumerate(zip(a, b)):
                compare(x, y, f"{where}[{i}]")
        elif isinstance(a, float):
            assert b == pytest.approx(a, abs=1e-5, rel=1e-5), where
        else:
            assert a == b, where

    compare(one, two, "results")
    samples = [json.loads((setup[k] / "generation_samples.json").read_text()) for k in ("one", "two")]
    assert [s["answers"] for s in samples[0]] == [s["answers"] for s in samples[1]]


@pytest.mark.slow
def test_win_rate_from_reward_scores_recomputed(setup):
    from transformers import AutoModelForSequenceClassification

    rm = AutoModelForSequenceClassification.from_pretrained(str(setup["rm"])).eval()
    tok = load_tokenizer(str(setup["rm"]))
    samples = json.loads((setup["one"] / "generation_samples.json").read_text())
    assert len(samples) == 3
    scores = {}
    with torch.no_grad():
        for s in samples:
            for name, answer in s["answers"].items():
                ids = tok.apply_chat_template(s["prompt"] + [{"role": "assistant", "content": answer}],
                                              tokenize=True, return_dict=True)["input_ids"]
                score = rm(input_ids=torch.tensor([ids])).logits[0, 0].item()  # one row: no padding
                assert s["rewards"][name] == pytest.approx(score, abs=1e-4)
                scores[s["id"], name] = score
    got = results(setup["one"])["models"]["pol"]["win_rate"]
    wins = sum(scores[s["id"], "pol"] > scores[s["id"], "reference"] + 1e-4 for s in samples)
    ties = sum(s["answers"]["pol"] == s["answers"]["reference"] for s in samples)
    assert got["win_rate"] == pytest.approx(wins / 3) and got["ties"] == pytest.approx(ties / 3)
    assert got["num_prompts"] == 3 and ties < 3  # the policy answers differently from the reference


@pytest.mark.slow
def test_table_png_and_training_curves(setup):
    table = [line for line in setup["stdout"].splitlines() if line.startswith("|")]
    assert table[0] == "| metric | reference | pol | same |"
    assert any(line.startswith("| preference accuracy (ties apart) | — |") for line in table)
    assert any(line.startswith("| win rate vs reference") for line in table)
    png = (setup["one"] / "evaluation.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])  # the IHDR chunk
    assert 600 <= width <= 4000 and 300 <= height <= 4000 and len(png) > 10_000
    curves = results(setup["one"])["training_curves"]["myrun"]
    for tag, points in CURVES.items():
        assert curves[tag]["steps"] == list(points)
        assert curves[tag]["values"] == pytest.approx(list(points.values()))
    with pytest.raises(FileNotFoundError, match="no TensorBoard event files"):
        read_training_curves(setup["data"])


@pytest.mark.slow
def test_sampled_kl_matches_exact_enumeration(setup):
    """Two new tokens at most: KL(pi || ref) = sum_y1 p(y1) [log p(y1)/q(y1) + (y1 != EOS) KL(p(.|y1) || q(.|y1))],
    enumerated over the whole vocabulary in float64; the estimate from 2000 samples is within 4 standard errors."""
    tok = load_tokenizer(str(setup["ref"]))
    pol = load_model(str(setup["pol"]), trainable=False)
    ref = load_model(str(setup["ref"]), trainable=False)
    with torch.no_grad():  # a milder policy than the saved one: sampled sequences vary
        pol.lm_head.weight.mul_(0.25)
    x = chat_prompt_ids(tok, "What is your name?")
    n = 2000
    ratios = sampled_log_ratios(pol, ref, tok, [x] * n, list(range(n)), max_new_tokens=2, batch_size=500)
    with torch.no_grad():
        def dist(model, rows):
            return torch.log_softmax(model(input_ids=torch.tensor(rows)).logits[:, -1].double(), -1)

        lp1, lq1 = dist(pol, [x])[0], dist(ref, [x])[0]
        exact = (lp1.exp() * (lp1 - lq1)).sum().item()
        nexts = [v for v in range(lp1.shape[0]) if v != tok.eos_token_id]
        lp2, lq2 = dist(pol, [x + [v] for v in nexts]), dist(ref, [x + [v] for v in nexts])
        exact += (lp1.exp()[nexts] * (lp2.exp() * (lp2 - lq2)).sum(-1)).sum().item()
    stderr = ratios.std().item() / math.sqrt(n)
    assert exact > 0.05 and stderr < exact / 5
    assert abs(ratios.mean().item() - exact) < 4 * stderr
    summary = kl_summary({0: ratios[:1000].tolist(), 1: ratios[1000:].tolist()})
    assert summary["mean"] == pytest.approx(ratios.mean().item()) and summary["num_samples"] == n


def test_named_paths():
    assert named_paths(["sft=runs/sft", "runs/dpo/", "a/b=c"], "--models") == [
        ("sft", "runs/sft"), ("dpo", "runs/dpo/"), ("b=c", "a/b=c")]
    with pytest.raises(ValueError, match="repeat"):
        named_paths(["x=a", "x=b"], "--models")
    with pytest.raises(ValueError, match="reference"):
        named_paths(["reference=a"], "--models")


def test_every_flag_of_the_new_scripts_has_help():
    from dataclasses import fields

    from dpo_core.config import EvalArguments, GenerationArguments, IdentityArguments

    for group in (EvalArguments, GenerationArguments, IdentityArguments):
        for f in fields(group):
            assert len(f.metadata.get("help", "")) > 5, f"{group.__name__}.{f.name} has no help"


def unpaired_dataset(path, n_test):
    """An unpaired (KTO) test split from the demo pairs: desirable and undesirable completions interleaved, every
    third prompt with its undesirable completion only."""
    from helpers import DEMO_DATA

    path.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 4), ("test", n_test)):
        pairs = [json.loads(line) for line in (DEMO_DATA / f"{split}.jsonl").read_text().splitlines()[:n]]
        rows = [{"prompt": r["prompt"], "completion": r[side], "label": side == "chosen"}
                for i, r in enumerate(pairs) for side in (("chosen", "rejected") if i % 3 else ("rejected",))]
        (path / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.mark.slow
def test_unpaired_files_get_kto_metrics_recomputed_naively(setup, tmp_path):
    """KTO's held-out metrics: each example's log-ratio against the KL point (the mean log-ratio of the mismatched
    prompt / KL-completion rows, clamped at 0), per label, recomputed one sequence at a time in float64; the KL
    completions are those dpo.py --loss_type kto trains on (blocks of the eval batch size)."""
    from dpo_core.kto_data import KTOTokenize, kto_labels

    data = unpaired_dataset(tmp_path / "data", 9)
    out = tmp_path / "eval"
    flat = load_model(str(setup["ref"]))  # flatter than the reference: mismatched completions gain log-prob
    with torch.no_grad():
        flat.lm_head.weight.mul_(0.3)
    flat.save_pretrained(tmp_path / "flat")
    proc = run_script("evaluate.py", ["--models", f"pol={tmp_path / 'flat'}", "--reference_model", str(setup["ref"]),
                                      "--dataset_name", str(data), "--eval_split", "test", "--max_length", "64",
                                      "--beta", str(BETA), "--per_device_eval_batch_size", "4", "--kl_samples", "0",
                                      "--generation_prompts", "2", "--max_new_tokens", "4", "--output_dir", str(out)])
    tok = load_tokenizer(str(setup["ref"]))
    pol = load_model(str(tmp_path / "flat"), trainable=False).double()
    ref = load_model(str(setup["ref"]), trainable=False).double()
    _, examples = data_lib.prepare_examples(str(data), tok, data_lib.TokenizeSettings(max_length=64), split="train",
                                            eval_split="test", tokenize=KTOTokenize(4))
    rows = []
    with torch.no_grad():
        for e in examples["eval"]:
            lp, kp, lr, kr, _, _ = naive_pair_logps(pol, ref, e)  # the completion, and the KL completion
            rows.append((bool(kto_labels(e.id)), lp - lr, kp - kr, lp))
    point = max(0.0, sum(r[2] for r in rows) / len(rows))
    right = [(ratio > point) == desirable for desirable, ratio, _, _ in rows]
    got = results(out)
    assert got["format"] == "unpaired" and got["num_examples"] == len(rows) == 15
    pol_metrics = got["models"]["pol"]
    assert pol_metrics["kl_point"] == pytest.approx(point, abs=1e-4) and point > 0
    for name, want in (("desirable", True), ("undesirable", False)):
        mine = [ok for ok, (desirable, *_) in zip(right, rows) if desirable == want]
        assert pol_metrics[f"accuracy/{name}"] == pytest.approx(sum(mine) / len(mine))
        assert pol_metrics[f"rewards/{name}"] == pytest.approx(
            BETA * sum(r[1] for r in rows if r[0] == want) / len(mine), abs=1e-5)
    assert 0 < sum(right) < len(rows) and pol_metrics["accuracy"] == pytest.approx(sum(right) / len(rows))
    margins = [BETA * (ratio - point) * (1 if desirable else -1) for desirable, ratio, _, _ in rows]
    assert pol_metrics["reward_margin"]["mean"] == pytest.approx(sum(margins) / len(rows), abs=1e-5)
    assert pol_metrics["num_desirable"] == sum(r[0] for r in rows) == 6
    reference = got["models"]["reference"]
    assert reference["logps/undesirable"] == pytest.approx(
        sum(r[3] - r[1] for r in rows if not r[0]) / 9, rel=1e-4)
    table = [line for line in proc.stdout.splitlines() if line.startswith("|")]
    assert any(line.startswith("| undesirable below the KL point | — | ") for line in table)
    assert "Held-out unpaired examples: 15" in proc.stdout
    samples = json.loads((out / "generation_samples.json").read_text())
    assert [s["prompt"] for s in samples] == [json.loads(line)["prompt"]
                                             for line in (data / "test.jsonl").read_text().splitlines()[:2]]


def test_kto_metrics_clamp_the_kl_point_and_count_ties():
    """A negative mean KL log-ratio is clamped to 0; a log-ratio equal to the point is a tie, not a win."""
    from dpo_core.kto import kto_metrics

    scores = {"ids": torch.tensor([0, 1, 2, 5]),  # desirable, undesirable, desirable, undesirable
              "chosen_logps": torch.tensor([-10.0, -10.0, -12.0, -9.0]),
              "ref_chosen_logps": torch.tensor([-11.0, -10.0, -11.0, -10.0]),
              "rejected_logps": torch.tensor([-20.0, -21.0, -22.0, -23.0]),
              "ref_rejected_logps": torch.tensor([-19.0, -20.0, -21.0, -22.0]),
              "chosen_nll": torch.tensor([10.0, 10.0, 12.0, 9.0]), "chosen_tokens": torch.tensor([5, 5, 6, 4]),
              "kl_sum": torch.tensor([0.5, 0.0, 0.5, 1.0])}
    metrics, margins = kto_metrics(scores, beta=0.5)
    assert metrics["kl_point"] == 0.0
    assert margins.tolist() == pytest.approx([0.5, 0.0, -0.5, -0.5])
    assert metrics["accuracy/desirable"] == 0.5 and metrics["accuracy/undesirable"] == 0.0
    assert metrics["ties"] == 0.25 and metrics["accuracy"] == 0.25 and metrics["accuracy_ties_half"] == 0.375
    assert metrics["rewards/desirable"] == pytest.approx(0.0) and metrics["rewards/undesirable"] == pytest.approx(0.25)
    assert metrics["perplexity"] == pytest.approx(math.exp(41 / 20)) and metrics["kl_token_level"] == pytest.approx(0.1)
