"""`--torch_compile`: regional compilation of a model's decoder blocks, in place.

Each repeated block (the classes transformers lists in `_no_split_modules`, else accelerate's repeated
`ModuleList`s) is compiled with `nn.Module.compile`, which keeps the module's own `__call__`: the hooks DDP,
DeepSpeed and FSDP install still run, the parameters stay where they are (checkpoints and LoRA unchanged), and
the blocks share one compiled graph (same code, weights as inputs), so a 30-layer model compiles like one
layer. What stays eager: embeddings, the final norm and the chunked LM head (`dpo_core.chunked_head`), which
swaps the head per forward and scores only completion tokens.

Shapes: every new sequence length can recompile once, then torch marks it dynamic; `--pad_to_multiple_of`
(64 under `--torch_compile`) keeps the lengths few. `compiled_graphs()` counts the graphs compiled so far
(logged as `train/compiled_graphs`).
"""

from __future__ import annotations

import torch
from torch import nn

from .chunked_head import unwrap_model
from .errors import ConfigError


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The outermost repeated blocks of `model` (its decoder layers)."""
    from accelerate.utils.other import is_repeated_blocks

    base = unwrap_model(model)
    names = set(getattr(base, "_no_split_modules", None) or ())
    blocks: list[nn.Module] = []
    inside: set[int] = set()
    for module in base.modules():
        if id(module) in inside:
            continue
        if type(module).__name__ in names:
            blocks.append(module)
            inside.update(id(m) for m in module.modules())
    if not blocks:  # no _no_split_modules: the first ModuleList of blocks of one class
        for module in base.modules():
            if is_repeated_blocks(module):
                blocks = list(module)
                break
    return blocks


def compile_blocks(model: nn.Module, *, mode: str | None = None, backend: str | None = None) -> int:
    """Compiles the decoder blocks of `model` in place; returns how many. A model without repeated blocks is a
    ConfigError (nothing would be compiled)."""
    blocks = decoder_blocks(model)
    if not blocks:
        raise ConfigError(f"--torch_compile: {type(unwrap_model(model)).__name__} has no repeated decoder blocks "
                          "to compile; run without --torch_compile")
    kwargs = {"backend": backend or "inductor"}
    if mode and mode != "default":
        kwargs["mode"] = mode
    for block in blocks:
        block.compile(**kwargs)
    return len(blocks)


def compiled_graphs() -> int:
    """Graphs torch.compile has compiled in this process so far (recompiles included)."""
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def compile_for_training(accelerator, train_args, *models) -> None:
    """`--torch_compile`: compiles each model's blocks (after `accelerator.prepare`) and says so."""
    if not getattr(train_args, "torch_compile", False):
        return
    backend = train_args.torch_compile_backend or "inductor"
    for model in models:
        count = compile_blocks(model, mode=train_args.torch_compile_mode, backend=backend)
        accelerator.print(f"torch.compile: {count} decoder blocks of {type(unwrap_model(model)).__name__} compiled "
                          f"in place (backend {backend}, mode {train_args.torch_compile_mode or 'default'}, rows "
                          f"padded to a multiple of {train_args.pad_to_multiple_of})")
