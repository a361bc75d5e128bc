"""The evaluation's report: training curves read back from TensorBoard, the PNG (reward-margin histograms and
curves) and the markdown table of models side by side. Used by `dpo_core.evaluate`."""

from __future__ import annotations

import math
import os
from pathlib import Path

from .errors import MissingError

QUANTILES = (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)  # of the reward margins
CURVE_TAGS = ("train/loss", "train/rewards/accuracies", "train/rewards/margins", "eval/loss",
              "eval/rewards/accuracies", "eval/rewards/margins")


def margin_summary(margins) -> dict:
    """Mean, std (population) and `QUANTILES` of a `(N,)` float64 tensor of reward margins."""
    import torch

    return {"mean": margins.mean().item(), "std": margins.std(unbiased=False).item(),
            "quantiles": {str(q): torch.quantile(margins, q).item() for q in QUANTILES}}


# ------------------------------------------------------------------------------------------ curves, plot
def read_training_curves(run_dir: str | Path) -> dict[str, dict[str, list]]:
    """The scalars of a run's TensorBoard event files: `{tag: {"steps": [...], "values": [...]}}`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted(Path(run_dir).rglob("events.out.tfevents.*"))
    if not files:
        raise MissingError(f"--run_dirs {run_dir}: no TensorBoard event files (events.out.tfevents.*) in it")
    curves: dict[int, dict] = {}
    by_tag: dict[str, dict[int, float]] = {}
    for file in files:  # later files (a resumed run) overwrite earlier values of the same step
        acc = EventAccumulator(str(file), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            for event in acc.Scalars(tag):
                by_tag.setdefault(tag, {})[event.step] = event.value
    for tag, points in sorted(by_tag.items()):
        steps = sorted(points)
        curves[tag] = {"steps": steps, "values": [points[s] for s in steps]}
    return curves


def save_plot(path: Path, margins: dict[str, dict], curves: dict[str, dict]) -> None:
    """Reward-margin histograms (one panel per model, shared bins; none when `margins` is empty) and training
    curves, as a PNG (atomic)."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed; set here, not at import time
    import matplotlib.pyplot as plt

    tags = [t for t in CURVE_TAGS if any(t in c for c in curves.values())]
    top = 1 if margins else 0  # no histogram row without margins (the model card's curves alone)
    n_top, n_bottom = max(len(margins), 1), len(tags)
    cols = max(n_top, min(n_bottom, 3), 1)
    rows = top + math.ceil(n_bottom / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.set_visible(False)
    for ax, (name, hist) in zip(axes[0], margins.items()):
        ax.set_visible(True)
        edges = hist["bin_edges"]
        ax.stairs(hist["counts"], edges, fill=True, alpha=0.7)
        ax.axvline(0.0, color="black", linewidth=0.8)
        ax.set_title(f"{name}: reward margin")
        ax.set_xlabel("beta * ((pc - rc) - (pr - rr))")
        ax.set_ylabel("pairs")
    for i, tag in enumerate(tags):
        ax = axes[top + i // cols][i % cols]
        ax.set_visible(True)
        for run, run_curves in curves.items():
            if tag in run_curves:
                ax.plot(run_curves[tag]["steps"], run_curves[tag]["values"], marker=".", label=run)
        ax.set_title(tag)
        ax.set_xlabel("step")
        ax.legend(fontsize="small")
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------ report
def _fmt(value, digits=4) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def markdown_table(results: dict) -> str:
    """Models side by side (the reference first); a dash where a metric is not defined for a column."""
    models = results["models"]
    names = list(models)
    unpaired = results.get("format") == "unpaired"
    rows = [
        ("accuracy vs the KL point (ties apart)" if unpaired else "preference accuracy (ties apart)",
         lambda m: _fmt(m.get("accuracy"))),
        ("ties", lambda m: _fmt(m.get("ties"))),
        ("accuracy, ties as half", lambda m: _fmt(m.get("accuracy_ties_half"))),
        ("reward margin, mean", lambda m: _fmt(m.get("reward_margin", {}).get("mean"))),
        ("reward margin, median [p5, p95]", lambda m: "—" if "reward_margin" not in m else
         "{:.4f} [{:.4f}, {:.4f}]".format(*(m["reward_margin"]["quantiles"][q] for q in ("0.5", "0.05", "0.95")))),
        ("perplexity, completions" if unpaired else "perplexity, chosen", lambda m: _fmt(m.get("perplexity"), 3)),
        ("KL(policy || ref), token level", lambda m: _fmt(m.get("kl_token_level"))),
        ("KL(policy || ref), sampled ± s.e.", lambda m: "—" if "kl_sampled" not in m else
         f"{m['kl_sampled']['mean']:.4f} ± {m['kl_sampled']['stderr']:.4f}"),
        ("win rate vs reference (ties)", lambda m: "—" if "win_rate" not in m else
         f"{m['win_rate']['win_rate']:.3f} ({m['win_rate']['ties']:.3f})"),
    ]
    if unpaired:  # KTO's evaluation (dpo_core.kto.kto_metrics)
        rows[1:1] = [("desirable above the KL point", lambda m: _fmt(m.get("accuracy/desirable"))),
                     ("undesirable below the KL point", lambda m: _fmt(m.get("accuracy/undesirable"))),
                     ("KL point", lambda m: _fmt(m.get("kl_point")))]
    if not any("win_rate" in m for m in models.values()):
        rows = rows[:-1]
    if not any("kl_sampled" in m for m in models.values()):
        rows = [r for r in rows if not r[0].startswith("KL(policy || ref), sampled")]
    count = (f"Held-out unpaired examples: {results['num_examples']}" if unpaired
             else f"Held-out pairs: {results['num_pairs']}")
    lines = [f"{count} ({results['dataset']}, split {results['split']}), "
             f"beta = {results['beta']}, reference = {results['reference_model']}", "",
             "| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for label, get in rows:
        lines.append(f"| {label} | " + " | ".join(get(models[n]) for n in names) + " |")
    return "\n".join(lines)
