"""dpo_core: Direct Preference Optimization on accelerate.

Modules: `losses` (every preference loss), `logps` (the concatenated forward), `data` (loading, validation,
tokenization), `ref_cache` (precomputed reference log-probs), `modeling`, `training` (the loop), `dpo`
(`train_dpo`), `config`, `demo` (the embedded tiny model and dataset).
"""

__version__ = "0.1.0"
