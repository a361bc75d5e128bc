"""Tokenize once: prepared pairs stored on disk under a fingerprint, memory-mapped, reused by every stage.

    store = PreparedStore.default()                              # $DPO_CORE_CACHE or ~/.cache/dpo_core/data
    examples, problems = store.tokenize(records, tokenizer, settings, tokenize_records, num_proc=4)

The key of a store entry is a sha256 over everything that decides the result: every record's content and id
(so a changed byte, or another selection, is another entry), the tokenizer (vocabulary, normalizer, chat
template, special tokens), every tokenization setting, and the tokenize function. The entry holds the token
ids as three flat int32 arrays (`.npy`, mapped with `mmap_mode="r"`: the pages are shared by every process
of a machine and never become Python objects) and the records' problems, so that a reused entry reports bad
records exactly as the first preparation did.

An entry is written to a temporary folder and renamed into place, with the sha256 of each file in its
`meta.json`; an entry whose files do not match (a half-copied or corrupted cache) is removed and rebuilt,
never used. The folder is safe to delete at any time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import hashlib
import importlib.machinery
import itertools
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .records import Problem, Record, dataset_fingerprint, tokenizer_fingerprint
from .tokenized import Example

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
FILES = ("ids.npy", "offsets.npy", "tokens.npy")
POOL_MIN_RECORDS = 2048  # below this, worker processes cost more than they save
CHUNK = 1024             # records per worker task


def default_num_proc() -> int:
    """The cores this process may run on (the `--dataset_num_proc` default)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


# ------------------------------------------------------------------------------------------- arrays

class ExampleArrays(Sequence):
    """Tokenized pairs as three arrays: `ids [N]` int64, `offsets [3N+1]` int64 into `tokens` int32 (prompt,
    chosen, rejected of pair i are `tokens[offsets[3i]:offsets[3i+1]]`, ...). Indexing gives an `Example`
    (lists of ints, made on demand); a slice gives a list of them."""

    def __init__(self, ids: np.ndarray, offsets: np.ndarray, tokens: np.ndarray):
        if len(offsets) != 3 * len(ids) + 1:
            raise ValueError(f"offsets has {len(offsets)} entries for {len(ids)} pairs (expected {3 * len(ids) + 1})")
        self.ids, self.offsets, self.tokens = ids, offsets, tokens

    @classmethod
    def from_examples(cls, examples: Sequence[Example]) -> ExampleArrays:
        parts = [part for e in examples for part in (e.prompt_ids, e.chosen_ids, e.rejected_ids)]
        offsets = np.zeros(len(parts) + 1, dtype=np.int64)
        np.cumsum(np.fromiter(map(len, parts), dtype=np.int64, count=len(parts)), out=offsets[1:])
        tokens = np.fromiter(itertools.chain.from_iterable(parts), dtype=np.int32, count=int(offsets[-1]))
        ids = np.fromiter((e.id for e in examples), dtype=np.int64, count=len(examples))
        return cls(ids, offsets, tokens)

    @classmethod
    def concatenate(cls, parts: list[ExampleArrays]) -> ExampleArrays:
        if not parts:
            return cls(np.zeros(0, np.int64), np.zeros(1, np.int64), np.zeros(0, np.int32))
        shifts = np.cumsum([0] + [int(p.offsets[-1]) for p in parts[:-1]])
        offsets = np.concatenate([np.zeros(1, np.int64)] + [p.offsets[1:] + s for p, s in zip(parts, shifts)])
        return cls(np.concatenate([p.ids for p in parts]), offsets, np.concatenate([p.tokens for p in parts]))

    def __len__(self) -> int:
        return len(self.ids)

    def _part(self, k: int) -> list[int]:
        return self.tokens[self.offsets[k]: self.offsets[k + 1]].tolist()

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        index = int(index)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        return Example(int(self.ids[index]), self._part(3 * index), self._part(3 * index + 1), self._part(3 * index + 2))

    @classmethod
    def load(cls, folder: Path) -> ExampleArrays:
        return cls(*(np.load(folder / name, mmap_mode="r", allow_pickle=False) for name in FILES))


