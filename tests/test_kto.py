"""KTO and APO-zero-unpaired (dpo_core/losses/unpaired.py) against TRL 1.16's `KTOTrainer._compute_loss` itself
(a test-only oracle, called with the attributes it reads and a model stand-in returning given log-probs): the
loss, the KL point and the logged rewards, float64, 1e-6, on random, extreme and one-sided batches."""

import json
import types
from collections import defaultdict

import pytest
import torch

from dpo_core.losses.unpaired import UNPAIRED_LOSSES, kl_point, kto_loss

trl_kto = pytest.importorskip("trl.trainer.kto_trainer")


def trl_compute_loss(policy, ref, policy_kl, ref_kl, labels, *, loss_type, beta, desirable_weight=1.0,
                     undesirable_weight=1.0):
    """TRL's `_compute_loss` with precomputed reference log-probs: (loss, its logged metrics)."""
    b, t = len(labels), 4
    log_probs = torch.zeros(b, t - 1, dtype=torch.float64)
    log_probs[:, 0] = policy  # the model's per-token log-probs; TRL sums them over the sequence
    outputs = types.SimpleNamespace(log_probs=log_probs, entropy=torch.zeros(b, t - 1, dtype=torch.float64),
                                    mean_logits=torch.zeros(b, t - 1, dtype=torch.float64))
    calculate_kl = loss_type == "kto"
    fake = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True),
        accelerator=types.SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x),
        precompute_ref_logps=True, calculate_KL=calculate_kl, loss_type=loss_type, beta=beta,
        desirable_weight=desirable_weight, undesirable_weight=undesirable_weight, aux_loss_enabled=False,
        _metrics={"train": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
        _compute_kl_logps=lambda model, batch: policy_kl if calculate_kl else None)
    ones = torch.ones(b, t, dtype=torch.long)
    batch = {"input_ids": torch.zeros(b, t, dtype=torch.long), "attention_mask": ones, "completion_mask": ones,
             "label": labels, "ref_logps": ref, "ref_KL_logps": ref_kl if calculate_kl else None}
    loss = trl_kto.KTOTrainer._compute_loss(fake, lambda **kwargs: outputs, batch, return_outputs=False)
    return loss, {k: v[-1] for k, v in fake._metrics["train"].items()}


def batches():
    g = torch.Generator().manual_seed(0)
    for b, scale in ((8, 5.0), (5, 80.0), (6, 1e-3)):
        policy, ref, pkl, rkl = (-scale * torch.rand(b, generator=g, dtype=torch.float64) for _ in range(4))
        labels = torch.rand(b, generator=g) < 0.5
        labels[0], labels[-1] = True, False
        yield policy, ref, pkl, rkl, labels
    policy = torch.tensor([-1e4, -0.0, -350.0, -2.0], dtype=torch.float64)  # extreme and empty completions
    yield policy, policy.flip(0), policy.roll(1), torch.zeros(4, dtype=torch.float64), torch.tensor([1, 0, 1, 0]).bool()
    yield policy, policy + 3, policy.roll(1), policy, torch.ones(4, dtype=torch.bool)  # only desirable ones
    yield policy, policy - 3, policy - 1, policy, torch.zeros(4, dtype=torch.bool)  # only undesirable ones


@pytest.mark.parametrize("loss_type", sorted(UNPAIRED_LOSSES))
@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.33, 0.5)])
def test_losses_equal_trl_compute_loss(loss_type, weights):
    beta = 0.1 if loss_type == "kto" else 0.3
    for policy, ref, pkl, rkl, labels in batches():
        want, metrics = trl_compute_loss(policy, ref, pkl, rkl, labels, loss_type=loss_type, beta=beta,
                                         desirable_weight=weights[0], undesirable_weight=weights[1])
        kl = kl_point(pkl, rkl) if loss_type == "kto" else None
        losses, rewards = kto_loss(policy, ref, labels, loss_type=loss_type, beta=beta, kl=kl,
                                   desirable_weight=weights[0], undesirable_weight=weights[1])
        assert losses.dtype == torch.float64
        torch.testing.assert_close(losses.mean(), want, atol=1e-6, rtol=1e-6)
        if loss_type == "kto":
            assert kl.item() == pytest.approx(metrics["kl"], abs=1e-6)
        for key, subset in (("rewards/chosen", labels), ("rewards/rejected", ~labels)):
            if subset.any():
                assert rewards[subset].mean().item() == pytest.approx(metrics[key], abs=1e-6), key
            else:
                assert key not in metrics


