"""Whole training runs against TRL 1.16's own trainers, step by step: our run (set up by `dpo_core.dpo.setup_dpo`,
as scripts/dpo.py sets it up) and TRL's trainer on the same file, both in file order (TRL's sequential sampler),
the same tiny model, AdamW with the same hyper-parameters, a constant learning rate, clipping at 1, dropout off.
Every step's loss agrees (1e-4) and so do the trained weights (1e-4): the data handling, the forward, the loss, the
clipping and the optimizer of each method are TRL's, not only its loss function.

SimPO and CPO run on string pairs: on conversational ones TRL's experimental CPOTrainer appends a second EOS
after the chat template's end of turn, where every method here tokenizes as DPOTrainer does. ORPO is left out
on purpose: TRL's ORPO NLL counts the prompt tokens too, ours the completion's only (docs/losses.md); its loss
function is compared with TRL's in tests/test_losses.py.
"""

import json

import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("fresh_accelerate_state", "one_thread")]
pytest.importorskip("trl")

STEPS, BATCH, LR, BETA = 6, 8, 1e-3, 0.1


def demo_rows(n_pairs: int, unpaired: bool, strings: bool = False) -> list[dict]:
    """The first demo pairs (strings: their last turns' text); unpaired: each pair's two completions labelled
    (every fourth pair undesirable first)."""
    from helpers import DEMO_DATA

    pairs = [json.loads(line) for line in (DEMO_DATA / "train.jsonl").read_text().splitlines()[:n_pairs]]
    if strings:
        pairs = [{k: v[-1]["content"] for k, v in row.items()} for row in pairs]
    if not unpaired:
        return pairs
    return [{"prompt": r["prompt"], "completion": r[side], "label": side == "chosen"}
            for i, r in enumerate(pairs) for side in (("chosen", "rejected") if i % 4 else ("rejected", "chosen"))]


def our_run(model_dir, tmp_path, rows, **dpo_kwargs):
    """(per-step (loss, stats), trained weights) of our run on `rows`, unshuffled."""
    from transformers import get_scheduler

    from dpo_core.config import DataArguments, DPOArguments, ModelArguments, TrainArguments
    from dpo_core.distributed import make_accelerator
    from dpo_core.dpo import setup_dpo
    from dpo_core.training import train_loop

    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    accelerator = make_accelerator()
    train_args = TrainArguments(output_dir=str(tmp_path / "ours"), max_steps=STEPS, per_device_train_batch_size=BATCH,
                                learning_rate=LR, lr_scheduler_type="constant", report_to=["none"],
                                logging_steps=STEPS, forward_mode="concat")
    run = setup_dpo(accelerator, ModelArguments(model_name_or_path=str(model_dir)),
                    DataArguments(dataset_name=str(data), max_length=None), DPOArguments(beta=BETA, **dpo_kwargs),
                    train_args, report_path=None, shuffle=False)
    steps = []

    def step_fn(model, batch):
        loss, stats = run.step_fn(model, batch)
        steps.append((loss.item(), stats))
        return loss, stats

    train_loop(accelerator, run.model, run.optimizer, get_scheduler("constant", run.optimizer), run.train_loader,
               step_fn, train_args, max_steps=STEPS)
    weights = {k: v.detach().clone() for k, v in accelerator.unwrap_model(run.model).state_dict().items()}
    return steps, weights


