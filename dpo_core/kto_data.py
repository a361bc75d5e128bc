"""KTO data: unpaired completions labelled desirable or undesirable, each with a mismatched KL completion.

Two record formats (one per split, as TRL's `KTOTrainer` reads them):

- **unpaired**: `{"prompt", "completion", "label": true|false}` (strings, or message lists with the prompt's
  turns and the completion's assistant turn);
- **paired** preference records (`chosen`, `rejected`): unpaired as TRL's `unpair_preference_dataset` does, per
  block of 1000 records the chosen completions (desirable) then the rejected ones (undesirable).

Each completion is tokenized exactly as a DPO pair's chosen side (`dpo_core.data.tokenize_records`: same
validation naming file, line and field, same prompt/completion boundary, EOS and truncation). The KL
completions are TRL's: within consecutive blocks of `kl_block` examples (its `per_device_train_batch_size`)
example j gets the completion of example j-1 (the first the last's), so a batch's mismatched pairs hold the
batch's own completions. An example is a `dpo_core.batches.Example` whose `chosen_ids` is its completion and
`rejected_ids` its KL completion: every batch layout, the prepared-data store and the reference cache treat it
as a pair (the KL row shares the prompt). Its id is `2 * record id` for a desirable completion and `2 * record
id + 1` for an undesirable one (`kto_labels`), so the label travels with the id.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

from .data import Example, Problem, Record, _validate, loaded, tokenize_records, truncate_pair

TRL_UNPAIR_BLOCK = 1000  # `unpair_preference_dataset` maps in batches of 1000 records


def kto_labels(ids):
    """True for desirable examples (even ids), from a tensor or list of example ids."""
    return ids % 2 == 0


def _unpaired_as_pair(data: dict) -> tuple[dict | None, list[tuple[str, str]]]:
    problems = [(k, "missing") for k in ("prompt", "completion", "label") if k not in data]
    if "label" in data and not isinstance(data["label"], bool):
        problems.append(("label", f"must be true or false, got {data['label']!r}"))
    if problems:
        return None, problems
    extra = {k: data[k] for k in ("tools", "chat_template_kwargs") if k in data}
    return {"prompt": data["prompt"], "chosen": data["completion"], "rejected": data["completion"], **extra}, []


def _validate_single(pair: dict) -> list[tuple[str, str]]:
    found = [(f, reason) for f, reason in _validate(pair) if f != "rejected"]
    return [("completion" if f == "chosen" else f, reason) for f, reason in found]


def is_unpaired(records: list[Record]) -> bool:
    """Whether a split holds unpaired records (`completion`/`label`, no `chosen`), judged by its first valid
    record (`KTOTokenize` refuses a split that mixes the formats)."""
    first = next((r.data for r in records if r.data is not None), None)
    return first is not None and not is_paired_record(first) and ("completion" in first or "label" in first)


def is_paired_record(data: dict) -> bool:
    return "chosen" in data or "rejected" in data


MIXED = ("this file mixes paired (chosen/rejected) and unpaired (completion/label) records; use one format per "
         "split")


class KTOTokenize:
    """`tokenize(records, tokenizer, settings) -> (examples, problems)` for KTO with KL blocks of `kl_block`
    examples; its `__qualname__` names the block size, so the prepared-data store keys on it.

    TRL's unpairing blocks and the KL rotation run over the whole split, so the prepared store runs it in two
    parts: `for_split(records)` tokenizes chunks of records in its worker processes (each completion as a DPO
    chosen side; the split's format is its first valid record's), and `finish` orders the examples and rotates
    the KL completions once, over the split."""

    def __init__(self, kl_block: int):
        if kl_block < 2:
            raise ValueError(f"KTO's KL point needs at least 2 examples per batch, got {kl_block}")
        self.kl_block = kl_block
        self.__module__ = __name__
        self.__qualname__ = f"KTOTokenize(kl_block={kl_block})"

    def __call__(self, records: list[Record], tokenizer, settings) -> tuple[list[Example], list[Problem]]:
        examples, problems = self.for_split(records)(records, tokenizer, settings)
        examples, problems = self.finish(records, examples, problems, settings)
        return list(examples), problems

    @staticmethod
    def for_split(records: list[Record]):
        """The per-record part, for the split's format (paired when its first valid record has chosen/rejected)."""
        first = next((r.data for r in records if r.data is not None), None)
        return _tokenize_paired if first is not None and is_paired_record(first) else _tokenize_unpaired

    def finish(self, records: list[Record], examples, problems: list[Problem], settings
               ) -> tuple[Iterator[Example], list[Problem]]:
        """The examples of the whole split in TRL's order with their KL completions, as an iterator (made a block
        at a time from `examples`, a list or the workers' `ExampleArrays`: the split is never held as lists); a
        split that mixes the formats is one problem, its first record of the other format."""
        mixed = next((p for p in problems if p.reason == MIXED), None)
        if mixed is not None:
            return iter(()), [mixed]
        if self.for_split(records) is _tokenize_unpaired:
            return self._with_kl(iter(examples), settings), problems
        return self._with_kl(self._unpaired(records, examples), settings), problems

    @staticmethod
    def _unpaired(records: list[Record], examples) -> Iterator[Example]:
        """TRL's order: per block of `TRL_UNPAIR_BLOCK` records, the block's chosen sides, then its rejected."""
        ids = examples.ids if hasattr(examples, "ids") else [e.id for e in examples]  # ExampleArrays or a list
        pairs = {int(i): k for k, i in enumerate(ids)}
        for start in range(0, len(records), TRL_UNPAIR_BLOCK):
            block = [examples[pairs[r.id]] for r in records[start:start + TRL_UNPAIR_BLOCK] if r.id in pairs]
            yield from (Example(2 * e.id, e.prompt_ids, e.chosen_ids, []) for e in block)
            yield from (Example(2 * e.id + 1, e.prompt_ids, e.rejected_ids, []) for e in block)

    def _with_kl(self, examples: Iterator[Example], settings) -> Iterator[Example]:
        """Each example with the previous completion of its block of `kl_block` as its KL completion."""
        while block := list(itertools.islice(examples, self.kl_block)):
            for j, e in enumerate(block):
                kl = block[j - 1].chosen_ids  # j = 0: the block's last completion
                yield Example(e.id, *truncate_pair(e.prompt_ids, e.chosen_ids, kl, settings))


