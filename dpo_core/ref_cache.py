"""The reference cache: per-pair reference log-probs computed once, offline, and read by training.

A cache is a directory (docs/reference-cache.md):

    manifest.json        format version, fingerprint, per split {num_examples, file, sha256}, created_at
    train.safetensors    ids (int64, ascending), chosen_logps, rejected_logps (float32, or float64)
    eval.safetensors     (when the run has an eval split)

`scripts/precompute_ref_logprobs.py` writes it with `write_cache`; `scripts/dpo.py --ref_logprobs DIR`
reads it with `load_cache`, which refuses a cache computed for other weights, tokenizer, data, selection,
truncation, dtype, mixed precision or `ld_alpha` and names every field that differs. Only safetensors and
JSON are read: a cache can never execute code (no pickle).

One module past ~450 lines on purpose: writing, fingerprinting, verifying and reading a cache must agree on
one format, and keeping them side by side is what keeps them agreeing.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from .batches import PairDataset
from .data import dataset_fingerprint, tokenizer_fingerprint
from .errors import OutputExistsError, RefCacheError
from .layouts import make_collator, make_forward
from .modeling import weights_fingerprint

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_TENSORS = ("ids", "chosen_logps", "rejected_logps")
RECOMPUTE_HINT = ("Recompute it with scripts/precompute_ref_logprobs.py and the same settings as this run (model, "
                  "data and tokenization flags, --seed, --ld_alpha, --torch_dtype and the accelerate mixed "
                  "precision), or drop --ref_logprobs to use a reference model.")




# ------------------------------------------------------------------------------------------ fingerprint

def _sha256_int64(values) -> str:
    return hashlib.sha256(np.asarray(values, dtype="<i8").tobytes()).hexdigest()


def _interleaved(arrays, start: int, stop: int) -> np.ndarray:
    """Pairs start..stop-1 of `ExampleArrays` as `[id, len(p), len(c), len(r), *p, *c, *r]` each, int64 (LE)."""
    offsets = np.asarray(arrays.offsets[3 * start: 3 * stop + 1])
    lengths = np.diff(offsets).reshape(-1, 3)
    tokens = np.asarray(arrays.tokens[offsets[0]: offsets[-1]], dtype="<i8")
    sizes = 4 + lengths.sum(1)
    out = np.empty(int(sizes.sum()), dtype="<i8")
    heads = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    out[heads[:, None] + np.arange(4)] = np.column_stack([np.asarray(arrays.ids[start:stop]), lengths])
    body = np.ones(len(out), dtype=bool)
    body[heads[:, None] + np.arange(4)] = False
    out[body] = tokens
    return out


def tokens_fingerprint(examples) -> str:
    """sha256 over every example's id and token ids, in order (length-prefixed: no two lists collide)."""
    h = hashlib.sha256()
    if hasattr(examples, "offsets"):  # `ExampleArrays` (a prepared-data store): the same bytes, built by numpy
        for start in range(0, len(examples), 8192):
            h.update(_interleaved(examples, start, min(start + 8192, len(examples))).tobytes())
        return h.hexdigest()
    for e in examples:
        parts = (e.prompt_ids, e.chosen_ids, e.rejected_ids)
        h.update(np.asarray([e.id, *map(len, parts)], dtype="<i8").tobytes())
        h.update(np.asarray([t for p in parts for t in p], dtype="<i8").tobytes())
    return h.hexdigest()


def reference_fingerprint(*, ref_model_path: str, revision: str | None, tokenizer, records_by_split: dict,
                          examples_by_split: dict, data_args, torch_dtype: str, ld_alpha: float | None,
                          mixed_precision: str, seed: int | None = None,
                          quantization: str | None = None, gguf_file: str | None = None) -> dict[str, object]:
    """Everything that decides the reference log-probs of a run, as a flat dict of named fields.

    The dataset *path* is left out (moving a file keeps the cache valid); its content, the ordered ids of
    the examples kept (eval carve-out, skipped records) and finally every token id are in.

    Args:
        ref_model_path: the reference weights (`--ref_model_name_or_path`, else `--model_name_or_path`).
        records_by_split / examples_by_split: `{split: [Record]}` from `load_splits`, `{split: [Example]}`.
        data_args: a `DataArguments` (split names, eval carve-out, truncation settings).
        seed: the seed of the `eval_fraction` carve-out and of the `max_*_samples` selection; required with them.
        quantization: how the reference's weights were quantized (`modeling.quantization_name`); recorded only
            when not None, so that caches of unquantized references keep their fingerprint.
    Returns:
        `{field: str | int | float | None}`, JSON-serialisable.
    """
    fp: dict[str, object] = {
        "format_version": FORMAT_VERSION,
        "reference_weights": weights_fingerprint(ref_model_path, revision=revision, gguf_file=gguf_file),
        "tokenizer": tokenizer_fingerprint(tokenizer),
    }
    for split in sorted(records_by_split):
        fp[f"dataset/{split}"] = dataset_fingerprint(records_by_split[split])
    for split in sorted(examples_by_split):
        fp[f"selection/{split}"] = _sha256_int64([e.id for e in examples_by_split[split]])
    fp.update(dataset_split=data_args.dataset_split, eval_split=data_args.eval_split,
              eval_fraction=data_args.eval_fraction)
    if data_args.eval_fraction > 0:
        if seed is None:
            raise ValueError("reference_fingerprint: eval_fraction > 0 needs the seed of the carve-out")
        fp["seed_of_eval_fraction"] = seed
    # --max_train_samples / --max_eval_samples: recorded only when given (earlier caches keep their fingerprint).
    for name in ("max_train_samples", "max_eval_samples"):
        if getattr(data_args, name, None) is not None:
            if seed is None:
                raise ValueError(f"reference_fingerprint: {name} needs the seed of the selection")
            fp[name], fp["seed_of_selection"] = getattr(data_args, name), seed
    fp.update(asdict(data_args.tokenize_settings()))  # every setting that changes token ids
    fp.update(torch_dtype=torch_dtype, mixed_precision=str(mixed_precision), ld_alpha=ld_alpha)
    if quantization is not None:
        fp["quantization"] = quantization
    for split in sorted(examples_by_split):
        fp[f"tokenized/{split}"] = tokens_fingerprint(examples_by_split[split])
    return json.loads(json.dumps(fp))  # the exact values a manifest gives back (tuples -> lists, ...)


def _short(value) -> str:
    text = json.dumps(value)
    is_hash = isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)
    return text[1:13] if is_hash else text


_ABSENT = object()


def fingerprint_mismatches(cached: dict, expected: dict) -> list[str]:
    """One line per field that differs: `name: cache <value>, this run <value>` (hashes shortened)."""
    lines = []
    for key in [*expected, *(k for k in cached if k not in expected)]:
        a, b = cached.get(key, _ABSENT), expected.get(key, _ABSENT)
        if a != b:
            show = [("<absent>" if v is _ABSENT else _short(v)) for v in (a, b)]
            lines.append(f"{key}: cache {show[0]}, this run {show[1]}")
    return lines


# ---------------------------------------------------------------------------------------------- merging