def trl_run(trainer_cls, config_cls, model_dir, tmp_path, rows, *, with_ref: bool, **config_kwargs):
    """(per-step (loss, the trainer's last logged metrics), trained weights) of TRL's trainer on `rows`."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    steps = []

    class Trainer(trainer_cls):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            metrics = getattr(self, "_metrics", None) or getattr(self, "_stored_metrics", {})
            steps.append((loss.item(), {k: v[-1] for k, v in metrics.get("train", {}).items()}))
            return loss

    config = config_cls(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=BATCH, max_steps=STEPS,
                        learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                        optim="adamw_torch", max_grad_norm=1.0, beta=BETA, max_length=None, disable_dropout=True,
                        gradient_checkpointing=False, bf16=False, use_cpu=True, train_sampling_strategy="sequential",
                        report_to=[], logging_strategy="no", save_strategy="no", eval_strategy="no",
                        dataloader_num_workers=0, seed=0, disable_tqdm=True, **config_kwargs)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    extra = {"ref_model": AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)} if with_ref else {}
    trainer_cls_args = dict(model=model, args=config, processing_class=tokenizer, train_dataset=Dataset.from_list(rows))
    Trainer(**trainer_cls_args, **extra).train()
    return steps, model.state_dict()


def assert_same_run(ours, theirs, keys=()):
    (our_steps, our_weights), (trl_steps, trl_weights) = ours, theirs
    assert len(our_steps) == len(trl_steps) == STEPS
    for step, ((loss, stats), (trl_loss, trl_stats)) in enumerate(zip(our_steps, trl_steps), 1):
        assert loss == pytest.approx(trl_loss, abs=1e-4), step
        for ours_key, trl_key in keys:
            value = stats[ours_key]
            value = value[0][value[1]].mean() if isinstance(value, tuple) else value.float().mean()
            assert value.item() == pytest.approx(trl_stats[trl_key], abs=1e-4), (step, ours_key)
    assert our_steps[-1][0] < our_steps[0][0] - 0.005  # it trained
    diff = max((our_weights[k] - v).abs().max().item() for k, v in trl_weights.items())
    print(f"losses ours {[round(x, 6) for x, _ in our_steps]}, TRL {[round(x, 6) for x, _ in trl_steps]}; max "
          f"|loss diff| {max(abs(a[0] - b[0]) for a, b in zip(our_steps, trl_steps)):.1e}, weights {diff:.1e}")
    assert diff < 1e-4


def test_dpo_run_follows_trls_dpo_trainer(tiny_model_dir, tmp_path):
    from trl import DPOConfig, DPOTrainer

    rows = demo_rows(STEPS * BATCH, unpaired=False)
    ours = our_run(tiny_model_dir, tmp_path, rows, loss_type=["sigmoid"])
    theirs = trl_run(DPOTrainer, DPOConfig, tiny_model_dir, tmp_path, rows, with_ref=True, loss_type=["sigmoid"],
                     precompute_ref_log_probs=False, padding_free=False, use_liger_kernel=False)
    assert_same_run(ours, theirs, [("rewards/chosen", "rewards/chosen"), ("rewards/rejected", "rewards/rejected")])


@pytest.mark.parametrize("loss_type", ["simpo", "cpo"])
def test_simpo_and_cpo_runs_follow_trls_cpo_trainer(tiny_model_dir, tmp_path, loss_type):
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    rows = demo_rows(STEPS * BATCH, unpaired=False, strings=True)
    ours = our_run(tiny_model_dir, tmp_path, rows, loss_type=[loss_type])
    theirs = trl_run(CPOTrainer, CPOConfig, tiny_model_dir, tmp_path, rows, with_ref=False,
                     loss_type="simpo" if loss_type == "simpo" else "sigmoid")
    assert_same_run(ours, theirs)


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_kto_run_follows_trls_kto_trainer(tiny_model_dir, tmp_path, loss_type):
    from trl import KTOConfig, KTOTrainer

    rows = demo_rows(STEPS * BATCH // 2, unpaired=True)
    ours = our_run(tiny_model_dir, tmp_path, rows, loss_type=[loss_type])
    theirs = trl_run(KTOTrainer, KTOConfig, tiny_model_dir, tmp_path, rows, with_ref=True, loss_type=loss_type,
                     precompute_ref_log_probs=False)
    keys = [("kl", "kl")] if loss_type == "kto" else []
    assert_same_run(ours, theirs, keys)
