"""One configuration of the benchmark in a fresh process: `python bench_worker.py SPEC.json` runs ours
(`run_ours`) or TRL's DPOTrainer (`run_trl`) and writes the result next to the spec."""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

import torch
from bench_inputs import token_hash

from dpo_core.allocator import active_allocator


def _peak_memory_mb() -> dict[str, float]:
    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # KiB on Linux
    if torch.cuda.is_available():
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    return out


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class _StepClock:
    """Records the time at the end of every optimizer step (wraps the scheduler our loop steps)."""

    def __init__(self, scheduler):
        self.scheduler, self.times = scheduler, []

    def step(self, *a, **k):
        self.scheduler.step(*a, **k)
        _sync()
        self.times.append(time.perf_counter())

    def __getattr__(self, name):
        return getattr(self.scheduler, name)


def run_ours(spec: dict) -> dict:
    """Our DPO run, set up by the very function `train_dpo` uses (`dpo_core.dpo.setup_dpo`), unshuffled as TRL's
    sequential sampler, with a constant learning rate and a clock on the scheduler's steps."""
    from accelerate.utils import set_seed
    from transformers import get_scheduler

    from dpo_core.config import DataArguments, DPOArguments, ModelArguments, TrainArguments
    from dpo_core.distributed import make_accelerator
    from dpo_core.dpo import setup_dpo
    from dpo_core.training import train_loop

    steps = spec["warmup_steps"] + spec["steps"]
    accelerator = make_accelerator(mixed_precision="bf16" if spec["bf16"] else "no")
    set_seed(spec["seed"])
    model_args = ModelArguments(model_name_or_path=spec["model_dir"],
                                gradient_checkpointing=spec.get("gradient_checkpointing", False))
    data_args = DataArguments(dataset_name=spec["data_dir"], max_length=spec["max_length"])
    dpo_args = DPOArguments(beta=spec["beta"], ref_logprobs=spec.get("cache_dir"))
    train_args = TrainArguments(output_dir=spec["run_dir"], max_steps=steps, per_device_train_batch_size=spec["batch_size"],
                                learning_rate=spec["learning_rate"], lr_scheduler_type="constant",
                                logging_steps=steps, report_to=["none"], forward_mode=spec["forward_mode"],
                                torch_compile=spec.get("torch_compile", False),
                                seed=spec["seed"])
    run = setup_dpo(accelerator, model_args, data_args, dpo_args, train_args, report_path=None, shuffle=False)
    clock = _StepClock(get_scheduler("constant", run.optimizer))
    first, tokens = [], []

    def step_fn(model, batch):
        loss, stats = run.step_fn(model, batch)
        if len(first) < 2:  # the numerical check against TRL (warm-up steps, never timed)
            first.append({"loss": loss.item(), "logps_chosen": stats["logps/chosen"].mean().item(),
                          "logps_rejected": stats["logps/rejected"].mean().item()})
        tokens.append(int(batch["num_tokens"]))
        return loss, stats

    train = run.train_loader.dataset.examples
    _sync()
    clock.times.append(time.perf_counter())
    train_loop(accelerator, run.model, run.optimizer, clock, run.train_loader, step_fn, train_args, max_steps=steps)
    return {"step_end_times": clock.times, "first_steps": first, "step_tokens": tokens,
            "tokens_hash": token_hash((e.prompt_ids, e.chosen_ids, e.rejected_ids) for e in train),
            "forward_mode": run.forward_mode, **_peak_memory_mb()}


def run_trl(spec: dict) -> dict:
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    steps = spec["warmup_steps"] + spec["steps"]
    times, first, tokens, precompute = [], [], [], []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            _sync()
            times.append(time.perf_counter())

    class Trainer(DPOTrainer):
        def _precompute_ref_logps(self, *a, **k):
            start = time.perf_counter()
            out = super()._precompute_ref_logps(*a, **k)
            precompute.append(time.perf_counter() - start)
            return out

        def _compute_loss(self, model, inputs, return_outputs):
            loss = super()._compute_loss(model, inputs, return_outputs)
            if len(first) < 2:
                metrics = self._metrics["train"]
                first.append({"loss": loss.item(), "logps_chosen": metrics["logps/chosen"][-1],
                              "logps_rejected": metrics["logps/rejected"][-1]})
            tokens.append(int(inputs["attention_mask"].sum()))
            return loss

    cuda = torch.cuda.is_available()
    config = DPOConfig(
        output_dir=spec["run_dir"], per_device_train_batch_size=spec["batch_size"], max_steps=steps,
        learning_rate=spec["learning_rate"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, optim="adamw_torch", max_grad_norm=1.0,
        beta=spec["beta"], loss_type=["sigmoid"], max_length=spec["max_length"], truncation_mode="keep_start",
        padding_free=False, disable_dropout=True, gradient_checkpointing=spec.get("gradient_checkpointing", False), bf16=spec["bf16"], fp16=False,
        use_cpu=not cuda, precompute_ref_log_probs=spec["precompute"],
        precompute_ref_batch_size=spec["precompute_batch_size"], logging_strategy="no", save_strategy="no",
        eval_strategy="no", report_to=[], dataloader_num_workers=0, train_sampling_strategy="sequential",
        seed=spec["seed"], use_liger_kernel=False, torch_compile=False, disable_tqdm=True)
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32, use_safetensors=True)
    dataset = load_dataset("json", data_files=str(Path(spec["data_dir"]) / "train.jsonl"), split="train",
                           cache_dir=str(Path(spec["run_dir"]) / "hf-cache"))  # fresh: no precompute reuse
    trainer = Trainer(model=model, args=config, processing_class=tokenizer, train_dataset=dataset,
                      callbacks=[Clock()])
    times.append(time.perf_counter())
    trainer.train()
    ds = trainer.train_dataset
    return {"step_end_times": times, "first_steps": first, "step_tokens": tokens,
            "precompute_seconds": sum(precompute) if precompute else None,
            "tokens_hash": token_hash(zip(ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"])),
            "trl_config": {"per_device_train_batch_size": config.per_device_train_batch_size,
                           "learning_rate": config.learning_rate, "max_length": config.max_length,
                           "gradient_checkpointing": config.gradient_checkpointing,
                           "padding_free": trainer.padding_free, "optim": getattr(config.optim, "value", config.optim),
                           "precompute_ref_log_probs": config.precompute_ref_log_probs,
                           "train_sampling_strategy": config.train_sampling_strategy},
            **_peak_memory_mb()}


def run_worker(spec_path: str) -> None:
    """Runs one configuration (in a fresh process) and writes its result next to the spec."""
    spec = json.loads(Path(spec_path).read_text())
    if spec.get("num_threads"):
        torch.set_num_threads(spec["num_threads"])
    result = run_trl(spec) if spec["tool"] == "trl" else run_ours(spec)
    result["num_threads"] = torch.get_num_threads()
    result["allocator"] = active_allocator()
    tmp = Path(spec["result"] + ".tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, spec["result"])


if __name__ == "__main__":
    run_worker(sys.argv[1])
