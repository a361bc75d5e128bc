"""Preference data: validation, chat templates, tokenization and truncation (TRL's convention).

    records = load_splits("data/demo", split="train", eval_split="test")       # {"train": [...], "eval": [...]}
    examples, problems = tokenize_records(records["train"], tokenizer, TokenizeSettings(max_length=512))
    check_problems(problems, on_invalid="skip", report_path="run/invalid_records.jsonl")

Reading raw rows and reporting bad ones lives in `dpo_core.records` (its names are re-exported here); batching
the tokenized pairs in `dpo_core.batches`.

Tokenization follows TRL 1.16 (`DPOTrainer._prepare_dataset`) token for token, so reference log-probs
computed by either tool agree for the same model and data. The deliberate differences are safety nets
that only fire where TRL would train on something broken: a doubled BOS is dropped, a standard completion
ends in exactly one EOS, and records TRL would drop silently (or crash on) are reported as `Problem`s.
Nothing is dropped silently: every record that does not become an `Example` is either raised in one
`DataValidationError` or written to a JSONL report and counted in a warning.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .records import (  # noqa: F401  (re-exported: the data layer's one import for callers)
    DataValidationError,
    Problem,
    Record,
    check_on_invalid,
    check_problems,
    dataset_fingerprint,
    load_splits,
    loaded,
    problem_counts,
    tokenizer_fingerprint,
)
from .tokenized import Example, TokenizeSettings  # noqa: F401  (re-exported)

logger = logging.getLogger(__name__)

ENCODE_BATCH = 128  # records per batched tokenizer call


# ------------------------------------------------------------------------------------------ validation

def _check_value(value: Any) -> str | None:
    """Why a prompt/chosen/rejected value is unusable, or None. A value is a string or a message list."""
    if value is None:
        return "is null"
    if isinstance(value, str):
        return "is empty or whitespace-only" if not value.strip() else None
    if not isinstance(value, list):
        return f"must be a string or a list of {{role, content}} messages, got {type(value).__name__}"
    if not value:
        return "is an empty message list"
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            return f"message {i} must be an object with string 'role' and 'content', got {str(m)[:80]}"
    if not any(m["content"].strip() for m in value):
        return "has only empty or whitespace-only message contents"
    return None


def _validate(data: dict) -> list[tuple[str, str]]:
    problems = [(k, "missing") for k in ("chosen", "rejected") if k not in data]
    problems += [(k, reason) for k in ("prompt", "chosen", "rejected")
                 if k in data and (reason := _check_value(data[k])) is not None]
    if problems:
        return problems
    conversational = isinstance(data["chosen"], list)
    for k in ("prompt", "rejected"):
        if k in data and isinstance(data[k], list) != conversational:
            problems.append((k, f"is {'a message list' if isinstance(data[k], list) else 'a string'} but chosen "
                                f"is {'a message list' if conversational else 'a string'}; use one format per record"))
    if data["chosen"] == data["rejected"]:
        problems.append(("rejected", "is identical to chosen"))
    tools = data.get("tools")
    if isinstance(tools, str):
        try:
            json.loads(tools)
        except json.JSONDecodeError as e:
            problems.append(("tools", f"is a string but not valid JSON: {e.msg}"))
    if data.get("chat_template_kwargs") is not None and not isinstance(data["chat_template_kwargs"], dict):
        problems.append(("chat_template_kwargs", "must be an object"))
    return problems


def _extract_prompt(chosen, rejected):
    """The shared leading turns (or characters) of chosen and rejected, as TRL's `extract_prompt`."""
    n = min(len(chosen), len(rejected))
    idx = next((i for i in range(n) if chosen[i] != rejected[i]), None)
    if idx is None:  # one is a prefix of the other: TRL's loop variable ends at n - 1
        idx = n - 1
    elif idx > 0 and chosen[idx - 1] == " ":  # the space goes to the completions
        idx -= 1
    return chosen[:idx], chosen[idx:], rejected[idx:]


# -------------------------------------------------------------------------------- tokenize + truncate

def _common_prefix_length(ids: list[int], other: list[int]) -> int:
    if other[:len(ids)] == ids:  # the usual case, compared in C
        return len(ids)
    n = 0
    for a, b in zip(ids, other):
        if a != b:
            break
        n += 1
    return n


