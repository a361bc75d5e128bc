"""Raw preference records: reading files, folders and hub datasets row by row, and reporting bad rows.

Every row keeps where it came from (file and line, or split and row) so that a problem found later,
while validating or tokenizing, names the file, the record and the field.

Past 450 lines on purpose: one responsibility, raw records (read in every format, selected, mixed, reported,
fingerprinted); the JSON-lines reader keeps records as byte ranges, so that large files stay small.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError, DataError, MissingError

logger = logging.getLogger(__name__)

EXTENSIONS = (".jsonl", ".json", ".parquet")
MAX_LISTED_PROBLEMS = 50


@dataclass
class Record:
    """One raw row. A row that could not be parsed has `data=None` and `error` set."""

    id: int            # row index in its split: stable, and kept by a carved eval split
    source: str        # file path, or "hub:<name>[<config>]/<split>"
    location: str      # "line 12" (jsonl, 1-based) or "row 12" (json array / parquet / hub, 0-based)
    data: dict | None
    error: str | None = None

    def with_id(self, new_id: int) -> Record:
        return Record(new_id, self.source, self.location, self.data, self.error)

    def loaded(self) -> Record:
        return self

    def digest_bytes(self) -> bytes:
        """What the data fingerprint hashes: the id and the canonical JSON of the row."""
        return json.dumps([self.id, self.data], sort_keys=True, ensure_ascii=False, separators=(",", ":"),
                          default=str).encode("utf-8") + b"\n"


class LineRecord:
    """One line of a JSON-lines file, parsed when read (`data`, `error`) from the file's bytes: what a large
    file costs in memory is a few integers per line, and what worker processes receive is its byte range, not
    its content. `loaded()` parses it once into a `Record`."""

    __slots__ = ("id", "source", "lineno", "start", "end")

    def __init__(self, id: int, source: str, lineno: int, start: int, end: int):
        self.id, self.source, self.lineno, self.start, self.end = id, source, lineno, start, end

    @property
    def location(self) -> str:
        return f"line {self.lineno}"

    def raw(self) -> bytes:
        return _read_range(self.source, self.start, self.end)

    def loaded(self) -> Record:
        data, error = _parse_line(self.raw())
        return Record(self.id, self.source, self.location, data, error)

    @property
    def data(self) -> dict | None:
        return self.loaded().data

    @property
    def error(self) -> str | None:
        return self.loaded().error

    def with_id(self, new_id: int) -> LineRecord:
        return LineRecord(new_id, self.source, self.lineno, self.start, self.end)

    def digest_bytes(self) -> bytes:
        """The id and the line's bytes (a changed byte is another fingerprint)."""
        return f"{self.id}:".encode() + self.raw() + b"\n"

    def __eq__(self, other) -> bool:
        return (isinstance(other, LineRecord) and (self.id, self.source, self.start, self.end)
                == (other.id, other.source, other.start, other.end))

    def __repr__(self) -> str:
        return f"LineRecord(id={self.id}, {self.source}, {self.location})"


def loaded(records: list) -> list[Record]:
    """The records parsed (`LineRecord.loaded`), e.g. a worker's chunk before validation and tokenization."""
    return [r.loaded() for r in records]


@dataclass
class Problem:
    """One reason a record cannot be used."""

    source: str
    location: str
    field: str         # "prompt" | "chosen" | "rejected" | "json" | "chat_template" | "tools" | ...
    reason: str

    def __str__(self) -> str:
        return f"{self.source}, {self.location}, field '{self.field}': {self.reason}"


def problem_counts(problems: list[Problem]) -> dict[str, Any]:
    """{"records": bad records, "problems": total, "by_field": {field: count}} (a record may have several)."""
    return {"records": len({(p.source, p.location) for p in problems}), "problems": len(problems),
            "by_field": dict(Counter(p.field for p in problems).most_common())}


