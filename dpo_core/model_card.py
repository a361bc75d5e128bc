"""The model card (`README.md`) every final save writes into its output directory, with
`huggingface_hub.ModelCard` / `ModelCardData`: the front matter the hub reads (base model, datasets, library,
tags, license) and a short body: how the model was trained (the resolved config, secrets redacted, and the
command line), its final metrics, its training curves (`training_curves.png`, when matplotlib is installed)
and how to load it.
"""

from __future__ import annotations

import json
import logging
import shlex
import sys
from pathlib import Path

import yaml

from .config.parsing import _SECRET, resolved_config
from .records import parse_sources

logger = logging.getLogger(__name__)

CARD = "README.md"
CURVES = "training_curves.png"


def base_model_of(model_name_or_path: str | None) -> str | None:
    """The base model: `--model_name_or_path`, or, when it holds an adapter, the adapter's base."""
    if not model_name_or_path:
        return None
    adapter_config = Path(model_name_or_path) / "adapter_config.json"
    if adapter_config.is_file():
        return json.loads(adapter_config.read_text()).get("base_model_name_or_path") or model_name_or_path
    return model_name_or_path


def is_hub_dataset(dataset_name: str | None) -> bool:
    """A hub dataset name (`org/name`), not a local file or folder."""
    return bool(dataset_name) and not Path(dataset_name).expanduser().exists()


def base_license(base_model: str | None) -> str | None:
    """The license of the base model: its README.md front matter, else its config's `license`; a local
    directory, or a hub model already in the local cache (nothing is downloaded)."""
    if not base_model:
        return None
    folder = Path(base_model).expanduser()
    readme, config = folder / CARD, folder / "config.json"
    if not folder.is_dir():
        try:
            from huggingface_hub import try_to_load_from_cache

            found = [try_to_load_from_cache(base_model, name) for name in (CARD, "config.json")]
            readme, config = (Path(f) if isinstance(f, str) else Path("/nonexistent") for f in found)
        except Exception:  # noqa: BLE001 - not a valid repo id: no license to find
            return None
    if readme.is_file():
        from huggingface_hub import ModelCard

        try:
            license_ = ModelCard.load(readme).data.license
        except Exception:  # noqa: BLE001 - a README without (valid) front matter
            license_ = None
        if license_:
            return license_
    if config.is_file():
        return json.loads(config.read_text()).get("license")
    return None


def redact_argv(argv: list[str]) -> list[str]:
    """The command line with the value of any secret-looking flag (`--hub_token x`, `--api_key=x`) redacted."""
    out, hide_next = [], False
    for arg in argv:
        if hide_next:
            out.append("<redacted>")
            hide_next = False
            continue
        name, eq, _ = arg.partition("=")
        if arg.startswith("-") and _SECRET.search(name):
            out.append(f"{name}=<redacted>" if eq else arg)
            hide_next = not eq
        else:
            out.append(arg)
    return out


def _curves(output_dir: Path) -> str | None:
    """`training_curves.png` from the run's TensorBoard logs (`dpo_core.report`); None without matplotlib,
    TensorBoard or logs."""
    try:
        import matplotlib  # noqa: F401

        from .report import CURVE_TAGS, read_training_curves, save_plot

        curves = read_training_curves(output_dir / "logs")
        if not any(tag in curves for tag in CURVE_TAGS):
            return None
        save_plot(output_dir / CURVES, {}, {output_dir.name: curves})
        return CURVES
    except Exception as e:  # noqa: BLE001 - the card is written without curves rather than not at all
        logger.info("model card: no training curves (%s)", e)
        return None


