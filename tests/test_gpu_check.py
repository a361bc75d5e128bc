"""benchmarks/gpu_check.py's harness, run small on the CPU (`--smoke`): every check that can run here runs the
real scripts and compares losses; the CUDA-only ones are skipped with their reason; the JSON and the markdown
table are written. (On a GPU the same file is `make gpu-check`.)"""

import json

import pytest
from helpers import run_script


@pytest.mark.slow
def test_smoke_run_of_the_gpu_check(tmp_path):
    proc = run_script("benchmarks/gpu_check.py", ["--output_dir", str(tmp_path), "--smoke"], check=False)
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    rows = report["rows"]
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    by = {(r["check"], r.get("variant")): r for r in rows}
    for variant in ("concat (reference)", "auto", "padding_free", "shared_prefix"):
        assert by[("layouts", variant)]["status"] == "ok", by.get(("layouts", variant))
    assert by[("layouts", "auto")]["auto"] == ["shared_prefix"]  # prompts are half of these pairs' tokens
    for check, variant in (("layouts", "auto"), ("compile", "torch_compile"), ("precompute", "cached")):
        row = by[(check, variant)]
        assert row["status"] == "ok" and row["max_loss_diff"] <= 1e-4 and row["tokens_per_second"] > 0, row
    assert by[("compile", "torch_compile")]["compiled_graphs"] >= 1
    for check in ("qlora", "distributed", "benchmark"):
        assert by[(check, None)]["status"] == "skip" and by[(check, None)]["reason"], check
    table = (tmp_path / "gpu_check.md").read_text()
    assert table.startswith("GPU check on cpu") and table.count("| ok |") == 6 and table.count("| skip |") == 3