class DataValidationError(DataError):
    """Raised with every problem found (the message lists the first 50); `.problems` holds them all."""

    def __init__(self, problems: list[Problem], report_path: str | Path | None = None):
        self.problems, self.counts = problems, problem_counts(problems)
        lines = [f"{self.counts['records']} invalid record(s), {len(problems)} problem(s) "
                 f"(by field: {self.counts['by_field']}):"]
        lines += [f"  {p}" for p in problems[:MAX_LISTED_PROBLEMS]]
        if len(problems) > MAX_LISTED_PROBLEMS:
            lines.append(f"  ... and {len(problems) - MAX_LISTED_PROBLEMS} more")
        if report_path is not None:
            lines.append(f"All of them are listed in {report_path}.")
        lines.append("Fix the data, or pass --on_invalid skip (on_invalid='skip') to drop these records with a report.")
        super().__init__("\n".join(lines))


# ----------------------------------------------------------------------------------------------- loading

_FILES: dict[str, int] = {}  # path -> an open file descriptor (per process: a spawned worker opens its own)


def _read_range(path: str, start: int, end: int) -> bytes:
    fd = _FILES.get(path)
    if fd is None:
        fd = _FILES[path] = os.open(path, os.O_RDONLY)
    return os.pread(fd, end - start, start)


def _parse_line(raw: bytes) -> tuple[dict | None, str | None]:
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        return None, f"not valid UTF-8 ({e.reason} at byte {e.start})"
    except json.JSONDecodeError as e:
        return None, f"malformed JSON: {e.msg} (column {e.colno})"
    if not isinstance(data, dict):
        return None, f"record is not a JSON object (got {type(data).__name__})"
    return data, None


def _read_jsonl(path: Path, start_id: int = 0) -> list[LineRecord]:
    """One `LineRecord` (line number and byte range) per non-blank line, the file read once line by line; each
    line is parsed later, by the process that tokenizes it (not with `datasets`, so that a malformed line is
    reported with its number)."""
    source = str(path)
    old = _FILES.pop(source, None)  # a file read again is opened again (it may have been replaced)
    if old is not None:
        os.close(old)
    records, offset = [], 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.isspace():
                end = offset + len(raw) - (1 if raw.endswith(b"\n") else 0)
                records.append(LineRecord(start_id + len(records), source, lineno, offset, end))
            offset += len(raw)
    return records


def _rows_to_records(rows, source: str, start_id: int = 0) -> list[Record]:
    return [Record(start_id + i, source, f"row {i}", row, None) if isinstance(row, dict) else
            Record(start_id + i, source, f"row {i}", None, f"record is not a JSON object (got {type(row).__name__})")
            for i, row in enumerate(rows)]


def _read_json(path: Path, start_id: int = 0) -> list[Record]:
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):  # a JSON array: one syntax error makes the whole file unreadable
        try:
            return _rows_to_records(json.loads(text), str(path), start_id)
        except json.JSONDecodeError as e:
            return [Record(start_id, str(path), f"line {e.lineno}", None, f"malformed JSON array: {e.msg}")]
    try:  # {"data": [...]}, as `datasets` reads with field="data"
        whole = json.loads(text)
        if isinstance(whole, dict) and isinstance(whole.get("data"), list):
            return _rows_to_records(whole["data"], str(path), start_id)
    except json.JSONDecodeError:
        pass
    return _read_jsonl(path, start_id)  # JSON lines with a .json name, as `datasets` accepts


def _read_file(path: Path, start_id: int = 0) -> list[Record]:
    if path.suffix == ".jsonl":
        return _read_jsonl(path, start_id)
    if path.suffix == ".json":
        return _read_json(path, start_id)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq
        return _rows_to_records(pq.read_table(path).to_pylist(), str(path), start_id)
    raise DataError(f"{path}: unsupported file type (expected one of {', '.join(EXTENSIONS)})")


def _split_files(folder: Path) -> dict[str, list[Path]]:
    """Data files of a folder by split, named `<split>.<ext>` or `<split>-*.<ext>` (also under `data/`)."""
    splits: dict[str, list[Path]] = {}
    for path in sorted([*folder.glob("*"), *folder.glob("data/*")]):
        if path.is_file() and path.suffix in EXTENSIONS:
            splits.setdefault(path.name[: -len(path.suffix)].split("-")[0], []).append(path)
    return splits