def _encode(tokenizer, value: str | list, template_kwargs: dict, **kwargs) -> list[int]:
    """One text (or conversation with `apply_chat_template`), as the data layer tokenizes it."""
    if isinstance(value, list):
        ids = tokenizer.apply_chat_template(value, tokenize=True, return_dict=True, **template_kwargs, **kwargs)
    else:
        ids = tokenizer(text=value)
    return _drop_double_bos([int(i) for i in ids["input_ids"]], tokenizer.bos_token_id)


def _drop_double_bos(ids: list[int], bos: int | None) -> list[int]:
    # A template or text that carries BOS plus a tokenizer that adds it gives two; the model never saw that.
    return ids[1:] if bos is not None and len(ids) > 1 and ids[0] == bos == ids[1] else ids


def _one_final_eos(ids: list[int], eos: int | None) -> list[int]:
    while eos is not None and len(ids) >= 2 and ids[-1] == ids[-2] == eos:
        ids = ids[:-1]
    return ids


def _pair_inputs(data: dict, tokenizer) -> tuple[bool, tuple, dict]:
    """What TRL 1.16's `_prepare_dataset` tokenizes for one record: `(conversational, (prompt, prompt+chosen,
    prompt+rejected), chat-template kwargs)`; strings get their EOS here."""
    if "prompt" in data:
        prompt, chosen, rejected = data["prompt"], data["chosen"], data["rejected"]
    else:
        prompt, chosen, rejected = _extract_prompt(data["chosen"], data["rejected"])
    if not prompt:
        raise _Invalid("prompt", "no 'prompt' field, and chosen/rejected share no leading text or turns")
    if isinstance(chosen, list):
        tools = data.get("tools")
        kwargs = {"tools": json.loads(tools) if isinstance(tools, str) else tools,
                  **(data.get("chat_template_kwargs") or {})}
        return True, (prompt, prompt + chosen, prompt + rejected), kwargs
    eos = tokenizer.eos_token
    chosen = chosen if chosen.endswith(eos) else chosen + eos
    rejected = rejected if rejected.endswith(eos) else rejected + eos
    return False, (prompt, prompt + chosen, prompt + rejected), {}


def _raw_backend(tokenizer):
    """The Rust `tokenizers.Tokenizer` of a fast tokenizer when calling it directly gives what `tokenizer(...)`
    gives (no truncation or padding configured on it: transformers would switch those off); else None. Calling it
    directly skips transformers' per-encoding Python conversion, a quarter of the tokenization time."""
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is None or backend.truncation is not None or backend.padding is not None:
        return None
    return backend


def _encode_batch(tokenizer, conversational: bool, texts: list, kwargs: dict, prompts: bool) -> list[list[int]]:
    """Token ids of several texts (or conversations) in one call: the same ids as one call each (batching
    changes nothing without padding or truncation), at a fraction of the per-call cost. Conversations are
    rendered by the chat template and tokenized without special tokens, as `apply_chat_template` does."""
    backend = _raw_backend(tokenizer)
    if backend is not None:
        # `encode_batch_fast` (tokenizers >= 0.20) gives the same ids without character offsets (unused here).
        encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
        if conversational:
            rendered = tokenizer.apply_chat_template(texts, tokenize=False, add_generation_prompt=prompts, **kwargs)
            rows = [e.ids for e in encode(rendered, add_special_tokens=False)]
        else:
            rows = [e.ids for e in encode(texts, add_special_tokens=True)]
    elif conversational:
        rows = [list(ids) for ids in tokenizer.apply_chat_template(texts, tokenize=True, return_dict=True,
                                                                   add_generation_prompt=prompts, **kwargs)["input_ids"]]
    else:
        rows = [list(ids) for ids in tokenizer(text=texts)["input_ids"]]
    bos = tokenizer.bos_token_id
    return rows if bos is None else [_drop_double_bos(ids, bos) for ids in rows]


