"""dpo_core: Direct Preference Optimization on accelerate.

    from dpo_core import DPOConfig, SFTConfig, train_dpo, train_sft, load_model_and_tokenizer

Where things live: README.md, "Where things live" (one line per module).
The names below load their module on first use: `import dpo_core` imports neither torch nor transformers.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "DPOConfig": "dpo_core.config",
    "SFTConfig": "dpo_core.config",
    "TrainResult": "dpo_core.runs",
    "train_dpo": "dpo_core.dpo",
    "train_sft": "dpo_core.sft",
    "load_model_and_tokenizer": "dpo_core.modeling",
    "generate": "dpo_core.generation",
    "build_identity_shift_dataset": "dpo_core.identity",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'dpo_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__():
    return sorted({*globals(), *_EXPORTS})