def _load_split(dataset_name: str, split: str, dataset_config: str | None) -> list[Record]:
    path = Path(dataset_name).expanduser()
    if path.is_file():
        return _read_file(path)
    if path.is_dir():
        splits = _split_files(path)
        if split not in splits:
            raise DataError(f"{path}: no files for split {split!r} (expected {split}.jsonl/.json/.parquet or "
                             f"{split}-*.<ext>); available splits: {sorted(splits) or 'none'}")
        records: list[Record] = []
        for file in splits[split]:  # shards: ids continue across files, in name order
            records += _read_file(file, start_id=len(records))
        return records
    if path.suffix in EXTENSIONS or dataset_name.startswith((".", "/", "~")):
        raise MissingError(f"{dataset_name}: no such file or directory")
    import datasets

    # The split is part of the source: "row 3" alone would not say whether of train or of test.
    source = f"hub:{dataset_name}" + (f"[{dataset_config}]" if dataset_config else "") + f"/{split}"
    return _rows_to_records(datasets.load_dataset(dataset_name, dataset_config, split=split), source)


# ----------------------------------------------------------------------------------------------- mixtures

@dataclass(frozen=True)
class Source:
    """One source of a mixture: `name[:split][:amount]`; amount is a fraction in (0, 1] (a float) or a count
    (an int) of that source's records, a seeded random selection kept in file order."""

    name: str
    split: str | None = None
    amount: float | int | None = None


def _amount(text: str) -> float | int | None:
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text) if "." in text or "e" in text.lower() else None
    except ValueError:
        return None


def parse_sources(dataset_name: str) -> list[Source]:
    """`"data/a.jsonl:0.5 org/set:train:2000"` -> two `Source`s (whitespace separates sources; from the right,
    a number is the amount, then a word the split). A plain name is one source with neither."""
    sources = []
    for spec in dataset_name.split():
        name, split, amount = spec, None, None
        if ":" in name and _amount(name.rsplit(":", 1)[1]) is not None:
            name, text = name.rsplit(":", 1)
            amount = _amount(text)
        if ":" in name and "/" not in name.rsplit(":", 1)[1]:
            name, split = name.rsplit(":", 1)
        if isinstance(amount, float) and not 0.0 < amount <= 1.0:
            raise ConfigError(f"--dataset_name {spec}: a fraction must be in (0, 1], got {amount}")
        if isinstance(amount, int) and amount < 1:
            raise ConfigError(f"--dataset_name {spec}: a count must be >= 1, got {amount}")
        sources.append(Source(name, split or None, amount))
    if not sources:
        raise ConfigError("--dataset_name is empty")
    return sources


def mixture_spec(mixture: dict) -> str:
    """The alignment-handbook style YAML block as one `--dataset_name` value:

        dataset_mixture:
          datasets:
            - {id: data/a.jsonl, weight: 0.5}
            - {id: org/set, split: train, count: 2000}

    (`weight` is a fraction in (0, 1] of that source's records; `count` a number of them.)"""
    if not isinstance(mixture, dict) or not isinstance(mixture.get("datasets"), list) or not mixture["datasets"]:
        raise ConfigError("dataset_mixture: expected a mapping with a non-empty list 'datasets'")
    unknown = sorted(set(mixture) - {"datasets"})
    if unknown:
        raise ConfigError(f"dataset_mixture: unknown keys {unknown} (known: datasets)")
    specs = []
    for i, entry in enumerate(mixture["datasets"]):
        where = f"dataset_mixture.datasets[{i}]"
        if not isinstance(entry, dict) or not entry.get("id"):
            raise ConfigError(f"{where}: expected a mapping with an 'id'")
        bad = sorted(set(entry) - {"id", "split", "weight", "count"})
        if bad:
            raise ConfigError(f"{where}: unknown keys {bad} (known: id, split, weight, count)")
        if "weight" in entry and "count" in entry:
            raise ConfigError(f"{where}: give weight or count, not both")
        spec = str(entry["id"])
        if entry.get("split"):
            spec += f":{entry['split']}"
        if "weight" in entry:
            spec += f":{float(entry['weight'])!r}"
        elif "count" in entry:
            spec += f":{int(entry['count'])}"
        specs.append(spec)
    spec = " ".join(specs)
    parse_sources(spec)  # the same checks as on the command line
    return spec


