"""The scripts' memory allocator (dpo_core/allocator.py): which library is chosen, the re-execution, and that
training computes the same numbers under it."""

import subprocess
import sys

import pytest
import torch
from helpers import ROOT, load_weights, read_scalars, run_script, small_dataset, subprocess_env

from dpo_core import allocator
from dpo_core.allocator import active_allocator, allocator_environment, find_library

INSTALLED = {kind: find_library(kind) for kind in allocator.LIBRARIES}
ANY = INSTALLED["tcmalloc"] or INSTALLED["jemalloc"]
NONE_INSTALLED = "neither tcmalloc nor jemalloc is installed here (apt-get install libtcmalloc-minimal4)"


@pytest.fixture
def libraries(monkeypatch):
    """find_library answering from a dict the test fills."""
    found = {}
    monkeypatch.setattr(allocator, "find_library", lambda kind: found.get(kind))
    return found


def test_auto_prefers_tcmalloc_then_jemalloc_and_keeps_an_existing_preload(libraries):
    assert allocator_environment("auto", {}) == {}  # none installed: glibc's, no error
    libraries["jemalloc"] = "/opt/lib/libjemalloc.so.2"
    env = allocator_environment("auto", {"LD_PRELOAD": "/x/libfoo.so"})
    assert env["LD_PRELOAD"] == "/opt/lib/libjemalloc.so.2:/x/libfoo.so"
    assert env[allocator.PRELOADED] == "jemalloc" and "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD" not in env
    libraries["tcmalloc"] = "libtcmalloc_minimal.so.4"
    env = allocator_environment(None, {})  # unset: auto
    assert env["LD_PRELOAD"] == "libtcmalloc_minimal.so.4" and env[allocator.PRELOADED] == "tcmalloc"
    assert int(env["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"]) >= 2 ** 40  # no line per large allocation
    assert allocator_environment(None, {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": "7"})[
        "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"] == "7"
    assert allocator_environment("jemalloc", {})["LD_PRELOAD"] == "/opt/lib/libjemalloc.so.2"
    # glibc chosen, or an allocator already preloaded by the user: nothing changes
    assert allocator_environment("glibc", {}) == {}
    assert allocator_environment("auto", {"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}) == {}
    assert allocator_environment(None, {allocator.ENV: "glibc"}) == {}


def test_bad_choice_and_missing_library_are_one_line_errors(libraries):
    with pytest.raises(SystemExit, match=r"DPO_CORE_ALLOCATOR='tcmallok': choose one of auto, tcmalloc"):
        allocator_environment(None, {allocator.ENV: "tcmallok"})
    with pytest.raises(SystemExit, match=r"DPO_CORE_ALLOCATOR=tcmalloc: libtcmalloc is not installed \(e.g. "
                                         r"apt-get install libtcmalloc-minimal4\)"):
        allocator_environment("tcmalloc", {})


def test_preload_runs_only_in_a_script_run_as_main(libraries, monkeypatch):
    """An imported script (tests import them) is never re-executed; one run as __main__ is, once."""
    calls = []
    monkeypatch.setattr(allocator.os, "execve", lambda *args: calls.append(args))
    monkeypatch.setattr(allocator.sys, "platform", "linux")
    for name in (allocator.ENV, allocator.PRELOADED, "LD_PRELOAD"):
        monkeypatch.delenv(name, raising=False)
    libraries["tcmalloc"] = "libtcmalloc_minimal.so.4"
    allocator.preload_allocator("scripts.dpo")
    assert calls == []
    allocator.preload_allocator("__main__")
    assert len(calls) == 1 and calls[0][2]["LD_PRELOAD"] == "libtcmalloc_minimal.so.4"
    assert calls[0][1][0] == sys.executable and calls[0][2][allocator.PRELOADED] == "tcmalloc"


def test_find_library_looks_in_the_environment_prefix_first(tmp_path, monkeypatch):
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "libjemalloc.so.2").write_bytes(b"")
    monkeypatch.setenv("VIRTUAL_ENV", str(tmp_path))
    assert find_library("jemalloc") == str(tmp_path / "lib" / "libjemalloc.so.2")


def test_active_allocator_reads_the_memory_map(tmp_path):
    maps = tmp_path / "maps"
    maps.write_text("7f00-7f01 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6\n")
    assert active_allocator(str(maps)) == "glibc"
    maps.write_text(maps.read_text() + "7f02-7f03 r-xp 0 08:01 2 /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4\n")
    assert active_allocator(str(maps)) == "tcmalloc"
    assert active_allocator(str(tmp_path / "missing")) == "unknown"


@pytest.mark.skipif(not ANY or sys.platform != "linux", reason=NONE_INSTALLED)
def test_preload_re_executes_the_same_process_with_the_library(tmp_path):
    """A script calling preload_allocator(__name__) first runs again in the same process (same pid, same arguments),
    now with the library mapped; with DPO_CORE_ALLOCATOR=glibc it runs once, as started."""
    script = tmp_path / "probe.py"
    script.write_text("import os, sys\nprint('start', os.getpid(), sys.argv[1:], flush=True)\n"
                      "from dpo_core.allocator import active_allocator, preload_allocator\npreload_allocator(__name__)\n"
                      "print('running', os.getpid(), active_allocator())\n")
    expected = "tcmalloc" if INSTALLED["tcmalloc"] else "jemalloc"
    for choice, want in (("auto", expected), ("glibc", "glibc")):
        env = subprocess_env(DPO_CORE_ALLOCATOR=choice)
        env.pop("LD_PRELOAD", None)
        env.pop(allocator.PRELOADED, None)
        lines = subprocess.run([sys.executable, str(script), "--a", "1"], env=env, cwd=ROOT, capture_output=True,
                               text=True, check=True).stdout.splitlines()
        pid = lines[0].split()[1]
        starts = 2 if want != "glibc" else 1
        assert lines == [f"start {pid} ['--a', '1']"] * starts + [f"running {pid} {want}"]


@pytest.mark.slow
@pytest.mark.skipif(not ANY or sys.platform != "linux", reason=NONE_INSTALLED)
def test_dpo_script_computes_the_same_under_each_allocator(tiny_model_dir, tmp_path):
    """scripts/dpo.py under the preloaded allocator and under glibc's: the same per-step losses and final
    weights (exactly: the allocator moves where tensors live, not what is computed); the log names a preloaded
    allocator and says nothing of glibc's."""
    data = small_dataset(tmp_path / "data", n_train=16, n_test=8)
    logs = {}
    for choice in ("auto", "glibc"):
        out = tmp_path / choice
        proc = run_script("dpo.py", ["--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(data),
                                     "--output_dir", str(out), "--max_length", "64", "--learning_rate", "5e-3",
                                     "--logging_steps", "1", "--max_steps", "3", "--seed", "3"],
                          env=subprocess_env(DPO_CORE_ALLOCATOR=choice))
        logs[choice] = proc.stderr
    want = "tcmalloc" if INSTALLED["tcmalloc"] else "jemalloc"
    assert f"memory allocator: {want}" in logs["auto"] and "memory allocator" not in logs["glibc"]
    auto, glibc = (read_scalars(tmp_path / c / "logs")["train/loss"] for c in ("auto", "glibc"))
    assert sorted(auto) == [1, 2, 3] and auto == glibc and len(set(auto.values())) > 1
    w_auto, w_glibc = load_weights(tmp_path / "auto"), load_weights(tmp_path / "glibc")
    assert all(torch.equal(w_auto[k], w_glibc[k]) for k in w_auto)
