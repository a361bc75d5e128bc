"""How the scripts end: a user error as one line `error: ...` (exit 1), a bug with its full traceback."""

from __future__ import annotations

import logging
import os
import sys

from .allocator import ENV as ALLOCATOR_ENV
from .allocator import active_allocator
from .errors import PREEMPTED_EXIT_CODE, TrainingPreempted, UserError


def run_cli(main, argv=None) -> None:
    """Runs a script's `main`.

    A `UserError` (bad flag, bad data, stale cache, existing run directory, missing model, non-finite stop)
    ends with its message on one line and exit code 1; `DPO_CORE_TRACEBACK=1` shows its traceback too.
    Every other exception is a bug and propagates with its traceback. A run stopped by SIGTERM/SIGUSR1 after
    committing its checkpoint exits with `PREEMPTED_EXIT_CODE`.
    """
    configure_logging()
    allocator = active_allocator()
    if os.environ.get("RANK", "0") == "0" and allocator in ("tcmalloc", "jemalloc"):  # glibc's: nothing to say
        logging.getLogger("dpo_core").info("memory allocator: %s (%s=glibc keeps glibc's malloc, docs/training.md)",
                                           allocator, ALLOCATOR_ENV)
    try:
        main(argv)
    except UserError as error:
        if os.environ.get("DPO_CORE_TRACEBACK") == "1":
            raise
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(1)
    except TrainingPreempted as stopped:
        if os.environ.get("RANK", "0") == "0":  # once per run, not once per process
            print(str(stopped), flush=True)
        sys.exit(PREEMPTED_EXIT_CODE)


def configure_logging() -> None:
    """dpo_core's INFO messages (what was read, tokenized, stored, pushed) on stderr, prefixed with the rank
    in a multi-process run; left alone where the caller configured the `dpo_core` logger itself."""
    log = logging.getLogger("dpo_core")
    if log.handlers:
        return
    rank = f"[rank {os.environ['RANK']}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter(f"%(asctime)s {rank}%(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at the time of the message (a test's capture, a redirected stream)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass
