"""What tokenizing makes and what decides it: `Example` (one tokenized pair) and `TokenizeSettings`.

    settings = TokenizeSettings(max_length=512, truncation_mode="keep_end")

Kept free of torch (like `dpo_core.data`, `dpo_core.records` and the tokenize functions): the worker processes
that tokenize a large dataset (`dpo_core.prepared`) import these modules, not the trainer's, so each worker costs
the tokenizer's memory and not a copy of torch's. `dpo_core.config` and `dpo_core.batches` re-export the two names.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from .errors import ConfigError


@dataclass
class Example:
    """One tokenized preference pair; `chosen_ids`/`rejected_ids` hold completion tokens only."""

    id: int
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]


@dataclass
class TokenizeSettings:
    """Every setting that changes the token ids (its fields go into the fingerprints of the reference cache).
    `DataArguments` extends it; `data_args.tokenize_settings()` is the copy the data layer takes."""

    max_length: int | None = field(
        default=512, metadata={"help": "Max tokens of prompt + completion, per sequence."})
    max_prompt_length: int | None = field(default=None, metadata={"help": "Max prompt tokens (truncated first)."})
    max_completion_length: int | None = field(
        default=None, metadata={"help": "Max tokens of each completion (its end is cut)."})
    truncation_mode: str = field(
        default="keep_start",
        metadata={"help": "keep_start: cut the end of long sequences (and of long prompts); keep_end: cut the "
                  "start of the prompt."})

    def __post_init__(self):
        if self.truncation_mode not in ("keep_start", "keep_end"):
            raise ConfigError(f"--truncation_mode must be keep_start or keep_end, got {self.truncation_mode!r}")
        for name in ("max_length", "max_prompt_length", "max_completion_length"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ConfigError(f"--{name} must be a positive integer or None, got {value!r}")
        if self.max_length and self.max_prompt_length and self.max_prompt_length >= self.max_length:
            raise ConfigError(f"--max_prompt_length ({self.max_prompt_length}) must be below --max_length "
                              f"({self.max_length}) to leave room for the completion.")

    def tokenize_settings(self) -> TokenizeSettings:
        """The tokenization settings alone (a `DataArguments` holds them among its other fields)."""
        return TokenizeSettings(**{f.name: getattr(self, f.name) for f in fields(TokenizeSettings)})
