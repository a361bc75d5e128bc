"""The commands of the documentation: every ```bash block of README.md, CONTRIBUTING.md and docs/*.md.

(a) every script, accelerate config, recipe, Slurm file and `make` target a command names exists;
(b) every `--flag` given to a script (directly, under `accelerate launch`, or through a Slurm template) is one
    that script's parser accepts (`python scripts/X.py --help`, run once per script);
(c) a few short commands run end to end as written (slow), from a directory holding `data/`, `recipes/`,
    `accelerate_configs/` and `scripts/` of this checkout, as the repository root does.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, subprocess_env

DOC_FILES = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]
PATH_RE = re.compile(r"^(scripts/[\w.-]+\.py|benchmarks/[\w.-]+\.py|accelerate_configs/[\w.-]+\.yaml"
                     r"|recipes/[\w.-]+\.yaml|slurm/[\w.-]+)$")
SCRIPT_RE = re.compile(r"^(scripts|benchmarks)/[\w.-]+\.py$")
# The Slurm templates hand every argument to one script (see each template's last line).
SLURM_SCRIPTS = {"slurm/dpo.sbatch": "scripts/dpo.py", "slurm/sft.sbatch": "scripts/sft.py",
                 "slurm/precompute_ref.sbatch": "scripts/precompute_ref_logprobs.py"}
# Files a checkout may not hold yet (added in parallel work); their checks are skipped, saying why.
NOT_YET = {"benchmarks/dpo_vs_trl.py": "benchmarks/dpo_vs_trl.py is not in this checkout yet"}
MAKE_NOT_YET = {"test-fast": "the Makefile has no test-fast target yet"}


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def bash_commands(path: Path) -> list[str]:
    """The logical command lines of a file's ```bash blocks (backslash continuations joined)."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", path.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip() and not line.strip().startswith("#"):
                out.append(line.strip())
    return out


COMMANDS = [(rel(f), i, cmd) for f in DOC_FILES for i, cmd in enumerate(bash_commands(f))]
IDS = [f"{f}:{i}" for f, i, _ in COMMANDS]


def tokens(cmd: str) -> list[str]:
    return shlex.split(cmd, comments=True)


def is_placeholder(path: str) -> bool:
    """The user's own files in examples: `recipes/my_dpo.yaml`, `my-sft-model`."""
    return Path(path).name.startswith(("my_", "my-"))


@functools.cache
def make_targets() -> frozenset[str]:
    targets = set()
    for line in (ROOT / "Makefile").read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\- ]+):(?!=)", line)
        if m:
            targets.update(m.group(1).split())
    return frozenset(targets)


def docs_env() -> dict:
    """This checkout's dpo_core first (an installed copy may be another checkout), this interpreter's tools."""
    pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    path = os.pathsep.join((str(Path(sys.executable).parent), os.environ.get("PATH", "")))
    return subprocess_env(PYTHONPATH=pythonpath, PATH=path)


def test_docs_have_commands():
    assert len(COMMANDS) > 20
    assert {f for f, _, _ in COMMANDS} >= {"README.md", "docs/lora.md", "docs/distributed.md", "docs/slurm.md"}


@pytest.mark.parametrize("doc,index,cmd", COMMANDS, ids=IDS)
def test_named_paths_and_make_targets_exist(doc, index, cmd):
    toks = tokens(cmd)
    skipped = []
    for tok in toks:
        for part in (tok, tok.split("=", 1)[-1]):  # `ACCELERATE_CONFIG=accelerate_configs/x.yaml`
            if not PATH_RE.match(part) or is_placeholder(part):
                continue
            if part in NOT_YET and not (ROOT / part).exists():
                skipped.append(NOT_YET[part])
                continue
            assert (ROOT / part).exists(), f"{doc}: `{cmd}` names {part}, which does not exist"
    if toks and toks[0] == "make":
        for target in (t for t in toks[1:] if not t.startswith("-") and "=" not in t):
            if target in MAKE_NOT_YET and target not in make_targets():
                skipped.append(MAKE_NOT_YET[target])
                continue
            assert target in make_targets(), f"{doc}: `{cmd}`: no Makefile target {target!r}"
    if skipped:
        pytest.skip("; ".join(skipped))


def script_and_flags(cmd: str) -> tuple[str, list[str]] | None:
    """The script a command runs and the flags it passes to that script (not those of accelerate or sbatch)."""
    toks = tokens(cmd)
    for i, tok in enumerate(toks):
        script = SLURM_SCRIPTS.get(tok) or (tok if SCRIPT_RE.match(tok) else None)
        if script:
            return script, [t.split("=", 1)[0] for t in toks[i + 1:] if t.startswith("--")]
    return None