def _mixed(record: Record) -> Problem:
    return Problem(record.source, record.location, "completion", MIXED)


def _tokenize_paired(records: list[Record], tokenizer, settings) -> tuple[list[Example], list[Problem]]:
    """Preference records of a paired KTO split, tokenized as DPO pairs (ids: the record ids)."""
    records = loaded(records)
    other = next((r for r in records if r.data is not None and not is_paired_record(r.data)), None)
    if other is not None:
        return [], [_mixed(other)]
    return tokenize_records(records, tokenizer, settings)


def _tokenize_unpaired(records: list[Record], tokenizer, settings) -> tuple[list[Example], list[Problem]]:
    """Unpaired records, each completion tokenized as a DPO chosen side (ids: `2 * record id + (not label)`)."""
    singles, problems = [], []
    for record in loaded(records):
        if record.data is None:
            problems.append(Problem(record.source, record.location, "json", record.error))
            continue
        if is_paired_record(record.data):
            return [], [_mixed(record)]
        pair, found = _unpaired_as_pair(record.data)
        if found:
            problems += [Problem(record.source, record.location, f, reason) for f, reason in found]
            continue
        singles.append(Record(2 * record.id + (0 if record.data["label"] else 1), record.source, record.location,
                              pair))
    examples, found = tokenize_records(singles, tokenizer, settings, validate=_validate_single)
    for p in found:
        p.field = "completion" if p.field == "chosen" else p.field
    return examples, problems + found


class EitherFormat:
    """For scripts that take either format (evaluation): `for_records(split's records)` is `KTOTokenize(kl_block)`
    for unpaired records and the preference pairs' `tokenize_records` otherwise (`data.prepare_examples`)."""

    def __init__(self, kl_block: int):
        self.kto = KTOTokenize(kl_block)

    def for_records(self, records: list[Record]):
        return self.kto if is_unpaired(records) else tokenize_records
