"""Held-out evaluation of one or more policies against a reference model.

`evaluate_models(model_args, data_args, eval_args)` is the whole of `scripts/evaluate.py`. For every
policy, on the held-out preference split tokenized exactly as `scripts/dpo.py` tokenizes it:

- preference accuracy of the implicit reward `beta * log(pi / ref)` (`losses.preference_metrics`, margins
  within `dpo.tie_tolerance` counted as ties: strict accuracy, ties, accuracy with ties as half);
- the reward margin `beta * ((pc - rc) - (pr - rr))` per pair: mean, std, quantiles, histogram;
- perplexity on the chosen completions: `exp(sum NLL / number of tokens)` over ALL chosen completion tokens
  of the split (token-weighted, not a mean of per-pair perplexities; the tokens are those the log-probs
  count, the chat template's end-of-turn tokens included);
- KL(policy || reference), token level: the mean over all chosen completion tokens of the exact
  full-vocabulary `sum_v p_v log(p_v / q_v)` of the next-token distributions (teacher-forced on the data);
- KL(policy || reference), sequence level: `mean log pi(y|x) - log ref(y|x)` over completions `y` sampled
  from the policy (temperature 1, no top-p/top-k: the model's own distribution, cut at `max_new_tokens`) on
  held-out prompts; its standard error is computed over prompts (samples of one prompt are correlated);
- on an unpaired (KTO) split instead of pairs: each completion's log-ratio against the split's KL point, per
  label (`kto.kto_metrics`), perplexity and token-level KL over every completion;
- answers of every model and of the reference to a few held-out prompts, and with a reward model
  (`AutoModelForSequenceClassification`, one label) the win rate of each model's answer against the
  reference's answer to the same prompt (ties apart: equal answers, or scores equal to float32 noise).

Several processes (`accelerate launch`): pairs are sharded by accelerate's dataloader and gathered with
`gather_for_metrics` (the padding of the last batch is dropped); prompts for sampling are split between
processes and gathered with `gather_object`; metrics are computed once, on the main process. Every sampled
completion has its own generator seeded from (`--seed`, example id, sample index), so samples do not depend
on the number of processes or the batch size (up to float noise of differently padded batches).

Past ~450 lines on purpose: each metric above is a short function, and they share one sharded pass over the
pairs; the rendering of results lives in `report.py`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from functools import partial
from pathlib import Path

import torch
from accelerate.utils import ProjectConfiguration

from . import data as data_lib
from .batches import Example, PairDataset, collate_concat
from .config import resolved_config
from .distributed import main_process_first, make_accelerator
from .errors import ConfigError, DataError, OutputExistsError
from .generation import decode_answer, generate_ids
from .kto import kto_metrics
from .kto_data import EitherFormat, is_unpaired, kto_labels
from .layouts import LAYOUTS
from .losses import preference_metrics, tie_tolerance
from .modeling import gguf_of, load_model, load_tokenizer
from .report import margin_summary, markdown_table, read_training_curves, save_plot
from .trackers import (
    DEFAULT_PROJECT,
    RUNS_FILE,
    RunInfo,
    enabled_trackers,
    log_table,
    read_run_ids,
    start_trackers,
    tracker_config,
)

REFERENCE = "reference"


def named_paths(specs: list[str] | None, what: str) -> list[tuple[str, str]]:
    """`["sft=runs/sft", "runs/dpo"]` -> `[("sft", "runs/sft"), ("dpo", "runs/dpo")]`; names must be unique."""
    out = []
    for spec in specs or []:
        name, sep, path = spec.partition("=")
        if not sep or not name or "/" in name or os.sep in name:
            name, path = Path(spec.rstrip("/")).name or spec, spec
        if not path:
            raise ConfigError(f"{what} {spec!r}: empty path")
        out.append((name, path))
    names = [n for n, _ in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"{what}: names {dupes} repeat; give NAME=PATH with distinct names")
    if REFERENCE in names and what == "--models":
        raise ConfigError(f"--models: the name {REFERENCE!r} is the reference's column; choose another")
    return out


def sample_seed(*parts) -> int:
    """A 63-bit seed from any parts (stable across processes and Python runs, unlike hash())."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