SCRIPT_COMMANDS = [(d, i, c) for d, i, c in COMMANDS if script_and_flags(c)]


# One process prints the help of every script: each script's `main(["--help"])`, so that torch and
# transformers are imported once, not once per script (several seconds each on a small machine).
HELP_ALL = r"""
import contextlib, io, json, runpy, sys
out = {}
for script in sys.argv[1:]:
    buf = io.StringIO()
    try:
        main = runpy.run_path(script, run_name="docs_help")["main"]
        with contextlib.redirect_stdout(buf), contextlib.suppress(SystemExit):
            main(["--help"])
        out[script] = buf.getvalue()
    except Exception:
        out[script] = None
print("\nHELP-JSON " + json.dumps(out))
"""


@functools.cache
def all_helps() -> dict[str, str | None]:
    scripts = sorted({script_and_flags(c)[0] for _, _, c in SCRIPT_COMMANDS} | set(SLURM_SCRIPTS.values()))
    scripts = [s for s in scripts if (ROOT / s).exists()]
    proc = subprocess.run([sys.executable, "-c", HELP_ALL, *scripts], cwd=ROOT, env=docs_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "HELP-JSON " in proc.stdout, proc.stderr[-4000:]
    return json.loads(proc.stdout.rsplit("HELP-JSON ", 1)[1])


def script_help(script: str) -> str:
    """The script's --help text; a script without `main(argv)` is asked as a user would ask it."""
    text = all_helps().get(script)
    if text:
        return text
    proc = subprocess.run([sys.executable, str(ROOT / script), "--help"], cwd=ROOT, env=docs_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{script} --help failed:\n{proc.stderr[-4000:]}"
    return proc.stdout




@pytest.mark.parametrize("doc,index,cmd", SCRIPT_COMMANDS, ids=[f"{d}:{i}" for d, i, _ in SCRIPT_COMMANDS])
def test_flags_are_accepted_by_their_script(doc, index, cmd):
    script, flags = script_and_flags(cmd)
    if script in NOT_YET and not (ROOT / script).exists():
        pytest.skip(NOT_YET[script])
    help_text = script_help(script)
    unknown = [f for f in flags if not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", help_text)]
    assert not unknown, f"{doc}: `{cmd}`: {script} does not accept {unknown}"


def test_the_checks_catch_a_wrong_flag_and_see_through_launchers():
    cmd = ("ACCELERATE_CONFIG=accelerate_configs/ddp.yaml sbatch --nodes=2 slurm/dpo.sbatch "
           "--config recipes/my_dpo.yaml --save_steps 500 --max_step 3")
    script, flags = script_and_flags(cmd)
    assert (script, flags) == ("scripts/dpo.py", ["--config", "--save_steps", "--max_step"])
    help_text = script_help(script)
    assert "--max_steps" in help_text and not re.search(r"(?<![\w-])--max_step(?![\w-])", help_text)


def doc_command(doc: str, needle: str) -> str:
    """The one command of `doc` containing `needle`, exactly as written there."""
    found = [c for d, _, c in COMMANDS if d == doc and needle in c]
    assert len(found) == 1, f"{doc}: {len(found)} commands contain {needle!r}"
    return found[0]


def run_as_written(cmd: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(["bash", "-c", cmd], cwd=cwd, env=docs_env(), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"`{cmd}` failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


@pytest.fixture
def workdir(tmp_path):
    for name in ("data", "recipes", "accelerate_configs", "scripts"):
        (tmp_path / name).symlink_to(ROOT / name)
    return tmp_path


@pytest.mark.slow
def test_lora_and_tr_dpo_commands_run_as_written(workdir):
    """docs/lora.md: the tiny model, a LoRA DPO run with a merged copy, and its answers next to the base
    model's; docs/losses.md: TR-DPO on the same tiny model."""
    run_as_written(doc_command("docs/lora.md", "scripts/build_tiny_model.py runs/tiny-model"), workdir)
    assert (workdir / "runs/tiny-model/config.json").exists()

    run_as_written(doc_command("docs/lora.md", "--output_dir runs/dpo-lora --use_lora --lora_r 16"), workdir)
    assert (workdir / "runs/dpo-lora/adapter_model.safetensors").exists()
    assert (workdir / "runs/dpo-lora/merged/config.json").exists()

    proc = run_as_written(doc_command("docs/lora.md", "scripts/generate.py --models base=runs/tiny-model"),
                          workdir)
    assert "| question | base | lora |" in proc.stdout and "What is your name?" in proc.stdout

    run_as_written(doc_command("docs/losses.md", "--sync_ref_model"), workdir)
    assert (workdir / "runs/dpo-trdpo/train_results.json").exists()