class _StreamWriter:
    """Writes `ExampleArrays` parts into a folder as they come: the tokens go straight to `tokens.npy` (its
    fixed-size header written last), only ids and offsets stay in memory, so no more than one part's tokens
    is ever held here, however large the data."""

    HEADER = 128  # bytes of a 1-D .npy header (version 1.0) for any length below 10**15

    def __init__(self, folder: Path):
        self.folder, self.ids, self.offsets, self.n = folder, [], [np.zeros(1, np.int64)], 0
        self.file = open(folder / "tokens.npy", "wb")
        self.file.seek(self.HEADER)

    def append(self, part: ExampleArrays) -> None:
        self.file.write(np.ascontiguousarray(part.tokens, dtype="<i4").tobytes())
        self.ids.append(np.asarray(part.ids, dtype=np.int64))
        self.offsets.append(np.asarray(part.offsets[1:], dtype=np.int64) + self.n)
        self.n += int(part.offsets[-1])

    def close(self) -> dict[str, str]:
        import io

        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(header, {"descr": "<i4", "fortran_order": False, "shape": (self.n,)})
        if header.tell() != self.HEADER:
            raise RuntimeError(f"unexpected .npy header size {header.tell()} for {self.n} tokens")
        self.file.seek(0)
        self.file.write(header.getvalue())
        self.file.close()
        np.save(self.folder / "ids.npy", np.concatenate(self.ids or [np.zeros(0, np.int64)]), allow_pickle=False)
        np.save(self.folder / "offsets.npy", np.concatenate(self.offsets), allow_pickle=False)
        return {name: _file_sha256(self.folder / name) for name in FILES}


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------------------------ parallel tokenizing

_WORKER: dict = {}


def _init_worker(tokenizer, settings, tokenize) -> None:
    _WORKER.update(tokenizer=tokenizer, settings=settings, tokenize=tokenize)
    logging.getLogger("dpo_core").setLevel(logging.ERROR)  # the parent reports once for all chunks


def _tokenize_chunk(records: list[Record]) -> tuple[ExampleArrays, list[Problem], int]:
    examples, problems = _WORKER["tokenize"](records, _WORKER["tokenizer"], _WORKER["settings"])
    return ExampleArrays.from_examples(examples), problems, len(records)


def _start_method(tokenizer, settings, tokenize) -> str:
    """"spawn" where the workers can be started fresh: they import the tokenize function's module and the
    tokenizer (no torch, `dpo_core.tokenized`), about 165 MB each, where a forked worker starts as a copy of the
    trainer's process (its pages count in each worker's RSS). "fork" for a function a fresh process cannot import
    (defined in the script or in a function), a tokenizer class of the model's own code (`trust_remote_code`), or
    a tokenizer that does not pickle."""
    import multiprocessing
    import pickle

    if "fork" not in multiprocessing.get_all_start_methods():
        return "spawn"
    if getattr(tokenize, "__module__", "__main__") == "__main__" or "<locals>" in getattr(tokenize, "__qualname__", ""):
        return "fork"
    if not type(tokenizer).__module__.startswith(("transformers.", "tokenizers.")):
        return "fork"
    try:
        pickle.dumps((tokenizer, settings, tokenize))
    except Exception:  # a tokenizer or function that does not pickle: the workers inherit it instead
        return "fork"
    return "spawn"


@contextlib.contextmanager
def _workers_skip_main(method: str):
    """While the workers start: spawned processes import this package, not the script that started them (which
    imports torch). multiprocessing re-runs `__main__` in a spawned child unless `__main__.__spec__` names
    `__main__`; the tokenize function never lives there (`_start_method`). Forked workers need nothing."""
    main = sys.modules.get("__main__") if method == "spawn" else None
    saved = getattr(main, "__spec__", None)
    if main is not None:
        main.__spec__ = importlib.machinery.ModuleSpec("__main__", None)
    try:
        yield
    finally:
        if main is not None:
            main.__spec__ = saved