def _finish_pair(p: list[int], pc: list[int], pr: list[int], conversational: bool, eos_id: int | None):
    """(prompt_ids, chosen_ids, rejected_ids, prompt_cut) from the three encodings, as TRL 1.16."""
    # The completion starts where prompt and prompt+completion diverge: a template may render the prompt
    # alone differently, or tokens may merge across the boundary (TRL's `common_prefix_length`).
    n = min(_common_prefix_length(p, pc), _common_prefix_length(p, pr))
    chosen_ids, rejected_ids = pc[n:], pr[n:]
    if not conversational:
        chosen_ids, rejected_ids = _one_final_eos(chosen_ids, eos_id), _one_final_eos(rejected_ids, eos_id)
    return p[:n], chosen_ids, rejected_ids, n < len(p)


def _tokenize_pair(data: dict, tokenizer) -> tuple[list[int], list[int], list[int], bool]:
    """TRL 1.16's `_prepare_dataset` for one record: (prompt_ids, chosen_ids, rejected_ids, prompt_cut)."""
    conversational, (prompt, chosen, rejected), kwargs = _pair_inputs(data, tokenizer)
    p = _encode_batch(tokenizer, conversational, [prompt], kwargs, prompts=True)[0]
    pc, pr = _encode_batch(tokenizer, conversational, [chosen, rejected], kwargs, prompts=False)
    return _finish_pair(p, pc, pr, conversational, tokenizer.eos_token_id)


def _tokenize_pairs(datas: list[dict], tokenizer) -> list[tuple | tuple[str, str]]:
    """`_tokenize_pair` of several records, batched where they share a kind (strings, or conversations with no
    tools or template kwargs); per record `(p, c, r, prompt_cut)` or `(field, reason)` of the failure. A batch
    that fails is redone record by record, so that the failure names its record."""
    results: list = [None] * len(datas)
    batch: list[tuple[int, bool, tuple]] = []
    for i, data in enumerate(datas):
        try:
            conversational, texts, kwargs = _pair_inputs(data, tokenizer)
        except _Invalid as e:
            results[i] = (e.field, e.reason)
            continue
        if conversational and any(v is not None for v in kwargs.values()):
            results[i] = _guarded(data, tokenizer)  # its own tools / kwargs: its own call
        else:
            batch.append((i, conversational, texts))
    for kind in (False, True):
        everyone = [(i, texts) for i, conversational, texts in batch if conversational == kind]
        # A tokenizer's encodings hold ~100 bytes per token besides the ids: encoded a slice at a time.
        for start in range(0, len(everyone), ENCODE_BATCH):
            _encode_members(everyone[start:start + ENCODE_BATCH], kind, datas, tokenizer, results)
    return results


def _encode_members(members: list[tuple[int, tuple]], kind: bool, datas: list[dict], tokenizer, results: list):
    """Fills `results` for `members` `(index, (prompt, prompt+chosen, prompt+rejected))` of one kind in two batched
    calls; a failing batch is redone record by record, so that the failure names its record."""
    try:
        prompts = _encode_batch(tokenizer, kind, [t[0] for _, t in members], {}, prompts=True)
        full = _encode_batch(tokenizer, kind, [x for _, t in members for x in t[1:]], {}, prompts=False)
    except Exception:
        for i, _ in members:
            results[i] = _guarded(datas[i], tokenizer)
        return
    eos_id = tokenizer.eos_token_id
    for k, (i, _) in enumerate(members):
        results[i] = _finish_pair(prompts[k], full[2 * k], full[2 * k + 1], kind, eos_id)


def _guarded(data: dict, tokenizer):
    try:
        return _tokenize_pair(data, tokenizer)
    except _Invalid as e:
        return (e.field, e.reason)
    except Exception as e:  # a chat template may reject a record (roles, tools): report, don't crash
        culprit = "chat_template" if isinstance(data["chosen"], list) else "tokenizer"
        return (culprit, f"tokenization failed: {type(e).__name__}: {e}")


class _Invalid(Exception):
    def __init__(self, field: str, reason: str):
        super().__init__(reason)
        self.field, self.reason = field, reason


