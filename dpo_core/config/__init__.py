"""Every argument dataclass of the project, in one room.

`run`: the training groups (model, data, DPO, training) and the flat `DPOConfig` / `SFTConfig`;
`tools`: the precompute, evaluation, generation, identity-shift and benchmark flags;
`parsing`: `--config FILE.yaml` plus command-line overrides, and the resolved config of a run.
"""

from .parsing import parse_config, resolved_config, save_config
from .run import (
    DataArguments,
    DPOArguments,
    DPOConfig,
    ModelArguments,
    SFTConfig,
    TokenizeSettings,
    TrainArguments,
)
from .tools import (
    AskArguments,
    BenchmarkArguments,
    ConciseArguments,
    EvalArguments,
    GenerationArguments,
    IdentityArguments,
    PrecomputeArguments,
)

__all__ = ["AskArguments", "BenchmarkArguments", "DataArguments", "DPOArguments", "DPOConfig", "EvalArguments",
           "ConciseArguments", "GenerationArguments", "IdentityArguments", "ModelArguments", "PrecomputeArguments", "SFTConfig",
           "TokenizeSettings", "TrainArguments", "parse_config", "resolved_config", "save_config"]