# ---------------------------------------------------------------------------------------------- the math
class _LogitsTap:
    """Calls a model and keeps its logits, so the shared forward's logits also serve the token-level KL."""

    def __init__(self, model):
        self.model, self.logits = model, None

    def __call__(self, **kwargs):
        out = self.model(**kwargs)
        self.logits = out.logits
        return out


def token_kl_sums(policy_logits: torch.Tensor, ref_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per row, the sum over masked positions of KL(p || q) = sum_v p_v (log p_v - log q_v), exact.

    Args:
        policy_logits, ref_logits: `[N, T, V]` next-token logits of the two models on the same tokens.
        mask: `[N, T]`, 1 where the position's prediction counts.
    Returns:
        `(N,)` float32; one row at a time, so one `[T, V]` float32 copy exists at once.
    """
    sums = []
    for p_row, q_row, m_row in zip(policy_logits, ref_logits, mask):
        logp, logq = torch.log_softmax(p_row.float(), -1), torch.log_softmax(q_row.float(), -1)
        sums.append(((logp.exp() * (logp - logq)).sum(-1) * m_row.float()).sum())
    return torch.stack(sums)


@torch.no_grad()
def score_pairs(accelerator, policy, ref, loader) -> dict[str, torch.Tensor]:
    """Log-probs of both models on every held-out pair, gathered once each: `(N,)` tensors on the CPU.

    Keys: ids, chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_nll, ref_chosen_nll,
    chosen_tokens, kl_sum (token-level KL summed over the pair's chosen completion tokens).
    """
    forward = LAYOUTS["concat"].forward  # the very forward (and log-prob gather) of training and the precompute
    parts: dict[str, list[torch.Tensor]] = {}
    for batch in loader:
        tap_p, tap_r = _LogitsTap(policy), _LogitsTap(ref)
        with accelerator.autocast():
            # chunk_size=0: the full logits, which the token-level KL needs (evaluation has no backward)
            out, ref_out = forward(tap_p, batch, chunk_size=0), forward(tap_r, batch, chunk_size=0)
        n = out.chosen_logps.shape[0]  # rows 0..n-1 are prompt + chosen
        mask = (batch["completion_mask"][:n, 1:] * batch["attention_mask"][:n, 1:])
        kl = token_kl_sums(tap_p.logits[:n, :-1], tap_r.logits[:n, :-1], mask)
        values = {"ids": batch["ids"], "chosen_logps": out.chosen_logps, "rejected_logps": out.rejected_logps,
                  "ref_chosen_logps": ref_out.chosen_logps, "ref_rejected_logps": ref_out.rejected_logps,
                  "chosen_nll": out.chosen_nll, "ref_chosen_nll": ref_out.chosen_nll,
                  "chosen_tokens": out.chosen_lengths, "kl_sum": kl}
        for key, value in values.items():
            value = value.detach() if key in ("ids", "chosen_tokens") else value.detach().float()
            parts.setdefault(key, []).append(accelerator.gather_for_metrics(value).cpu())
    return {key: torch.cat(values) for key, values in parts.items()}


def pair_metrics(scores: dict[str, torch.Tensor], beta: float) -> tuple[dict, torch.Tensor]:
    """Accuracy (ties apart), margins, rewards, perplexity and token-level KL from `score_pairs`'s output.

    Returns:
        (metrics, the `(N,)` float64 reward margins).
    """
    s = {k: v.double() for k, v in scores.items()}
    chosen_rewards = beta * (s["chosen_logps"] - s["ref_chosen_logps"])
    rejected_rewards = beta * (s["rejected_logps"] - s["ref_rejected_logps"])
    pm = preference_metrics(chosen_rewards, rejected_rewards,
                            tie_tolerance(s["chosen_logps"], s["rejected_logps"], beta).double())
    tokens = s["chosen_tokens"].sum()
    margins = pm["rewards/margins"]
    metrics = {
        "accuracy": pm["rewards/accuracies"].mean().item(),
        "ties": pm["rewards/ties"].mean().item(),
        "accuracy_ties_half": pm["rewards/accuracies_ties_half"].mean().item(),
        "reward_margin": margin_summary(margins),
        "rewards/chosen": chosen_rewards.mean().item(), "rewards/rejected": rejected_rewards.mean().item(),
        "logps/chosen": s["chosen_logps"].mean().item(), "logps/rejected": s["rejected_logps"].mean().item(),
        "perplexity": math.exp(s["chosen_nll"].sum().item() / tokens.item()),
        "kl_token_level": s["kl_sum"].sum().item() / tokens.item(),
        "num_pairs": len(margins), "num_chosen_tokens": int(tokens.item()),
    }
    return metrics, margins


def reference_metrics(scores: dict[str, torch.Tensor], unpaired: bool = False) -> dict:
    """What is meaningful for the reference alone: its perplexity and log-probs on the same pairs (unpaired:
    on the completions, per label)."""
    s = {k: v.double() for k, v in scores.items()}
    tokens = s["chosen_tokens"].sum().item()
    out = {"perplexity": math.exp(s["ref_chosen_nll"].sum().item() / tokens), "num_chosen_tokens": int(tokens)}
    if not unpaired:
        return {**out, "logps/chosen": s["ref_chosen_logps"].mean().item(),
                "logps/rejected": s["ref_rejected_logps"].mean().item()}
    labels = kto_labels(scores["ids"])
    return {**out, **{f"logps/{name}": s["ref_chosen_logps"][where].mean().item()
                      for name, where in (("desirable", labels), ("undesirable", ~labels)) if bool(where.any())}}


@torch.no_grad()
def completion_logps(model, prompts: list[list[int]], completions: list[list[int]], *, pad_token_id: int,
                     batch_size: int) -> torch.Tensor:
    """log p(completion | prompt) summed over the completion tokens, through the shared concat forward.

    Consecutive items with the same prompt share one `Example` (as its chosen and rejected rows); an
    unpaired item is duplicated. Returns `(n,)` float64.
    """
    examples, slots = [], []  # slots[i] = (example index, 0 for the chosen row or 1 for the rejected row)
    i = 0
    while i < len(prompts):
        pair = i + 1 < len(prompts) and prompts[i + 1] == prompts[i]
        second = completions[i + 1] if pair else completions[i]
        examples.append(Example(len(examples), list(prompts[i]), list(completions[i]), list(second)))
        slots.append((len(examples) - 1, 0))
        if pair:
            slots.append((len(examples) - 1, 1))
        i += 2 if pair else 1
    device = next(model.parameters()).device
    chosen, rejected = [], []
    for start in range(0, len(examples), batch_size):
        batch = collate_concat(examples[start: start + batch_size], pad_token_id)
        out = LAYOUTS["concat"].forward(model, {k: v.to(device) for k, v in batch.items()})
        chosen.append(out.chosen_logps.double().cpu())
        rejected.append(out.rejected_logps.double().cpu())
    both = torch.stack([torch.cat(chosen), torch.cat(rejected)], dim=1)
    return torch.stack([both[e, r] for e, r in slots]) if slots else torch.zeros(0, dtype=torch.float64)


def sampled_log_ratios(policy, ref, tokenizer, prompts: list[list[int]], seeds: list[int], *,
                       max_new_tokens: int, batch_size: int) -> torch.Tensor:
    """`log pi(y|x) - log ref(y|x)` for one completion `y ~ pi(.|x)` per (prompt, seed): `(n,)` float64.

    Their mean estimates KL(pi || ref) of the sequence distributions cut at `max_new_tokens` (unbiased:
    y is drawn from pi at temperature 1 with no other warping).
    """
    ys = generate_ids(policy, tokenizer, prompts, max_new_tokens=max_new_tokens, do_sample=True, seeds=seeds,
                      batch_size=batch_size)
    pad = tokenizer.pad_token_id
    return (completion_logps(policy, prompts, ys, pad_token_id=pad, batch_size=batch_size)
            - completion_logps(ref, prompts, ys, pad_token_id=pad, batch_size=batch_size))


def kl_summary(log_ratios: dict[int, list[float]]) -> dict:
    """Mean of all sampled log-ratios; standard error over prompts (each prompt's samples averaged first)."""
    per_prompt = torch.tensor([sum(v) / len(v) for _, v in sorted(log_ratios.items())], dtype=torch.float64)
    every = torch.tensor([x for _, v in sorted(log_ratios.items()) for x in v], dtype=torch.float64)
    n = len(per_prompt)
    stderr = per_prompt.std(unbiased=True).item() / math.sqrt(n) if n > 1 else float("nan")
    return {"mean": every.mean().item(), "stderr": stderr, "num_prompts": n, "num_samples": len(every)}


def win_rate(model_scores: list[float], ref_scores: list[float], same_answer: list[bool]) -> dict:
    """Wins, ties and losses of a model's answers against the reference's on the same prompts.

    A tie is the same answer, or scores within float32 noise (1e-5 of their magnitude)."""
    wins = ties = 0
    for a, b, same in zip(model_scores, ref_scores, same_answer):
        if same or abs(a - b) <= 1e-5 * (abs(a) + abs(b)):
            ties += 1
        elif a > b:
            wins += 1
    n = len(model_scores)
    return {"win_rate": wins / n, "ties": ties / n, "loss_rate": (n - wins - ties) / n,
            "win_rate_ties_half": (wins + 0.5 * ties) / n, "num_prompts": n}


@torch.no_grad()
def reward_scores(reward_model, tokenizer, conversations: list[tuple], batch_size: int) -> list[float]:
    """Scores `(prompt, answer)` pairs: message-list prompts through the reward tokenizer's chat template when
    it has one, otherwise as plain text (prompt text + answer). Returns one float per pair."""
    rows = []
    for prompt, answer in conversations:
        if isinstance(prompt, list) and getattr(tokenizer, "chat_template", None):
            rows.append(data_lib._encode(tokenizer, prompt + [{"role": "assistant", "content": answer}], {}))
        else:
            text = "\n".join(m["content"] for m in prompt) if isinstance(prompt, list) else prompt
            rows.append(data_lib._encode(tokenizer, f"{text}\n{answer}", {}))
    device = next(reward_model.parameters()).device
    pad = tokenizer.pad_token_id
    out = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start: start + batch_size]
        width = max(len(r) for r in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, r in enumerate(chunk):
            ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
        logits = reward_model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        out += logits[:, 0].float().cpu().tolist()
    return out


def load_reward_model(path: str, model_args, device):
    """A sequence classifier with exactly one label, and its tokenizer (with a pad token)."""
    from transformers import AutoModelForSequenceClassification

    tokenizer = load_tokenizer(path, revision=model_args.revision, trust_remote_code=model_args.trust_remote_code)
    tokenizer.padding_side = "right"
    model = AutoModelForSequenceClassification.from_pretrained(
        path, revision=model_args.revision, trust_remote_code=model_args.trust_remote_code, use_safetensors=True)
    if model.config.num_labels != 1:
        raise ConfigError(f"--reward_model {path}: expected one score (num_labels=1), got {model.config.num_labels}")
    if model.config.pad_token_id is None:  # needed to find each row's last token
        model.config.pad_token_id = tokenizer.pad_token_id
    return model.eval().requires_grad_(False).to(device), tokenizer


def _write_json(path: Path, value) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2, ensure_ascii=False))
    os.replace(tmp, path)


# -------------------------------------------------------------------------------------------------- main
def _prompt_of(record_data: dict):
    """A record's prompt (explicit, or the shared leading turns/text of chosen and rejected)."""
    if "prompt" in record_data:
        return record_data["prompt"]
    return data_lib._extract_prompt(record_data["chosen"], record_data["rejected"])[0]


def _check_tokenizer(path: str, tokenizer, model_args) -> None:
    """A model scored with the reference's token ids must use the same tokenizer (when it ships one)."""
    try:
        own = load_tokenizer(path, revision=model_args.revision, trust_remote_code=model_args.trust_remote_code,
                             gguf_file=gguf_of(model_args, path))
    except (OSError, ValueError):
        return  # no tokenizer files: it is read with the reference's
    if data_lib.tokenizer_fingerprint(own) != data_lib.tokenizer_fingerprint(tokenizer):
        raise ConfigError(f"{path}: its tokenizer differs from the reference's; log-probs of different token ids "
                         "cannot be compared")


def evaluate_models(model_args, data_args, eval_args) -> dict:
    """Evaluates every `--models` entry against the reference; writes the outputs; returns results.json's dict."""
    report_to = enabled_trackers(eval_args.report_to)  # a missing tracker package: before any model loads
    accelerator = make_accelerator(log_with=report_to or None, project_config=ProjectConfiguration(
        project_dir=eval_args.output_dir or ".", logging_dir=os.path.join(eval_args.output_dir or ".", "logs")))
    accelerator.print(f"num_processes {accelerator.num_processes} ({accelerator.distributed_type}), "
                      f"device {accelerator.device}")
    if not eval_args.output_dir:
        raise ConfigError("--output_dir is required")
    models = named_paths(eval_args.models, "--models")
    if not models:
        raise ConfigError("--models is required: one or more model directories (NAME=PATH allowed)")
    ref_path = eval_args.reference_model or model_args.reference_path()
    if not ref_path:
        raise ConfigError("--reference_model is required (or --ref_model_name_or_path / --model_name_or_path)")
    runs = named_paths(eval_args.run_dirs, "--run_dirs")
    output_dir = Path(eval_args.output_dir)
    if (output_dir / "results.json").exists() and not eval_args.overwrite:
        raise OutputExistsError(f"{output_dir}/results.json exists: pass --overwrite to replace it")
    curves = {name: read_training_curves(path) for name, path in runs}  # fail early on a wrong directory
    load = partial(load_model, torch_dtype=model_args.torch_dtype, attn_implementation=model_args.attn_implementation,
                   revision=model_args.revision, trust_remote_code=model_args.trust_remote_code, trainable=False)

    tokenizer = load_tokenizer(ref_path, revision=model_args.revision, trust_remote_code=model_args.trust_remote_code,
                               gguf_file=gguf_of(model_args, ref_path))
    for _, path in models:
        _check_tokenizer(path, tokenizer, model_args)
    with main_process_first(accelerator):  # tokenized exactly as scripts/dpo.py does
        # Unpaired (KTO) records: each completion with a KL completion, as dpo.py --loss_type kto tokenizes them.
        records, examples = data_lib.prepare_from_args(data_args, tokenizer, seed=eval_args.seed,
                                                       report_path=output_dir / "invalid_records.jsonl",
                                                       progress=accelerator.is_main_process,
                                                       tokenize=EitherFormat(max(2, eval_args.per_device_eval_batch_size)))
    split = "eval" if "eval" in examples else "train"
    split_name = data_args.eval_split or (f"{data_args.dataset_split} (eval_fraction {data_args.eval_fraction})"
                                          if split == "eval" else data_args.dataset_split)
    pairs = sorted(examples[split], key=lambda e: e.id)
    if not pairs:
        raise DataError(f"{data_args.dataset_name}: no usable held-out pairs in split {split_name!r}")
    unpaired = is_unpaired(records[split])
    prompt_by_id = {r.id: _prompt_of(r.data) for r in records[split] if r.data is not None}
    if unpaired:  # an example's id is 2 * its record's id + (0 desirable, 1 undesirable)
        prompt_by_id = {e.id: prompt_by_id[e.id // 2] for e in pairs}

    loader = accelerator.prepare(torch.utils.data.DataLoader(
        PairDataset(pairs), batch_size=eval_args.per_device_eval_batch_size, shuffle=False,
        collate_fn=partial(collate_concat, pad_token_id=tokenizer.pad_token_id)))
    kl_pairs = pairs[: eval_args.kl_max_prompts] if eval_args.kl_samples else []
    kl_items = [(e.id, k) for e in kl_pairs for k in range(eval_args.kl_samples)]
    gen_pairs = pairs if eval_args.generation_prompts == -1 else pairs[: eval_args.generation_prompts]
    prompt_ids = {e.id: e.prompt_ids for e in pairs}

    def answers_of(model) -> dict[int, list[int]]:
        with accelerator.split_between_processes([e.id for e in gen_pairs]) as mine:
            ids = generate_ids(model, tokenizer, [prompt_ids[i] for i in mine], max_new_tokens=eval_args.max_new_tokens,
                               temperature=eval_args.temperature, top_p=eval_args.top_p,
                               do_sample=eval_args.do_sample, seeds=[sample_seed(eval_args.seed, "answer", i)
                                                                     for i in mine],
                               batch_size=eval_args.generation_batch_size)
            return dict(_gather(accelerator, list(zip(mine, ids))))

    ref = load(ref_path, gguf_file=gguf_of(model_args, ref_path)).to(accelerator.device)
    results = {"dataset": data_args.dataset_name, "split": split_name, "format": "unpaired" if unpaired else "pairs",
               ("num_examples" if unpaired else "num_pairs"): len(pairs), "beta": eval_args.beta, "reference_model": ref_path, "models": {},
               "training_curves": curves}
    margins, answers = {}, {REFERENCE: answers_of(ref)}
    for name, path in models:
        accelerator.print(f"evaluating {name} ({path}) on {len(pairs)} {'examples' if unpaired else 'pairs'}")
        policy = load(path, gguf_file=gguf_of(model_args, path)).to(accelerator.device)
        scores = score_pairs(accelerator, policy, ref, loader)
        if REFERENCE not in results["models"]:
            results["models"][REFERENCE] = {"path": ref_path, **reference_metrics(scores, unpaired)}
        metrics, margins[name] = (kto_metrics if unpaired else pair_metrics)(scores, eval_args.beta)
        if kl_items:
            with accelerator.split_between_processes(kl_items) as mine:
                ratios = sampled_log_ratios(policy, ref, tokenizer, [prompt_ids[i] for i, _ in mine],
                                            [sample_seed(eval_args.seed, "kl", i, k) for i, k in mine],
                                            max_new_tokens=eval_args.max_new_tokens,
                                            batch_size=eval_args.generation_batch_size)
                gathered = _gather(accelerator, [(i, r) for (i, _), r in zip(mine, ratios.tolist())])
            by_prompt: dict[int, list[float]] = {}
            for i, r in gathered:
                by_prompt.setdefault(i, []).append(r)
            metrics["kl_sampled"] = {**kl_summary(by_prompt), "samples_per_prompt": eval_args.kl_samples,
                                     "max_new_tokens": eval_args.max_new_tokens}
        answers[name] = answers_of(policy)
        results["models"][name] = {"path": path, **metrics}
        del policy

    texts = {name: {i: decode_answer(tokenizer, ids) for i, ids in by_id.items()} for name, by_id in answers.items()}
    if eval_args.reward_model and gen_pairs:
        del ref
        rm, rm_tokenizer = load_reward_model(eval_args.reward_model, model_args, accelerator.device)
        rewards = {}
        for name, by_id in texts.items():
            with accelerator.split_between_processes([e.id for e in gen_pairs]) as mine:
                s = reward_scores(rm, rm_tokenizer, [(prompt_by_id[i], by_id[i]) for i in mine],
                                  eval_args.generation_batch_size)
                rewards[name] = dict(_gather(accelerator, list(zip(mine, s))))
        ids = [e.id for e in gen_pairs]
        for name, _ in models:
            results["models"][name]["win_rate"] = win_rate(
                [rewards[name][i] for i in ids], [rewards[REFERENCE][i] for i in ids],
                [answers[name][i] == answers[REFERENCE][i] for i in ids])
    else:
        rewards = None

    if accelerator.is_main_process:
        _finish(output_dir, eval_args, results, margins, texts, rewards, gen_pairs, prompt_by_id, model_args,
                data_args)
    if report_to:
        log_to_trackers(accelerator, report_to, eval_args, results, resolved_config(model_args, data_args, eval_args))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return results


def final_scalars(results: dict) -> dict[str, float]:
    """Every number of results.json's per-model entries as `eval_final/<model>/<metric>` (nested keys joined
    with /; histograms and paths left out)."""
    out = {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for key, inner in value.items():
                if key not in ("histogram", "path"):
                    walk(f"{prefix}/{key}", inner)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[prefix] = float(value)

    for name, metrics in results["models"].items():
        walk(f"eval_final/{name}", metrics)
    return out


def log_to_trackers(accelerator, names: list[str], eval_args, results: dict, config: dict) -> None:
    """The results into the trackers' run: the one `--tracker_run_dir/trackers.json` names (the training run,
    continued: wandb by id, mlflow by run id, trackio by name), else a new run `--run_name` with the evaluation's
    config. Scalars at the run's next step (wandb, trackio) or step 0 (mlflow, TensorBoard); the table (one row per
    model) where the tracker has tables."""
    stored = read_run_ids(eval_args.tracker_run_dir) if eval_args.tracker_run_dir else {}
    if eval_args.tracker_run_dir and not stored:
        accelerator.print(f"warning: {eval_args.tracker_run_dir} has no {RUNS_FILE}: logging to a new tracker run")
    run = RunInfo(eval_args.project_name or stored.get("project", DEFAULT_PROJECT),
                  eval_args.run_name or stored.get("run_name") or Path(os.path.abspath(eval_args.output_dir)).name,
                  str(eval_args.output_dir), resumed_step=1 if stored else 0)
    # A continued training run keeps its own config (mlflow refuses to change a logged param).
    start_trackers(accelerator, names, run, None if stored else tracker_config(config), stored.get("runs", {}))
    scalars = final_scalars(results)
    accelerator.log(scalars)
    columns = sorted({key.split("/", 2)[2] for key in scalars})
    rows = [[name, *[scalars.get(f"eval_final/{name}/{c}") for c in columns]] for name in results["models"]]
    tables = log_table(accelerator, names, "eval_final/results", ["model", *columns], rows)
    accelerator.print(f"logged {len(scalars)} eval_final scalars to {', '.join(names)} (run {run.run_name!r}"
                      f"{', continued' if stored else ''}); the results table to {', '.join(tables) or 'none'}")


def _gather(accelerator, items: list) -> list:
    """Every process's items, in process order (a no-op with one process)."""
    from accelerate.utils import gather_object

    return gather_object(items) if accelerator.num_processes > 1 else items


def _finish(output_dir, eval_args, results, margins, texts, rewards, gen_pairs, prompt_by_id, model_args,
            data_args) -> None:
    """Histograms on shared bins, results.json, generation_samples.json, the PNG and the table (main process)."""
    everything = torch.cat(list(margins.values()))
    low, high = everything.min().item(), everything.max().item()
    if high - low < 1e-12:
        low, high = low - 0.5, high + 0.5
    edges = torch.linspace(low, high, eval_args.histogram_bins + 1, dtype=torch.float64)
    hists = {}
    for name, m in margins.items():
        counts = torch.histogram(m, bins=edges).hist
        hists[name] = {"bin_edges": edges.tolist(), "counts": [int(c) for c in counts.tolist()]}
        results["models"][name]["reward_margin"]["histogram"] = hists[name]
    results["settings"] = resolved_config(model_args, data_args, eval_args)
    output_dir.mkdir(parents=True, exist_ok=True)
    _write_json(output_dir / "results.json", results)
    samples = []
    for e in gen_pairs:
        sample = {"id": e.id, "prompt": prompt_by_id.get(e.id), "answers": {n: t[e.id] for n, t in texts.items()}}
        if rewards is not None:
            sample["rewards"] = {n: r[e.id] for n, r in rewards.items()}
        samples.append(sample)
    _write_json(output_dir / "generation_samples.json", samples)
    save_plot(output_dir / eval_args.plot_file, hists, results["training_curves"])
    print(markdown_table(results))
    for sample in samples[:3]:
        prompt = sample["prompt"]
        question = prompt[-1]["content"] if isinstance(prompt, list) else prompt
        print(f"\n> {question}")
        for name, text in sample["answers"].items():
            print(f"  {name}: {text}")
    print(f"\nwrote {output_dir / 'results.json'}, {output_dir / 'generation_samples.json'}, "
          f"{output_dir / eval_args.plot_file}")