def _select(records: list[Record], source: Source, index: int, seed: int, spec: str) -> list[Record]:
    if source.amount is None:
        return records
    n = max(1, round(source.amount * len(records))) if isinstance(source.amount, float) else source.amount
    if n > len(records):
        raise ConfigError(f"--dataset_name {spec}: asks for {n} records, {source.name} has {len(records)}")
    kept = sorted(random.Random(f"mixture/{index}/{seed}").sample(range(len(records)), n))
    return [records[i] for i in kept]


def _renumbered(records: list[Record]) -> list[Record]:
    """Ids unique across the mixture (each record keeps its source and location for messages)."""
    return [r.with_id(i) for i, r in enumerate(records)]


def _load_mixture(sources: list[Source], dataset_name: str, split: str, eval_split: str | None,
                  dataset_config: str | None, seed: int) -> tuple[list[Record], list[Record] | None]:
    train, held_out = [], [] if eval_split is not None else None
    for i, source in enumerate(sources):
        spec = dataset_name.split()[i]
        if Path(source.name).expanduser().is_file() and (source.split or eval_split):
            raise ConfigError(f"--dataset_name {spec}: {source.name} is a single file, i.e. one split: name no "
                              "split for it (and use --eval_fraction rather than --eval_split)")
        records = _load_split(source.name, source.split or split, dataset_config)
        train += _select(records, source, i, seed, spec)
        if eval_split is not None:
            held_out += _load_split(source.name, eval_split, dataset_config)
    return _renumbered(train), (_renumbered(held_out) if held_out is not None else None)