def test_kl_point_is_averaged_over_processes_clamped_and_detached():
    policy_kl = torch.tensor([-1.0, -3.0], requires_grad=True)
    ref_kl = torch.tensor([-2.0, -2.5])
    kl = kl_point(policy_kl, ref_kl)
    assert kl.item() == pytest.approx(0.25) and not kl.requires_grad
    assert kl_point(policy_kl, ref_kl, reduce_mean=lambda x: (x + torch.tensor(-1.0)) / 2).item() == 0.0  # clamped
    with pytest.raises(ValueError, match="needs the KL point"):
        kto_loss(policy_kl, ref_kl, torch.tensor([True, False]), loss_type="kto")


# ------------------------------------------------------------------------------------------------ the data

def trl_kto_dataset(rows, tokenizer, batch_size):
    """TRL 1.16's own `KTOTrainer._prepare_dataset` (unpairing, EOS, tokenization, KL rotation)."""
    from datasets import Dataset

    fake = types.SimpleNamespace(_tokenizer=tokenizer, calculate_KL=True, desirable_weight=1.0,
                                 undesirable_weight=1.0)
    args = types.SimpleNamespace(dataset_num_proc=None, max_length=None, per_device_train_batch_size=batch_size)
    return trl_kto.KTOTrainer._prepare_dataset(fake, Dataset.from_list(rows), tokenizer, args, "train").to_list()


def _records(rows, source="mem"):
    from dpo_core.records import Record

    return [Record(i, source, f"line {i + 1}", row) for i, row in enumerate(rows)]


@pytest.mark.parametrize("conversational", [True, False], ids=["messages", "strings"])
@pytest.mark.parametrize("paired", [True, False], ids=["paired", "unpaired"])
def test_kto_examples_are_trls_tokens_labels_and_kl_completions(tiny_model_dir, conversational, paired):
    """Prompt, completion, KL completion (TRL's rotation within blocks of the batch size) and label of every
    example, in TRL's order, on the demo pairs and on an unpaired file made from them."""
    from helpers import DEMO_DATA

    from dpo_core.data import TokenizeSettings
    from dpo_core.kto_data import KTOTokenize, kto_labels
    from dpo_core.modeling import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir))
    rows = [json.loads(line) for line in (DEMO_DATA / "train.jsonl").read_text().splitlines()[:23]]
    if not conversational:
        rows = [{k: v[-1]["content"] for k, v in row.items()} for row in rows]
    if not paired:  # desirable and undesirable completions interleaved, as an unpaired file would hold them
        rows = [{"prompt": r["prompt"], "completion": r[side], "label": side == "chosen"}
                for i, r in enumerate(rows) for side in (("chosen", "rejected") if i % 3 else ("rejected",))]
    examples, problems = KTOTokenize(4)(_records(rows), tokenizer, TokenizeSettings(max_length=None))
    assert problems == []
    theirs = trl_kto_dataset(rows, tokenizer, 4)
    assert len(examples) == len(theirs) == (2 * len(rows) if paired else len(rows))
    assert [(e.prompt_ids, e.chosen_ids, e.rejected_ids, bool(kto_labels(e.id))) for e in examples] == \
           [(t["prompt_ids"], t["completion_ids"], t["KL_completion_ids"], t["label"]) for t in theirs]


