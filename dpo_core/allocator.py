"""The memory allocator the scripts run with on Linux: tcmalloc or jemalloc where installed (docs/training.md).

glibc's malloc keeps the blocks a training step frees in its heap once its mmap threshold has risen, so a step's
peak resident memory carries what earlier steps left behind (about 1.2 GB at SmolLM2-135M's shape on CPU,
docs/benchmark.md). tcmalloc and jemalloc reuse those blocks. As `python -m torch.backends.xeon.run_cpu` does,
the scripts preload tcmalloc, else jemalloc, where the library is installed: `preload_allocator(__name__)`, the
first statement of every script, re-executes the script (same process id, same arguments, same environment plus
LD_PRELOAD) before torch is imported. Losses, log-probs and checkpoints do not depend on the allocator.

    DPO_CORE_ALLOCATOR=auto       # the default: tcmalloc, then jemalloc, else glibc's malloc
    DPO_CORE_ALLOCATOR=tcmalloc   # or jemalloc: that one, an error where it is not installed
    DPO_CORE_ALLOCATOR=glibc      # leave the process as it was started

Installing one: `apt-get install libtcmalloc-minimal4` (or `libjemalloc2`), `conda install -c conda-forge
gperftools` (or `jemalloc`). A library already in LD_PRELOAD is kept. Nothing happens off Linux.
"""

from __future__ import annotations

import ctypes.util
import glob
import os
import sys

ENV = "DPO_CORE_ALLOCATOR"
CHOICES = ("auto", "tcmalloc", "jemalloc", "glibc")
# Library names per allocator, in order: gperftools' minimal tcmalloc (what distributions ship as a runtime
# package) before the full one.
LIBRARIES = {"tcmalloc": ("tcmalloc_minimal", "tcmalloc"), "jemalloc": ("jemalloc",)}
PRELOADED = "DPO_CORE_ALLOCATOR_PRELOADED"  # the allocator the re-executed process got: never twice


def find_library(kind: str) -> str | None:
    """The path (or loader name) of `kind`'s shared library: $CONDA_PREFIX/lib, $VIRTUAL_ENV/lib and the
    interpreter's prefix first, then the system's loader cache (`ctypes.util.find_library`)."""
    prefixes = dict.fromkeys(p for p in (os.environ.get("CONDA_PREFIX"), os.environ.get("VIRTUAL_ENV"), sys.prefix)
                             if p)
    for name in LIBRARIES[kind]:
        for prefix in prefixes:
            hits = sorted(glob.glob(os.path.join(prefix, "lib", f"lib{name}.so*")))
            if hits:
                return hits[0]
        found = ctypes.util.find_library(name)
        if found:
            return found
    return None


def active_allocator(maps_path: str = "/proc/self/maps") -> str:
    """Which allocator this process has loaded ("tcmalloc", "jemalloc" or "glibc"), read from its memory
    map; "unknown" where there is none to read."""
    try:
        with open(maps_path) as f:
            maps = f.read()
    except OSError:
        return "unknown"
    for kind in ("tcmalloc", "jemalloc"):
        if f"/lib{kind}" in maps:
            return kind
    return "glibc"


def allocator_environment(choice: str | None = None, environ: dict | None = None) -> dict[str, str]:
    """The variables to add to `environ` so that a new process runs with the allocator `choice` (default:
    $DPO_CORE_ALLOCATOR, else auto): empty where nothing is to change (glibc chosen, an allocator already
    preloaded, none installed under auto). Raises SystemExit with one line for an unknown choice or a named
    allocator that is not installed."""
    environ = os.environ if environ is None else environ
    choice = choice or environ.get(ENV) or "auto"
    if choice not in CHOICES:
        raise SystemExit(f"error: {ENV}={choice!r}: choose one of {', '.join(CHOICES)}")
    preload = environ.get("LD_PRELOAD", "")
    if choice == "glibc" or any(f"lib{kind}" in preload for kind in LIBRARIES):
        return {}
    for kind in ("tcmalloc", "jemalloc") if choice == "auto" else (choice,):
        library = find_library(kind)
        if library:
            break
    else:
        if choice == "auto":
            return {}
        package = "libtcmalloc-minimal4" if choice == "tcmalloc" else "libjemalloc2"
        raise SystemExit(f"error: {ENV}={choice}: lib{choice} is not installed (e.g. apt-get install {package}); "
                         f"{ENV}=auto uses it where installed")
    added = {"LD_PRELOAD": ":".join(p for p in (library, preload) if p), PRELOADED: kind}
    if kind == "tcmalloc":  # it prints a line per allocation above 1 GiB otherwise (a large model's embedding)
        added["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"] = environ.get("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD",
                                                                     str(2 ** 62))
    return added


def preload_allocator(module_name: str = "__main__") -> None:
    """Re-executes this script with tcmalloc or jemalloc preloaded where $DPO_CORE_ALLOCATOR asks for it
    (default auto: where one is installed). A script calls it first, with its `__name__`, before importing torch
    (the re-execution repeats what ran before it). Does nothing where the script is imported rather than run
    (`module_name` is not "__main__"), off Linux, in a process it already re-executed, or where nothing is to
    change."""
    if module_name != "__main__" or sys.platform != "linux" or os.environ.get(PRELOADED):
        return
    added = allocator_environment()
    if not added:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], {**os.environ, **added})