def load_splits(dataset_name: str, *, split: str = "train", eval_split: str | None = None,
                eval_fraction: float = 0.0, seed: int = 0, dataset_config: str | None = None,
                max_train_samples: int | None = None, max_eval_samples: int | None = None
                ) -> dict[str, list[Record]]:
    """Reads raw records from a .jsonl/.json/.parquet file, a folder of split files, or a hub dataset.

    Args:
        dataset_name: a file (it is the `split`), a folder (`<split>.<ext>` / `<split>-*.<ext>`), or a hub name;
            or a mixture of them: `"data/a.jsonl:0.5 org/set:train:2000"` (see `parse_sources`): each source's
            selection, concatenated in the order given, ids renumbered, every record keeping its source.
        split: the training split.
        eval_split: a named split to evaluate on (folder or hub only).
        eval_fraction: 0 < f < 1 carves a seeded random held-out subset out of `split`; ids are kept.
        seed: seed of that carve-out.
        dataset_config: hub config name.
        max_train_samples / max_eval_samples: keep at most this many records of the training / held-out
            split (after the carve-out): a seeded random selection (`seed`), in file order.

    Returns:
        {"train": records, "eval": records}; "eval" is absent when neither eval option is given.
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise ConfigError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    if eval_split is not None and eval_fraction > 0:
        raise ConfigError("give either eval_split or eval_fraction, not both")
    sources = parse_sources(dataset_name)
    mixture = len(sources) > 1 or sources[0].split is not None or sources[0].amount is not None
    if not mixture and eval_split is not None and Path(dataset_name).expanduser().is_file():
        raise ConfigError(f"{dataset_name} is a single file, i.e. one split: use eval_fraction, or a folder "
                         f"holding {split}.<ext> and {eval_split}.<ext>")
    if mixture:
        records, held_out = _load_mixture(sources, dataset_name, split, eval_split, dataset_config, seed)
    else:
        records = _load_split(dataset_name, split, dataset_config)
        held_out = _load_split(dataset_name, eval_split, dataset_config) if eval_split is not None else None
    if eval_split is not None:
        splits = {"train": records, "eval": held_out}
    elif eval_fraction == 0:
        splits = {"train": records}
    else:
        n_eval = max(1, round(eval_fraction * len(records)))
        if n_eval >= len(records):
            raise ConfigError(f"eval_fraction={eval_fraction} leaves no training records out of {len(records)}")
        held_out = set(random.Random(seed).sample(range(len(records)), n_eval))
        splits = {"train": [r for i, r in enumerate(records) if i not in held_out],
                  "eval": [r for i, r in enumerate(records) if i in held_out]}
    for name, limit in (("train", max_train_samples), ("eval", max_eval_samples)):
        if name in splits:
            splits[name] = select_records(splits[name], limit, seed=seed, split=name)
    return splits


def select_records(records: list[Record], limit: int | None, *, seed: int, split: str) -> list[Record]:
    """At most `limit` records: a random selection seeded by `seed` and the split name (the same records for
    the same seed), kept in their file order. All of them when `limit` is None or not below their number."""
    if limit is None or limit >= len(records):
        return records
    kept = sorted(random.Random(f"{split}/{seed}").sample(range(len(records)), limit))
    return [records[i] for i in kept]


# ---------------------------------------------------------------------------------------- reporting

def _write_report(problems: list[Problem], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=path.parent, prefix=f".{path.name}.",
                                     delete=False) as f:
        for p in problems:
            f.write(json.dumps({"source": p.source, "location": p.location, "field": p.field,
                                "reason": p.reason}, ensure_ascii=False) + "\n")
    os.replace(f.name, path)  # atomic: a reader never sees half a report


def check_on_invalid(on_invalid: str, report_path) -> None:
    if on_invalid not in ("error", "skip"):
        raise ConfigError(f"on_invalid must be 'error' or 'skip', got {on_invalid!r}")
    if on_invalid == "skip" and report_path is None:
        raise ConfigError("on_invalid='skip' needs a report path, so that skipped records are listed somewhere")


def check_problems(problems: list[Problem], *, on_invalid: str = "error",
                   report_path: str | Path | None = None) -> None:
    """Raises on invalid records, or skips them with a report; never drops a record silently.

    Args:
        problems: from `tokenize_records`.
        on_invalid: "error" raises one `DataValidationError` listing them all (first 50 in the message);
            "skip" logs a warning with the counts and the report path.
        report_path: JSONL report, one object per problem (source, location, field, reason). Required with
            "skip", where it is always (re)written, empty when there are no problems, so a stale report
            never outlives its data. With "error" it is written only when there are problems.
    """
    check_on_invalid(on_invalid, report_path)
    if report_path is not None and (problems or on_invalid == "skip"):
        _write_report(problems, Path(report_path))
    if problems and on_invalid == "error":
        raise DataValidationError(problems, report_path)
    if problems:
        counts = problem_counts(problems)
        logger.warning("Skipped %d invalid record(s) (%d problem(s), by field: %s); listed in %s",
                       counts["records"], counts["problems"], counts["by_field"], report_path)


# ---------------------------------------------------------------------------------------- fingerprints

def dataset_fingerprint(records: list[Record]) -> str:
    """sha256 over every record's id and content, in order: a JSON-lines record's bytes, another record's canonical
    JSON."""
    h = hashlib.sha256()
    for r in records:
        h.update(r.digest_bytes())
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of everything that decides token ids here: vocabulary, merges, normalizer, pre-tokenizer and
    post-processor (the fast backend's JSON), chat template, bos/eos/pad tokens and padding/truncation side."""
    if getattr(tokenizer, "is_fast", False):
        backend = tokenizer.backend_tokenizer.to_str()
    else:
        backend = json.dumps(sorted(tokenizer.get_vocab().items()))
    state = {"backend": backend, "chat_template": tokenizer.chat_template,
             "special": [str(tokenizer.bos_token), str(tokenizer.eos_token), str(tokenizer.pad_token)],
             "sides": [tokenizer.padding_side, tokenizer.truncation_side]}
    return hashlib.sha256(json.dumps(state, sort_keys=True, default=str).encode("utf-8")).hexdigest()