def merge_partials(parts: list[dict[str, Tensor]], expected_ids, *, split: str = "train", atol: float = 1e-5
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """Merges the per-process results of one split: dedupes ids, checks each expected id is there once.

    A sharded dataloader pads its last batches by repeating examples, so an id may come back twice; its
    copies must agree (to `atol`, relative and absolute), or the ids and values are misaligned somewhere.

    Args:
        parts: one `{"ids", "chosen_logps", "rejected_logps"}` dict of `(n_i,)` tensors per process.
        expected_ids: every id of the split, each exactly once.
    Returns:
        `(ids ascending, chosen_logps, rejected_logps)`, one entry per expected id.
    """
    ids = torch.cat([p["ids"].long().reshape(-1) for p in parts])
    values = {k: torch.cat([p[k].reshape(-1) for p in parts]) for k in ("chosen_logps", "rejected_logps")}
    unique, inverse = torch.unique(ids, return_inverse=True)
    first = torch.full_like(unique, ids.numel()).scatter_reduce(0, inverse, torch.arange(ids.numel()), "amin")
    merged = {k: v[first] for k, v in values.items()}
    for k, v in values.items():
        if v.numel() and not torch.allclose(v, merged[k][inverse], rtol=atol, atol=atol):
            worst = (v - merged[k][inverse]).abs().argmax()
            raise RuntimeError(f"{split}: example {ids[worst].item()} got two different {k} from two forwards "
                               f"({v[worst].item()} vs {merged[k][inverse][worst].item()}): ids and values "
                               "are misaligned, or the forward is not deterministic")
    wanted = torch.as_tensor(sorted(expected_ids), dtype=torch.long)
    if wanted.numel() > 1 and (wanted[1:] == wanted[:-1]).any():
        raise ValueError(f"{split}: the expected ids are not unique")
    missing, extra = wanted[~torch.isin(wanted, unique)], unique[~torch.isin(unique, wanted)]
    if missing.numel() or extra.numel():
        raise RuntimeError(f"{split}: the processes' results miss {missing.numel()} expected id(s) "
                           f"{missing[:10].tolist()} and have {extra.numel()} unexpected one(s) {extra[:10].tolist()}")
    return unique, merged["chosen_logps"], merged["rejected_logps"]


# ------------------------------------------------------------------------------------------ computing

def forward_split(accelerator, model, examples, *, batch_size: int, pad_token_id: int, ld_alpha=None,
                  forward_mode: str = "concat", chunk_size: int = 1024) -> dict[str, Tensor]:
    """This process's share of a split: `{"ids", "chosen_logps", "rejected_logps"}` (ids may repeat).

    The forward is `dpo_core.layouts.LAYOUTS[forward_mode].forward`, the one training uses for an online reference.
    It runs under `torch.inference_mode` (no autograd bookkeeping at all) except under DeepSpeed and FSDP,
    whose parameter gathering writes to parameters, which inference mode forbids: `no_grad` there.
    """
    from accelerate.utils import DistributedType

    # Longest first: batches of similar lengths pad less. accelerate shards batches over processes and
    # repeats examples to give every process the same number of forwards (ZeRO-3 needs that).
    ordered = sorted(examples, key=lambda e: -(len(e.prompt_ids) + max(len(e.chosen_ids), len(e.rejected_ids))))
    loader = accelerator.prepare(torch.utils.data.DataLoader(
        PairDataset(ordered), batch_size=batch_size, shuffle=False,
        collate_fn=make_collator(forward_mode, pad_token_id, model)))
    sharded = accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)
    forward = make_forward(forward_mode, ld_alpha=ld_alpha, chunk_size=chunk_size)
    ids, chosen, rejected = [], [], []
    with torch.no_grad() if sharded else torch.inference_mode():
        for batch in loader:
            with accelerator.autocast():
                out = forward(model, batch)
            ids.append(batch["ids"].cpu())
            chosen.append(out.chosen_logps.float().cpu())
            rejected.append(out.rejected_logps.float().cpu())
    empty = torch.zeros(0)
    return {"ids": torch.cat(ids) if ids else empty.long(), "chosen_logps": torch.cat(chosen) if chosen else empty,
            "rejected_logps": torch.cat(rejected) if rejected else empty}