def truncate_pair(prompt_ids: list[int], chosen_ids: list[int], rejected_ids: list[int],
                  settings: TokenizeSettings) -> tuple[list[int], list[int], list[int]]:
    """Applies `max_prompt_length`, then `max_completion_length`, then `max_length`, in that order.

    `max_prompt_length` keeps the prompt's first (keep_start) or last (keep_end) tokens;
    `max_completion_length` keeps each completion's first tokens; `max_length` bounds prompt+completion
    per sequence: keep_start cuts the completion's tail, keep_end cuts the prompt's head (as TRL's collator
    slices `ids[-max_length:]`). Chosen and rejected share one prompt, so under keep_end the prompt is cut
    for the longer completion (TRL cuts each row separately and may keep more prompt for the shorter one).

    Returns:
        (prompt_ids, chosen_ids, rejected_ids); a part comes back empty when the bounds leave it nothing.
    """
    p, c, r = prompt_ids, chosen_ids, rejected_ids  # a cut part is a new list (slicing); the inputs stay as given
    keep_start = settings.truncation_mode == "keep_start"
    if settings.max_prompt_length is not None and len(p) > settings.max_prompt_length:
        p = p[: settings.max_prompt_length] if keep_start else p[len(p) - settings.max_prompt_length:]
    if settings.max_completion_length is not None:
        c, r = c[: settings.max_completion_length], r[: settings.max_completion_length]
    if settings.max_length is not None:
        if keep_start:
            room = max(0, settings.max_length - len(p))
            c, r = c[:room], r[:room]
        else:
            c, r = c[len(c) - min(len(c), settings.max_length):], r[len(r) - min(len(r), settings.max_length):]
            room = max(0, settings.max_length - max(len(c), len(r)))
            p = p[len(p) - min(len(p), room):]
    return p, c, r


def _length_problems(full: list[list[int]], cut: tuple[list[int], ...], s: TokenizeSettings):
    """Why a pair has an empty part after tokenization or truncation, naming the setting to change."""
    if all(cut):
        return []
    empty = [(name, "has no tokens after tokenization") for name, ids in zip(("prompt", "chosen", "rejected"), full)
             if not ids]
    if empty:
        return empty
    # Otherwise only max_length can have emptied a part (the other limits are >= 1).
    if s.truncation_mode == "keep_start":
        n = min(len(full[0]), s.max_prompt_length or len(full[0]))
        return [("prompt", f"the prompt ({n} tokens) fills max_length={s.max_length}, leaving no completion "
                           "token (truncation_mode='keep_start'); raise max_length or set max_prompt_length "
                           f"below {s.max_length}")]
    return [("prompt", f"no prompt token left: a completion alone fills max_length={s.max_length} "
                       "(truncation_mode='keep_end'); raise max_length or set max_completion_length "
                       f"below {s.max_length}")]


def tokenize_records(records: list[Record], tokenizer, settings: TokenizeSettings, *, validate=None
                     ) -> tuple[list[Example], list[Problem]]:
    """Validates, tokenizes (as TRL 1.16) and truncates every record; never stops at the first bad one.

    `validate(data) -> [(field, reason)]` replaces the preference checks (SFT's single completions).

    Returns:
        (examples of the valid records in input order, problems of the others: one or more per bad record).
    """
    records = loaded(records)  # each JSON line parsed once, here (in the worker that tokenizes it)
    usable = [r for r in records if r.data is not None and "chosen" in r.data]
    if getattr(tokenizer, "chat_template", None) is None and any(isinstance(r.data["chosen"], list) for r in usable):
        raise ConfigError("the data is conversational (message lists) but the tokenizer has no chat_template; "
                         "set tokenizer.chat_template or use a tokenizer that has one")
    if tokenizer.eos_token is None and any(isinstance(r.data["chosen"], str) for r in usable):
        raise ConfigError("standard (string) completions need an EOS token, but the tokenizer has no eos_token")
    examples, problems, n_prompt_cut = [], [], 0
    found_by_record = [[("json", record.error)] if record.data is None else (validate or _validate)(record.data)
                       for record in records]
    valid = [i for i, found in enumerate(found_by_record) if not found]
    tokenized = dict(zip(valid, _tokenize_pairs([records[i].data for i in valid], tokenizer)))
    for i, record in enumerate(records):
        found = found_by_record[i]
        if not found:
            result = tokenized[i]
            if len(result) == 2:  # (field, reason)
                found = [result]
            else:
                *full, prompt_cut = result
                n_prompt_cut += prompt_cut
                cut = truncate_pair(*full, settings)
                found = _length_problems(full, cut, settings)
        if found:
            problems += [Problem(record.source, record.location, f, reason) for f, reason in found]
        else:
            examples.append(Example(record.id, *cut))
    if n_prompt_cut:  # TRL warns about this too: training context != inference context
        logger.warning("%d record(s): the tokenized prompt is not a prefix of prompt+completion (the chat "
                       "template renders the prompt alone differently, or tokens merge across the boundary); "
                       "the completion starts where they diverge and the prompt's differing end is left out",
                       n_prompt_cut)
    return examples, problems


