"""The batch layouts of the DPO forward, each declared once: its collator, its forward and its constraints.

`--forward_mode` takes the names of `LAYOUTS`; its choices and help are built from this table. Every
layout gives the same log-probs (float32 rounding; tests/test_forward_modes.py runs each against the plain
one-pair forward). A new layout is one `Layout(...)` entry below: a collator in `dpo_core.batches`, a
forward in `dpo_core.logps`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Callable

from .batches import collate_concat, collate_padding_free, collate_shared_prefix
from .errors import ConfigError
from .logps import attn_implementation, concatenated_forward, padding_free_forward, shared_prefix_forward


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


def forward_mode_help() -> str:
    return "Batch layout of the forward (the same log-probs in each): " + "; ".join(
        f"{name}: {layout.help}" for name, layout in LAYOUTS.items()) + "."


def check_layout_flags(forward_mode: str, logps_chunk_size: int) -> None:
    """`--forward_mode` / `--logps_chunk_size` validation, shared by training and the reference precompute."""
    if forward_mode not in LAYOUTS:
        raise ConfigError(f"--forward_mode must be one of {', '.join(LAYOUTS)}, got {forward_mode!r}")
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


def make_collator(mode: str, pad_token_id: int, model=None) -> Callable:
    """The collator of `--forward_mode mode` for `model` (its attention implementation picks the options)."""
    layout = _layout_for(mode, model)
    attention = attn_implementation(model) if model is not None else "eager"
    return partial(layout.collate, pad_token_id=pad_token_id, **layout.collate_options(attention))


def make_forward(mode: str, *, chunk_size: int, **kwargs) -> Callable:
    """The forward of `--forward_mode mode`: `(model, batch, **overrides) -> ForwardOutput`."""
    return partial(LAYOUTS[mode].forward, chunk_size=chunk_size, **kwargs)
