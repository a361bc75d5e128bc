"""Parsing: `--config FILE.yaml` plus command-line overrides into the config dataclasses (`HfArgumentParser`),
and the resolved config written into a run directory (secrets redacted)."""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import asdict, fields, is_dataclass
from pathlib import Path

import yaml
from transformers import HfArgumentParser

from ..errors import ConfigError, MissingError

_SECRET = re.compile(r"token|secret|password|api_key|apikey|credential", re.IGNORECASE)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the scripts' copy-paste launch commands intact and shows every default."""


def parse_config(dataclass_types: tuple, argv: list[str] | None = None, description: str | None = None,
                 yaml_ignore: tuple = ()):
    """Parses `--config FILE.yaml` then the command line (which overrides the YAML) into dataclasses.

    Unknown YAML keys are an error (a typo must not be silently ignored), except keys of `yaml_ignore`
    groups: one recipe file serves several scripts (the precompute ignores the optimizer's keys).
    Returns one instance per type.
    """
    parser = HfArgumentParser(dataclass_types, description=description, formatter_class=_HelpFormatter)
    parser.add_argument("--config", type=str, default=None,
                        help="YAML file of flag values; flags given on the command line override it.")
    argv = sys.argv[1:] if argv is None else argv
    known, _ = parser.parse_known_args(argv)
    if known.config:
        if not Path(known.config).is_file():
            raise MissingError(f"--config {known.config}: no such file")
        try:
            values = yaml.safe_load(Path(known.config).read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{known.config}: not valid YAML ({e})".replace("\n", " ")) from None
        if not isinstance(values, dict):
            raise ConfigError(f"{known.config}: expected a mapping of flag names to values")
        valid = {f.name for dc in dataclass_types for f in fields(dc)}
        ignored = {f.name for dc in yaml_ignore for f in fields(dc)} - valid
        unknown = sorted(set(values) - valid - ignored)
        if unknown:
            raise ConfigError(f"{known.config}: unknown keys {unknown}")
        parser.set_defaults(**{k: v for k, v in values.items() if k in valid})
    # The extra --config flag comes back as one trailing argparse Namespace: drop it.
    parsed = parser.parse_args_into_dataclasses(argv)
    return tuple(p for p in parsed if is_dataclass(p))


def resolved_config(*configs) -> dict:
    """All fields of the given dataclasses as one flat dict, with secret-looking values redacted."""
    out = {}
    for cfg in configs:
        for key, value in asdict(cfg).items():
            out[key] = "<redacted>" if _SECRET.search(key) and value else value
    return out


def save_config(path: str | Path, *configs) -> None:
    """Writes the resolved configuration as YAML (loadable again with --config)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(json.loads(json.dumps(resolved_config(*configs))), sort_keys=False))