@pytest.mark.slow
@pytest.mark.parametrize("paired", [True, False], ids=["paired", "unpaired"])
def test_the_prepared_store_tokenizes_a_large_kto_split_in_workers_as_trl_does(tiny_model_dir, tmp_path, paired):
    """Past the store's worker threshold (2048 records) a KTO split is tokenized in worker chunks of 1024 records,
    yet unpaired in TRL's blocks of 1000 and its KL completions rotated over the whole split: every example equals
    TRL 1.16's own preparation. A record of the other format in a later chunk is the split's one problem."""
    from helpers import DEMO_DATA

    from dpo_core.data import TokenizeSettings
    from dpo_core.kto_data import KTOTokenize, kto_labels
    from dpo_core.modeling import load_tokenizer
    from dpo_core.prepared import CHUNK, POOL_MIN_RECORDS, PreparedStore

    tokenizer = load_tokenizer(str(tiny_model_dir))
    demo = [json.loads(line) for line in (DEMO_DATA / "train.jsonl").read_text().splitlines()]
    rows = [demo[i % len(demo)] for i in range(POOL_MIN_RECORDS + 333)]
    if not paired:
        rows = [{"prompt": r["prompt"], "completion": r["chosen" if i % 3 else "rejected"], "label": bool(i % 3)}
                for i, r in enumerate(rows)]
    settings = TokenizeSettings(max_length=None)
    stored, problems = PreparedStore(tmp_path).tokenize(_records(rows), tokenizer, settings, KTOTokenize(3),
                                                        num_proc=2, progress=False)
    theirs = trl_kto_dataset(rows, tokenizer, 3)
    assert problems == [] and len(stored) == len(theirs) == (2 if paired else 1) * len(rows)
    assert [(list(e.prompt_ids), list(e.chosen_ids), list(e.rejected_ids), bool(kto_labels(e.id))) for e in stored] \
        == [(t["prompt_ids"], t["completion_ids"], t["KL_completion_ids"], t["label"]) for t in theirs]

    other = {"prompt": "Hi", "completion": "Hello.", "label": True} if paired else demo[0]
    mixed = rows[:2 * CHUNK + 5] + [other] + rows[2 * CHUNK + 5:]  # in the third worker chunk
    stored, problems = PreparedStore(tmp_path).tokenize(_records(mixed), tokenizer, settings, KTOTokenize(3),
                                                        num_proc=2, progress=False)
    assert len(stored) == 0 and [(p.location, p.field) for p in problems] == [(f"line {2 * CHUNK + 6}", "completion")]
    assert "mixes paired" in problems[0].reason


def test_bad_unpaired_records_name_their_line_and_field(tiny_model_dir):
    from dpo_core.data import TokenizeSettings
    from dpo_core.kto_data import KTOTokenize
    from dpo_core.modeling import load_tokenizer

    rows = [{"prompt": "Hi", "completion": "Hello.", "label": True},
            {"prompt": "Hi", "completion": "Go away.", "label": "no"},
            {"prompt": "Hi", "label": False},
            {"prompt": "Hi", "completion": "", "label": True},
            {"prompt": "Hi", "completion": "Fine.", "label": False}]
    examples, problems = KTOTokenize(2)(_records(rows, "data/kto.jsonl"), load_tokenizer(str(tiny_model_dir)),
                                        TokenizeSettings(max_length=None))
    assert [e.id for e in examples] == [0, 9]  # record 0 desirable (2 * 0), record 4 undesirable (2 * 4 + 1)
    assert [(p.location, p.field) for p in problems] == [("line 2", "label"), ("line 3", "completion"),
                                                         ("line 4", "completion")]
    assert all(str(p).startswith("data/kto.jsonl") for p in problems)
    mixed = rows[:1] + [{"prompt": "Hi", "chosen": "a", "rejected": "b"}]
    _, problems = KTOTokenize(2)(_records(mixed), load_tokenizer(str(tiny_model_dir)), TokenizeSettings())
    assert "mixes paired" in problems[0].reason