def compute_reference(accelerator, model, examples_by_split: dict, partials_dir: str | Path, *, atol: float,
                      **forward_kwargs) -> tuple[dict[str, tuple[Tensor, Tensor, Tensor]] | None, dict[str, float]]:
    """Every process runs `forward_split` on its shard of each split; the main process merges the shards.

    The per-process results go through `partials_dir` (a directory all processes share; removed at the end).

    Args:
        examples_by_split: `{split: [Example]}`.
        atol: how closely two forwards of a repeated example must agree (`merge_partials`).
        forward_kwargs: `forward_split`'s keyword arguments (batch_size, pad_token_id, ld_alpha, ...).
    Returns:
        `(results for write_cache on the main process (None elsewhere), seconds per split)`.
    """
    from safetensors.torch import load_file

    partials = Path(partials_dir)
    if accelerator.is_main_process:
        shutil.rmtree(partials, ignore_errors=True)  # a crashed earlier run's leftovers
        partials.mkdir(parents=True)
    accelerator.wait_for_everyone()
    seconds = {}
    for split, split_examples in examples_by_split.items():
        start = time.perf_counter()
        part = forward_split(accelerator, model, split_examples, **forward_kwargs)
        save_file(part, str(partials / f"{split}-rank{accelerator.process_index:05d}.safetensors"))
        accelerator.wait_for_everyone()
        seconds[split] = time.perf_counter() - start
    results = None
    if accelerator.is_main_process:
        results = {}
        for split, split_examples in examples_by_split.items():
            parts = [load_file(str(partials / f"{split}-rank{rank:05d}.safetensors"))
                     for rank in range(accelerator.num_processes)]
            results[split] = merge_partials(parts, [e.id for e in split_examples], split=split, atol=atol)
        shutil.rmtree(partials, ignore_errors=True)
    return results, seconds


# ---------------------------------------------------------------------------------------------- writing

def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def _write_manifest(path: Path, manifest: dict) -> None:
    path.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    _fsync(path)


def _shard_tensors(split: str, ids: Tensor, chosen: Tensor, rejected: Tensor) -> dict[str, Tensor]:
    ids = torch.as_tensor(ids).detach().cpu().long().reshape(-1)
    if not (ids.shape == chosen.reshape(-1).shape == rejected.reshape(-1).shape):
        raise ValueError(f"{split}: ids, chosen and rejected differ in length "
                         f"({ids.numel()}, {chosen.numel()}, {rejected.numel()})")
    order = ids.argsort()
    ids = ids[order]
    if ids.numel() > 1 and (ids[1:] == ids[:-1]).any():
        raise ValueError(f"{split}: duplicate example ids {ids[1:][ids[1:] == ids[:-1]][:10].tolist()}")
    out = {"ids": ids.contiguous()}
    for name, values in (("chosen_logps", chosen), ("rejected_logps", rejected)):
        values = values.detach().cpu().reshape(-1)[order]
        out[name] = values.to(torch.float64 if values.dtype == torch.float64 else torch.float32).contiguous()
    return out