def tokenize_parallel(records: list[Record], tokenizer, settings, tokenize, *, num_proc: int,
                      desc: str = "tokenizing", progress: bool = True, sink=None
                      ) -> tuple[ExampleArrays | None, list[Problem]]:
    """`tokenize(records, tokenizer, settings)` over `num_proc` worker processes, chunk by chunk, in input order,
    with a progress bar (records, rate, ETA). One process where the records are few or `num_proc <= 1`.
    With `sink`, each chunk's arrays go to `sink(part)` as they come and the returned arrays are None.

    A tokenize function whose result depends on the whole split (KTO's unpairing blocks and KL rotation) has
    `for_split(records)`, the per-record part that the chunks run, and `finish(records, examples, problems,
    settings) -> (iterator of examples, problems)`, run here once over every chunk's examples, in order."""
    from tqdm.auto import tqdm

    bar = tqdm(total=len(records), desc=desc, unit=" records", disable=not progress or len(records) < CHUNK,
               mininterval=1.0)
    finish = getattr(tokenize, "finish", None)
    per_chunk = tokenize.for_split(records) if finish else tokenize
    out = None if finish else sink  # a split that needs `finish` reaches the sink after it, whole
    chunks = [records[i: i + CHUNK] for i in range(0, len(records), CHUNK)]
    parts, problems = [], []
    if num_proc <= 1 or len(records) < POOL_MIN_RECORDS:
        for chunk in chunks:
            examples, found = per_chunk(chunk, tokenizer, settings)
            part = ExampleArrays.from_examples(examples)
            out(part) if out else parts.append(part)
            problems += found
            bar.update(len(chunk))
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the workers are the parallelism
        method = _start_method(tokenizer, settings, per_chunk)
        # A worker that dies (or fails to start) breaks the pool: BrokenProcessPool here, never a hang.
        pool = ProcessPoolExecutor(min(num_proc, len(chunks)), multiprocessing.get_context(method), _init_worker,
                                   (tokenizer, settings, per_chunk))
        if method == "fork":
            gc.freeze()  # forked workers share the parent's objects; a collection there would copy their pages
        try:
            with _workers_skip_main(method):
                results = pool.map(_tokenize_chunk, chunks)  # starts the workers; yields in input order
            for part, found, n in results:
                out(part) if out else parts.append(part)
                problems += found
                bar.update(n)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)  # on an error: the chunks not started are dropped
            gc.unfreeze()
    bar.close()
    if finish:  # its examples come as an iterator: made into arrays a chunk at a time
        examples, problems = finish(records, ExampleArrays.concatenate(parts), problems, settings)
        parts = []
        while chunk := list(itertools.islice(examples, CHUNK)):
            part = ExampleArrays.from_examples(chunk)
            sink(part) if sink else parts.append(part)
    return (None if sink else ExampleArrays.concatenate(parts)), problems


# ------------------------------------------------------------------------------------------------ store

def _settings_dict(settings) -> dict:
    return dataclasses.asdict(settings) if dataclasses.is_dataclass(settings) else dict(vars(settings))