@pytest.mark.slow
@pytest.mark.parametrize("loss_type", sorted(UNPAIRED_LOSSES))
def test_one_step_equals_trl_kto_trainer(tiny_model_dir, loss_type):
    """Reference moved away from the policy (seeded noise): our step's loss, KL point and rewards on a batch of
    the demo data equal TRL 1.16 `KTOTrainer.compute_loss` on the same batch and models (float32, 1e-5)."""
    import copy

    from datasets import Dataset
    from helpers import DEMO_DATA
    from trl import KTOConfig, KTOTrainer

    from dpo_core.batches import collate_concat
    from dpo_core.config import DPOArguments
    from dpo_core.data import TokenizeSettings
    from dpo_core.kto import make_kto_step
    from dpo_core.kto_data import KTOTokenize
    from dpo_core.logps import concatenated_forward
    from dpo_core.modeling import load_model, load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir))
    policy = load_model(str(tiny_model_dir), torch_dtype="float32", trainable=False)
    reference = copy.deepcopy(policy)  # a noisier reference: the policy's KL log-ratios come out positive
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    rows = [json.loads(line) for line in (DEMO_DATA / "train.jsonl").read_text().splitlines()[:3]]
    examples, _ = KTOTokenize(6)(_records(rows), tokenizer, TokenizeSettings(max_length=None))
    args = DPOArguments(beta=0.1, loss_type=[loss_type], desirable_weight=1.2, undesirable_weight=0.8)
    step = make_kto_step(args, forward=concatenated_forward, ref_model=reference, reduce_mean=None)
    ours, stats = step(policy, collate_concat(examples, tokenizer.pad_token_id))

    config = KTOConfig(output_dir="unused", per_device_train_batch_size=6, beta=0.1, loss_type=loss_type,
                       desirable_weight=1.2, undesirable_weight=0.8, max_length=None, report_to=[], use_cpu=True,
                       disable_dropout=True, gradient_checkpointing=False, bf16=False,
                       precompute_ref_log_probs=False)
    trainer = KTOTrainer(model=policy, ref_model=reference, args=config, processing_class=tokenizer,
                         train_dataset=Dataset.from_list(rows))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(6)])
    theirs = trainer.compute_loss(policy, batch)
    mode = "train" if trainer.model.training else "eval"
    metrics = {k: v[-1] for k, v in trainer._metrics[mode].items()}
    assert abs(ours.item() - 0.5) > 1e-3  # the policy has moved
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-5)
    if loss_type == "kto":
        assert stats["kl"].item() == pytest.approx(metrics["kl"], abs=1e-5) and metrics["kl"] > 0
    for key in ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"):
        values, mask = stats[key]
        assert values[mask].mean().item() == pytest.approx(metrics[key], abs=1e-4), key


@pytest.mark.slow
@pytest.mark.parametrize("loss_type", sorted(UNPAIRED_LOSSES))
def test_kto_learns_the_demo_preference_and_the_cache_equals_the_online_reference(tiny_model_dir, tmp_path,
                                                                                  loss_type):
    """On the shipped demo pairs (unpaired as TRL does): 30 steps lift held-out preference accuracy from 0 (the
    base itself, whose margins are all 0) to >= 0.9; with a reference cache (`--kto_batch_size`) every logged loss equals the
    online reference's (1e-5)."""
    from helpers import DEMO_DATA, heldout_preference_accuracy, read_scalars, run_script

    common = ["--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(DEMO_DATA), "--max_length", "96",
              "--per_device_train_batch_size", "8", "--loss_type", loss_type, "--learning_rate", "1e-3",
              "--max_steps", "30", "--logging_steps", "5", "--eval_split", "test", "--eval_steps", "30"]
    run_script("dpo.py", [*common, "--output_dir", str(tmp_path / "online")])
    assert heldout_preference_accuracy(tmp_path / "online", tiny_model_dir) >= 0.9
    from huggingface_hub import ModelCard

    card = ModelCard.load(tmp_path / "online" / "README.md")
    assert card.data.tags[:2] == ["kto", "dpo_core"] and loss_type in card.data.tags
    if loss_type != "kto":
        return
    run_script("precompute_ref_logprobs.py", ["--model_name_or_path", str(tiny_model_dir), "--dataset_name",
                                              str(DEMO_DATA), "--max_length", "96", "--eval_split", "test",
                                              "--kto_batch_size", "8", "--output_dir", str(tmp_path / "cache")])
    run_script("dpo.py", [*common, "--output_dir", str(tmp_path / "cached"), "--ref_logprobs", str(tmp_path / "cache")])
    online, cached = read_scalars(tmp_path / "online" / "logs"), read_scalars(tmp_path / "cached" / "logs")
    assert sorted(cached["train/loss"]) == [5, 10, 15, 20, 25, 30]
    for key in ("train/loss", "train/kl", "eval/accuracy/desirable"):
        for step, value in online[key].items():
            assert cached[key][step] == pytest.approx(value, abs=1e-5), (key, step)