def prepare_examples(dataset_name: str, tokenizer, settings: TokenizeSettings, *, split: str = "train",
                     eval_split: str | None = None, eval_fraction: float = 0.0, seed: int = 0,
                     dataset_config: str | None = None, on_invalid: str = "error",
                     report_path: str | Path | None = None, tokenize=None, max_train_samples: int | None = None,
                     max_eval_samples: int | None = None, cache_dir: str | Path | None = None,
                     num_proc: int | None = None, progress: bool = True
                     ) -> tuple[dict[str, list[Record]], dict[str, list[Example]]]:
    """`load_splits` + `tokenize_records` (or `tokenize`, same signature, or an object whose
    `for_records(split's records)` gives it) per split + one `check_problems`.

    With `cache_dir` (a folder, or "default" for `PreparedStore.default()`) each split is tokenized once into
    that store (`dpo_core.prepared`, `num_proc` worker processes) and read back memory-mapped by every later
    call with the same records, tokenizer and settings; without it, tokenized here as lists.

    Returns:
        `(records, examples)`, each `{"train": [...][, "eval": [...]]}`; the records are kept for
        fingerprinting the data (the reference cache). Examples are lists, or `ExampleArrays` from a store.
    """
    check_on_invalid(on_invalid, report_path)  # fail before the (possibly long) tokenization
    records = load_splits(dataset_name, split=split, eval_split=eval_split, eval_fraction=eval_fraction,
                          seed=seed, dataset_config=dataset_config, max_train_samples=max_train_samples,
                          max_eval_samples=max_eval_samples)
    examples, all_problems = {}, []
    store = None
    if cache_dir is not None:
        from .prepared import PreparedStore

        store = PreparedStore.default() if str(cache_dir) == "default" else PreparedStore(cache_dir)
    for name, split_records in records.items():
        fn = tokenize or tokenize_records
        if hasattr(fn, "for_records"):  # chosen per split from its records (`kto_data.EitherFormat`)
            fn = fn.for_records(split_records)
        if store is None:
            examples[name], problems = fn(split_records, tokenizer, settings)
        else:
            examples[name], problems = store.tokenize(split_records, tokenizer, settings, fn, num_proc=num_proc,
                                                      desc=f"tokenizing {name}", progress=progress)
        all_problems += problems
        logger.info("%s: %d of %d records tokenized", name, len(examples[name]), len(split_records))
    check_problems(all_problems, on_invalid=on_invalid, report_path=report_path)
    return records, examples


def prepare_from_args(data_args, tokenizer, *, seed: int, report_path: str | Path | None, tokenize=None,
                      progress: bool = True):
    """`prepare_examples` from a `DataArguments`: what every script runs, so they tokenize identically (and,
    through the prepared-data store of `--data_cache_dir`, only once)."""
    return prepare_examples(data_args.dataset_name, tokenizer, data_args.tokenize_settings(), split=data_args.dataset_split,
                            eval_split=data_args.eval_split, eval_fraction=data_args.eval_fraction, seed=seed,
                            dataset_config=data_args.dataset_config, on_invalid=data_args.on_invalid,
                            report_path=report_path, tokenize=tokenize,
                            max_train_samples=getattr(data_args, "max_train_samples", None),
                            max_eval_samples=getattr(data_args, "max_eval_samples", None),
                            cache_dir=data_args.cache_location(), num_proc=data_args.dataset_num_proc,
                            progress=progress)