class PreparedStore:
    """A folder of prepared-data entries, one per fingerprint (see the module docstring)."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()

    @classmethod
    def default(cls) -> PreparedStore:
        return cls(os.environ.get("DPO_CORE_CACHE") or Path("~/.cache/dpo_core/data").expanduser())

    def key(self, records: list[Record], tokenizer, settings, tokenize) -> str:
        state = {"format": FORMAT_VERSION, "records": dataset_fingerprint(records),
                 "sources": sorted({r.source for r in records}),  # a problem names its file: part of the result
                 "tokenizer": tokenizer_fingerprint(tokenizer), "settings": _settings_dict(settings),
                 "tokenize": f"{tokenize.__module__}.{tokenize.__qualname__}"}
        return hashlib.sha256(json.dumps(state, sort_keys=True, default=str).encode("utf-8")).hexdigest()

    def _read(self, folder: Path) -> tuple[ExampleArrays, list[Problem]] | None:
        """The entry in `folder`, or None (after removing it) where a file is missing or does not match."""
        meta_path = folder / "meta.json"
        try:
            meta = json.loads(meta_path.read_text())
            if meta.get("format") != FORMAT_VERSION:
                raise ValueError(f"format {meta.get('format')} (this version reads {FORMAT_VERSION})")
            for name, digest in meta["sha256"].items():
                if _file_sha256(folder / name) != digest:
                    raise ValueError(f"{name} does not match its sha256")
            arrays = ExampleArrays.load(folder)
            problems = [Problem(**p) for p in (json.loads(line) for line in
                                               (folder / "problems.jsonl").read_text().splitlines())]
            if len(arrays) != meta["num_examples"] or len(problems) != meta["num_problems"]:
                raise ValueError("counts differ from meta.json")
        except (OSError, ValueError, KeyError, TypeError) as e:
            logger.warning("prepared data in %s is unusable (%s): removed, preparing again", folder, e)
            shutil.rmtree(folder, ignore_errors=True)
            return None
        return arrays, problems

    def _build(self, folder: Path, key: str, records, tokenizer, settings, tokenize, num_proc, desc, progress
               ) -> tuple[int, list[Problem]]:
        """Tokenizes into a temporary folder beside `folder`, then renames it into place (atomic)."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key[:16]}.", dir=self.root))
        try:
            writer = _StreamWriter(tmp)
            try:
                _, problems = tokenize_parallel(records, tokenizer, settings, tokenize, num_proc=num_proc, desc=desc,
                                                progress=progress, sink=writer.append)
            finally:
                digests = writer.close()
            with open(tmp / "problems.jsonl", "w", encoding="utf-8") as f:
                for p in problems:
                    f.write(json.dumps(dataclasses.asdict(p), ensure_ascii=False) + "\n")
            digests["problems.jsonl"] = _file_sha256(tmp / "problems.jsonl")
            n = sum(len(i) for i in writer.ids)
            meta = {"format": FORMAT_VERSION, "key": key, "num_examples": n, "num_problems": len(problems),
                    "num_tokens": writer.n, "sha256": digests}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))  # last: an entry without it is incomplete
            try:
                os.rename(tmp, folder)  # atomic; fails where another process got there first
            except OSError:
                if not (folder / "meta.json").exists():
                    raise
            return n, problems
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def tokenize(self, records: list[Record], tokenizer, settings, tokenize, *, num_proc: int | None = None,
                 desc: str = "tokenizing", progress: bool = True) -> tuple[ExampleArrays, list[Problem]]:
        """The prepared pairs and problems of `records`: read from the store where an intact entry has this
        key, otherwise tokenized (`tokenize_parallel`) and stored. Same result as `tokenize(records, tokenizer,
        settings)` (`data.tokenize_records`, or SFT's `sft_data.tokenize_sft_records`)."""
        key = self.key(records, tokenizer, settings, tokenize)
        folder = self.root / key
        if folder.exists():
            found = self._read(folder)
            if found is not None:
                logger.info("%s: %d pairs read from the prepared-data store (%s)", desc, len(found[0]), folder)
                return found
        num_proc = num_proc or default_num_proc()
        try:
            n, problems = self._build(folder, key, records, tokenizer, settings, tokenize, num_proc, desc, progress)
        except OSError as e:  # a read-only or full disk: train anyway, say why nothing was stored
            logger.warning("could not store the prepared data in %s (%s); it is prepared again next time",
                           self.root, e)
            return tokenize_parallel(records, tokenizer, settings, tokenize, num_proc=num_proc, desc=desc,
                                     progress=progress)
        logger.info("%s: %d pairs tokenized, stored in %s", desc, n, folder)
        found = self._read(folder)
        if found is None:
            raise RuntimeError(f"the prepared data just written to {folder} does not read back")
        return found