def _metrics_table(metrics: dict) -> str:
    rows = [f"| {k} | {v:.6g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()]
    return "\n".join(["| metric | value |", "|---|---|", *rows])


def _how_to_load(repo: str, adapter: bool, merged: bool) -> str:
    if adapter:
        text = (f"```python\nfrom peft import AutoPeftModelForCausalLM\nfrom transformers import AutoTokenizer\n\n"
                f"model = AutoPeftModelForCausalLM.from_pretrained(\"{repo}\")  # the base + this adapter\n"
                f"tokenizer = AutoTokenizer.from_pretrained(\"{repo}\")\n```\n\nor, on a base model already "
                f"loaded: `peft.PeftModel.from_pretrained(base_model, \"{repo}\")`.")
        if merged:
            text += (f" The merged weights (base + adapter) are in `merged/`: "
                     f"`AutoModelForCausalLM.from_pretrained(\"{repo}\", subfolder=\"merged\")` from the hub, "
                     f"or the local path `{repo}/merged`.")
        return text
    return (f"```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f"model = AutoModelForCausalLM.from_pretrained(\"{repo}\")\n"
            f"tokenizer = AutoTokenizer.from_pretrained(\"{repo}\")\n```")


def write_model_card(output_dir: str | Path, *, configs: tuple, metrics: dict, method: str = "dpo",
                     adapter: bool = False, repo_id: str | None = None, argv: list[str] | None = None) -> Path:
    """Writes `output_dir/README.md` (and `training_curves.png`). `configs`: the run's config groups (their
    fields are read by name: `model_name_or_path`, `dataset_name`, `loss_type`, `merge_adapter`);
    `adapter`: the output is a peft adapter; `repo_id`: the hub repository the loading example names
    (default: the output directory)."""
    from huggingface_hub import ModelCard, ModelCardData

    output_dir = Path(output_dir)
    values = {}
    for config in configs:
        values.update(vars(config))
    base = base_model_of(values.get("model_name_or_path"))
    dataset = values.get("dataset_name")
    loss_types = list(values.get("loss_type") or []) if method in ("dpo", "kto") else []
    tags = [method, "dpo_core", *[t for t in loss_types if t not in (method, "dpo_core")]]
    # On the hub, base_model must name a hub model (the hub refuses the card otherwise): a local base
    # directory stays in the body only when the card is pushed.
    hub_base = base if not (repo_id and base and Path(base).expanduser().exists()) else None
    hub_datasets = [s.name for s in parse_sources(dataset) if is_hub_dataset(s.name)] if dataset else []
    data = ModelCardData(base_model=hub_base, datasets=hub_datasets or None,
                         library_name="peft" if adapter else "transformers", tags=tags,
                         license=base_license(base), pipeline_tag="text-generation")
    config_yaml = yaml.safe_dump(json.loads(json.dumps(resolved_config(*{id(c): c for c in configs}.values()))),
                                 sort_keys=False)
    command = shlex.join(redact_argv(list(sys.argv if argv is None else argv)))
    what = {"dpo": f"DPO ({', '.join(loss_types)})", "kto": f"KTO ({', '.join(loss_types)}, unpaired)",
            "sft": "supervised fine-tuning (SFT)"}.get(method, method)
    curves = _curves(output_dir)
    body = [f"# {output_dir.name}", "",
            f"{'A LoRA adapter of' if adapter else 'A fine-tune of'} `{base}` trained with {what} by "
            f"dpo_core on `{dataset}`.", "",
            "## How to load it", "", _how_to_load(repo_id or str(output_dir), adapter,
                                                  bool(values.get("merge_adapter"))), "",
            "## Results", "", _metrics_table(metrics), ""]
    if curves:
        body += ["## Training curves", "", f"![training curves]({curves})", ""]
    body += ["## How it was trained", "", "Command line:", "", f"```bash\n{command}\n```", "",
             "Resolved config (`config.yaml`; `--config` accepts it again):", "", f"```yaml\n{config_yaml}```", ""]
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body))
    path = output_dir / CARD
    tmp = output_dir / (CARD + ".tmp")
    card.save(tmp)
    tmp.replace(path)
    return path


__all__ = ["write_model_card", "base_model_of", "base_license", "is_hub_dataset", "redact_argv"]