def write_cache(output_dir: str | Path, fingerprint: dict, results: dict[str, tuple[Tensor, Tensor, Tensor]],
                *, overwrite: bool = False) -> Path:
    """Writes a reference cache atomically: into a sibling temp dir, fsynced, manifest last, then renamed.

    A crash at any point leaves either the previous state or the complete new cache at `output_dir`, never
    a partial one (a stray `<output_dir>.tmp-*` or `.old-*` sibling at worst).

    Args:
        output_dir: the cache directory. If it exists, refused unless `overwrite` and it is a cache (or empty).
        fingerprint: from `reference_fingerprint`.
        results: `{split: (ids (N,) long, chosen_logps (N,), rejected_logps (N,))}`, any order of ids.
    Returns:
        `output_dir`.
    """
    output_dir = Path(output_dir)
    check_output_dir(output_dir, overwrite=overwrite)
    for split in results:
        if not split or Path(split).name != split or split.startswith("."):
            raise ValueError(f"split name {split!r} cannot be a file name")
    tag = f"{os.getpid()}-{secrets.token_hex(4)}"
    tmp = output_dir.parent / f"{output_dir.name}.tmp-{tag}"
    old = output_dir.parent / f"{output_dir.name}.old-{tag}"
    tmp.mkdir(parents=True)
    try:
        splits = {}
        for split, (ids, chosen, rejected) in results.items():
            shard = tmp / f"{split}.safetensors"
            tensors = _shard_tensors(split, ids, chosen, rejected)
            save_file(tensors, str(shard), metadata={"format_version": str(FORMAT_VERSION), "split": split})
            os.chmod(shard, 0o644)  # safetensors creates 0600; a cache is often shared by a team
            _fsync(shard)
            splits[split] = {"num_examples": tensors["ids"].numel(), "file": shard.name,
                             "sha256": _sha256_file(shard)}
        manifest = {"format_version": FORMAT_VERSION, "fingerprint": fingerprint, "splits": splits,
                    "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        _write_manifest(tmp / MANIFEST, manifest)  # last: a directory without it is never a cache
        _fsync(tmp)
        if output_dir.exists():  # rename() cannot replace a non-empty directory: move the old one aside
            os.rename(output_dir, old)
        os.rename(tmp, output_dir)
        _fsync(output_dir.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not output_dir.exists():
            os.rename(old, output_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return output_dir


def check_output_dir(output_dir: str | Path, *, overwrite: bool) -> None:
    """Raises unless `output_dir` is free, or `overwrite` and it holds a cache (or nothing)."""
    output_dir = Path(output_dir)
    if not output_dir.exists():
        return
    if not overwrite:
        raise OutputExistsError(f"{output_dir} exists; pass --overwrite to replace the cache there")
    if not output_dir.is_dir() or (any(output_dir.iterdir()) and not (output_dir / MANIFEST).is_file()):
        raise OutputExistsError(f"{output_dir} exists and is not a reference cache: refusing to replace it")


# ---------------------------------------------------------------------------------------------- reading

class RefLogps:
    """Reference log-probs by split and example id, for the training loop.

    `get(split, ids)` looks a batch up (vectorised: binary search over the sorted ids); `collate(split,
    base_collate)` wraps a collate function so that each batch also carries `ref_chosen_logps` and
    `ref_rejected_logps` for its `ids`.
    """

    def __init__(self, splits: dict[str, dict[str, Tensor]]):
        self._splits = splits

    @property
    def splits(self) -> list[str]:
        return list(self._splits)

    def num_examples(self, split: str) -> int:
        return self._splits[split]["ids"].numel()

    def get(self, split: str, ids: Tensor) -> tuple[Tensor, Tensor]:
        """`(chosen (B,), rejected (B,))` float32 for the example ids `ids (B,)`, on `ids`'s device."""
        if split not in self._splits:
            raise RefCacheError(f"the reference cache has no split {split!r} (it has {self.splits})")
        table = self._splits[split]
        keys = torch.as_tensor(ids).reshape(-1).to("cpu", torch.long)
        pos = torch.searchsorted(table["ids"], keys).clamp(max=max(table["ids"].numel() - 1, 0))
        found = table["ids"][pos] == keys if table["ids"].numel() else torch.zeros_like(keys, dtype=torch.bool)
        if not found.all():
            missing = keys[~found]
            raise RefCacheError(f"{missing.numel()} example id(s) not in the reference cache's {split!r} split: "
                                f"{missing[:10].tolist()}")
        device = ids.device if isinstance(ids, Tensor) else "cpu"
        return (table["chosen_logps"][pos].to(device, torch.float32),
                table["rejected_logps"][pos].to(device, torch.float32))

    def collate(self, split: str, base_collate: Callable[[list], dict]) -> Callable[[list], dict]:
        """A picklable collate_fn: `base_collate(examples)` plus the batch's reference log-probs."""
        return partial(_collate_with_reference, self, split, base_collate)


def _collate_with_reference(cache: RefLogps, split: str, base_collate: Callable, examples: list) -> dict:
    batch = base_collate(examples)
    batch["ref_chosen_logps"], batch["ref_rejected_logps"] = cache.get(split, batch["ids"])
    return batch


def read_manifest(cache_dir: str | Path) -> dict:
    """The manifest of a cache; a `RefCacheError` if there is none (unfinished precompute) or it is unreadable."""
    path = Path(cache_dir) / MANIFEST
    if not path.is_file():
        raise RefCacheError(f"{cache_dir}: no {MANIFEST}: not a reference cache, or its precompute did not "
                            "finish. Run scripts/precompute_ref_logprobs.py to (re)create it.")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RefCacheError(f"{path}: unreadable manifest ({e}); the cache is corrupted, recompute it") from e


def _load_split(cache_dir: Path, split: str, entry: dict, expected: list[int]) -> dict[str, Tensor]:
    name = str(entry.get("file", ""))
    shard = cache_dir / name
    if not name or Path(name).name != name or not shard.is_file():
        raise RefCacheError(f"{cache_dir}: the shard {name!r} of split {split!r} is missing; recompute the cache")
    if _sha256_file(shard) != entry.get("sha256"):
        raise RefCacheError(f"{shard}: sha256 differs from the manifest: the shard is corrupted or truncated; "
                            "recompute the cache")
    tensors = load_file(str(shard))
    n = int(entry.get("num_examples", -1))
    if set(tensors) != set(_TENSORS) or any(tensors[k].shape != (n,) for k in _TENSORS):
        raise RefCacheError(f"{shard}: expected tensors {list(_TENSORS)} of {n} values, found "
                            f"{ {k: tuple(v.shape) for k, v in tensors.items()} }")
    ids = tensors["ids"]
    if n > 1 and not (ids[1:] > ids[:-1]).all():
        raise RefCacheError(f"{shard}: ids are not strictly ascending; recompute the cache")
    wanted = torch.as_tensor(list(expected), dtype=torch.long)
    missing = wanted[~torch.isin(wanted, ids)]
    if missing.numel():
        raise RefCacheError(f"{cache_dir}: {missing.numel()} example id(s) of split {split!r} are not in the cache, "
                            f"e.g. {missing[:10].tolist()}. {RECOMPUTE_HINT}")
    return tensors


def load_cache(cache_dir: str | Path, expected_fingerprint: dict, expected_ids: dict[str, list[int]]) -> RefLogps:
    """Verifies a cache against this run and loads it.

    Checks, in order: manifest present, format version, every fingerprint field (all mismatches are
    listed with both values), each needed split present, each shard's sha256, every expected id present.
    Extra ids in the cache are fine.

    Args:
        expected_fingerprint: `reference_fingerprint(...)` of this run.
        expected_ids: `{split: [example id]}` this run will look up.
    Raises:
        RefCacheError: naming what is wrong.
    """
    cache_dir = Path(cache_dir)
    manifest = read_manifest(cache_dir)
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise RefCacheError(f"{cache_dir}: format version {version}, this code reads version {FORMAT_VERSION}; "
                            "recompute the cache with this version of scripts/precompute_ref_logprobs.py")
    mismatches = fingerprint_mismatches(manifest.get("fingerprint", {}), expected_fingerprint)
    if mismatches:
        raise RefCacheError(f"{cache_dir} was computed for other settings than this run:\n  "
                            + "\n  ".join(mismatches) + f"\n{RECOMPUTE_HINT}")
    splits = manifest.get("splits", {})
    tables = {}
    for split, ids in expected_ids.items():
        if split not in splits:
            raise RefCacheError(f"{cache_dir}: no {split!r} split (it has {sorted(splits)}). {RECOMPUTE_HINT}")
        tables[split] = _load_split(cache_dir, split, splits[split], ids)
    return RefLogps(tables)
