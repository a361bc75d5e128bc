"""The batch layouts of the DPO forward, each declared once: its collator, its forward and its constraints.

`--forward_mode` takes the names of `LAYOUTS`, or `auto` (the default): the fastest layout that is exact for
the model, chosen by `choose_layout` before the first batch. Its choices and help are built from this table.
Every layout gives the same log-probs (float32 rounding; tests/test_forward_modes.py runs each against the
plain one-pair forward). A new layout is one `Layout(...)` entry below: a collator in `dpo_core.batches`, a
forward in `dpo_core.logps`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Sequence

import numpy as np
import torch

from .batches import collate_concat, collate_padding_free, collate_shared_prefix
from .errors import ConfigError
from .logps import (
    attn_implementation,
    concatenated_forward,
    padding_free_forward,
    shared_prefix_forward,
    unwrap_model,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Layout:
    """One batch layout.

    collate: `(examples, pad_token_id, **collate_options(attention)) -> batch`.
    forward: `(model, batch, *, ld_alpha, wpo, chunk_size) -> dpo_core.logps.ForwardOutput`.
    attention: the attention implementations (`config._attn_implementation`) the forward works with; None: any.
    collate_options: extra collator arguments chosen from the model's attention implementation.
    packed: several sequences share a row, so the layout is checked once per model against plain forwards.
    """

    name: str
    help: str
    collate: Callable
    forward: Callable
    attention: tuple[str, ...] | None = None
    collate_options: Callable[[str], dict] = field(default=lambda attention: {})
    packed: bool = False


LAYOUTS: dict[str, Layout] = {layout.name: layout for layout in (
    Layout("concat", "2B right-padded rows (chosen, then rejected), as TRL's DPOTrainer",
           collate_concat, concatenated_forward),
    Layout("padding_free", "the 2B sequences packed into rows without per-sequence padding (flash-attn: one "
           "row with varlen boundaries)", collate_padding_free, padding_free_forward, packed=True,
           collate_options=lambda attention: {"one_row": "flash" in attention}),
    Layout("shared_prefix", "prompt + chosen + rejected as one sequence per pair, the prompt computed once "
           "(a custom mask: eager, sdpa or flex_attention)", collate_shared_prefix, shared_prefix_forward,
           attention=("eager", "sdpa", "flex_attention"), packed=True),
)}


AUTO = "auto"
FORWARD_MODES = [AUTO, *LAYOUTS]  # the choices of --forward_mode
# `auto` takes shared_prefix when the prompt tokens it computes once instead of twice are at least this share of
# what concat computes: P / (2P + C + R), mean prompt, chosen and rejected lengths (tokens).
SHARED_PREFIX_MIN_SAVING = 0.1
PROBE_PAIRS = 4  # pairs of the training data the chosen packed layout is checked on before the first batch


def forward_mode_help() -> str:
    return ("Batch layout of the forward (the same log-probs in each): auto (default): the fastest layout that is "
            "exact for the model, checked on a few pairs before the first batch and logged; " + "; ".join(
                f"{name}: {layout.help}" for name, layout in LAYOUTS.items()) + ".")


def check_layout_flags(forward_mode: str, logps_chunk_size: int) -> None:
    """`--forward_mode` / `--logps_chunk_size` validation, shared by training and the reference precompute."""
    if forward_mode not in FORWARD_MODES:
        raise ConfigError(f"--forward_mode must be one of {', '.join(FORWARD_MODES)}, got {forward_mode!r}")
    if logps_chunk_size < 0:
        raise ConfigError(f"--logps_chunk_size must be >= 0 (0: no chunking), got {logps_chunk_size}")


def _layout_for(mode: str, model) -> Layout:
    layout = LAYOUTS[mode]
    attention = attn_implementation(model) if model is not None else "eager"
    if layout.attention is not None and attention not in layout.attention:
        raise ConfigError(f"--forward_mode {mode} does not run with attention {attention!r} (it takes "
                          f"{', '.join(layout.attention)}): pass --attn_implementation "
                          f"{layout.attention[-1]} or another --forward_mode")
    return layout


def make_collator(mode: str, pad_token_id: int, model=None, pad_to_multiple_of: int | None = None) -> Callable:
    """The collator of `--forward_mode mode` for `model` (its attention implementation picks the options)."""
    if mode == AUTO:
        raise ValueError("--forward_mode auto: resolve it with choose_layout(model, examples) first")
    layout = _layout_for(mode, model)
    attention = attn_implementation(model) if model is not None else "eager"
    return partial(layout.collate, pad_token_id=pad_token_id, pad_to_multiple_of=pad_to_multiple_of,
                   **layout.collate_options(attention))


def make_forward(mode: str, *, chunk_size: int, **kwargs) -> Callable:
    """The forward of `--forward_mode mode`: `(model, batch, **overrides) -> ForwardOutput`."""
    return partial(LAYOUTS[mode].forward, chunk_size=chunk_size, **kwargs)


def _mean_lengths(examples) -> tuple[float, float, float]:
    """Mean prompt, chosen and rejected lengths (tokens); `ExampleArrays` from their offsets, a list from up to
    4096 evenly spaced examples."""
    offsets = getattr(examples, "offsets", None)
    if offsets is not None:
        lengths = np.diff(np.asarray(offsets)).reshape(-1, 3)
    else:
        step = max(1, len(examples) // 4096)
        lengths = np.array([(len(e.prompt_ids), len(e.chosen_ids), len(e.rejected_ids))
                            for e in (examples[i] for i in range(0, len(examples), step))], dtype=np.int64)
    if not len(lengths):
        return 0.0, 0.0, 0.0
    return tuple(float(x) for x in lengths.mean(0))


def _candidates(model, examples) -> list[tuple[str, str]]:
    """Packed layouts worth trying for this model, device and data, fastest first, each with why."""
    attention = attn_implementation(model)
    device = next(unwrap_model(model).parameters()).device.type
    out = []
    if "flash" in attention and device == "cuda":
        out.append(("padding_free", f"{attention} on {device}: one varlen row, nothing padded"))
    prompt, chosen, rejected = _mean_lengths(examples)
    saving = prompt / max(2 * prompt + chosen + rejected, 1e-9)
    shared = LAYOUTS["shared_prefix"].attention
    why = f"prompts are {saving:.0%} of the tokens concat computes (mean lengths {prompt:.0f}/{chosen:.0f}/" \
          f"{rejected:.0f} prompt/chosen/rejected)"
    if saving < SHARED_PREFIX_MIN_SAVING:
        return out
    if attention not in shared:
        logger.info("forward_mode auto: not shared_prefix (%s; attention %s is not one of %s)", why, attention,
                    ", ".join(shared))
    elif attention == "flex_attention" and device == "cpu":
        logger.info("forward_mode auto: not shared_prefix (flex_attention has no backward on a CPU)")
    else:
        out.append(("shared_prefix", f"{why}, computed once per pair, attention {attention}"))
    return out


def _agree(accelerator, ok: bool) -> bool:
    """True when every process found the layout exact (they run the same probe; this keeps them in step)."""
    if accelerator is None or accelerator.num_processes == 1:
        return ok
    flag = torch.tensor([1.0 if ok else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="sum").item() == accelerator.num_processes)


def choose_layout(model, examples: Sequence, *, pad_token_id: int, accelerator=None) -> tuple[str, str]:
    """`--forward_mode auto`: the fastest layout that is exact for `model` on `examples` -> `(mode, reason)`.

    Rules (fastest first): padding_free when the model runs flash-attn on a GPU (one varlen row); shared_prefix
    when the prompts are at least `SHARED_PREFIX_MIN_SAVING` of concat's tokens and the attention takes its mask;
    else concat. A packed candidate is run on the first `PROBE_PAIRS` pairs and checked against plain
    one-sequence forwards (`dpo_core.logps.check_packed_layout`, 1e-4 per token in float32); a model whose
    attention does not follow it (ALiBi) or refuses its mask falls through to the next, so auto never trains on a
    layout the model fails. Every process runs the same probe (ZeRO-3 / FSDP gather in step) and takes the
    layout only if all of them found it exact. Call with the model the forward will use.
    """
    probe = [examples[i] for i in range(min(PROBE_PAIRS, len(examples)))]
    for mode, why in _candidates(model, examples):
        ok, failure = True, ""
        base = unwrap_model(model)
        was_training = base.training
        base.eval()  # the check is skipped while dropout is active
        try:
            batch = make_collator(mode, pad_token_id, model)(probe)
            device = next(base.parameters()).device
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            with torch.no_grad():
                LAYOUTS[mode].forward(model, batch, chunk_size=1024)
        except ConfigError as e:
            ok, failure = False, str(e)
        finally:
            base.train(was_training)
        if _agree(accelerator, ok):
            return mode, why
        logger.info("forward_mode auto: not %s (%s)", mode, failure or "another process found it inexact")
    return "concat", "no packed layout applies (see the lines above) or pays off for this data"


def resolve_forward_mode(mode: str, model, examples: Sequence, *, pad_token_id: int, accelerator=None,
                         log: Callable[[str], None] = print) -> str:
    """`mode` itself, or for `auto` the layout `choose_layout` picks, logged with why."""
    if mode != AUTO:
        return mode
    chosen, why = choose_layout(model, examples, pad_token_id=pad_token_id, accelerator=accelerator)
    log(f"forward_mode auto -> {chosen}: {why}")
    return chosen


class LayoutSlot:
    """The collator and forward of `--forward_mode`, for loaders built before the layout is known: `auto` is
    resolved (`resolve`) after `accelerator.prepare`, so the probe runs the model as the forward will (ZeRO-3
    and FSDP gather weights only inside the prepared model), and before the first batch."""

    def __init__(self, mode: str, pad_token_id: int, model, *, chunk_size: int, pad_to_multiple_of: int | None = None):
        self.mode, self.pad_token_id, self.chunk_size, self.multiple = mode, pad_token_id, chunk_size, pad_to_multiple_of
        self._collate = None if mode == AUTO else make_collator(mode, pad_token_id, model, pad_to_multiple_of)

    def resolve(self, model, examples: Sequence, *, accelerator=None, log: Callable[[str], None] = print) -> str:
        if self.mode == AUTO:
            self.mode = resolve_forward_mode(AUTO, model, examples, pad_token_id=self.pad_token_id,
                                             accelerator=accelerator, log=log)
            self._collate = make_collator(self.mode, self.pad_token_id, model, self.multiple)
        return self.mode

    def collate(self, examples):
        if self._collate is None:
            raise RuntimeError("forward_mode auto was not resolved before the first batch (LayoutSlot.resolve)")
        return self._collate(examples)

    def forward(self, model, batch, **kwargs):
        return LAYOUTS[self.mode].forward(model, batch, **{"chunk_size": self.chunk_size, **kwargs})
