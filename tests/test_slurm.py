"""The Slurm templates (slurm/*.sbatch) submitted to a real Slurm: two slurmd on this host (tests/slurm_cluster.py).

Checks what a cluster user relies on: the job trains; the time-limit signal (here `scancel --signal=USR1
--batch`, what `#SBATCH --signal=B:USR1@120` sends) makes it checkpoint, requeue itself and resume, ending with
the weights of an uninterrupted run; `--nodes=2` trains one run over both nodes; the 2-node reference precompute
writes the cache a single process writes. Skipped (with the reason) only where Slurm cannot be started.
"""

import os

import pytest
import torch
from helpers import (
    RESUME_STEPS,
    ROOT,
    free_port,
    load_weights,
    read_example_ids,
    read_scalars,
    results,
    resume_args,
    run_script,
    subprocess_env,
)
from safetensors.torch import load_file
from slurm_cluster import SlurmCluster, SlurmUnavailable

from dpo_core.ref_cache import read_manifest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except SlurmUnavailable as why:
        cluster.stop()
        pytest.skip(f"no Slurm here: {why}")
    yield cluster
    cluster.stop()


def submit(slurm, tmp_path, template, args, *, nodes=1, nproc_per_node=1, **env):
    """`sbatch slurm/<template> ARGS` from `tmp_path` (its logs/ receives the output), multi-CPU config."""
    (tmp_path / "logs").mkdir(exist_ok=True)
    job_env = {**subprocess_env(), "SLURM_CONF": str(slurm.conf), "DPO_CORE_DIR": str(ROOT),
               "ACCELERATE_CONFIG": "accelerate_configs/multi_cpu.yaml", "NPROC_PER_NODE": str(nproc_per_node),
               "MASTER_PORT": str(free_port()), **{k: str(v) for k, v in env.items()}}
    job = slurm.sbatch([f"--nodes={nodes}", str(ROOT / "slurm" / template), *args], env=job_env, cwd=tmp_path)
    return job, tmp_path / "logs" / f"{template.split('.')[0]}-{job}.out"


def log_of(path) -> str:
    return path.read_text() if path.exists() else "(no log)"


def test_usr1_checkpoints_requeues_and_resumes_to_the_uninterrupted_weights(
        slurm, tiny_model_dir, resume_data, resume_reference, tmp_path):
    run = tmp_path / "run"
    hooks = os.pathsep.join([str(ROOT / "tests" / "hooks"), os.environ.get("PYTHONPATH", "")])
    job, log = submit(slurm, tmp_path, "dpo.sbatch", resume_args(tiny_model_dir, resume_data, run),
                      nproc_per_node=2, PYTHONPATH=hooks, DPO_CORE_TEST_BATCH_SLEEP=0.5)
    ids = run / "example_ids" / "rank0.jsonl"
    slurm._until(lambda: ids.exists() and '"step": 3,' in ids.read_text(), 240,
                 f"job {job} did not reach step 3: {slurm.job(job)}\n{log_of(log)}")
    slurm.run(["scancel", "--signal=USR1", "--batch", str(job)])
    record = slurm.wait(job, timeout=400)
    text = log_of(log)
    assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0", (record, text)
    assert record["Restarts"] == "1", text
    assert "USR1: asking training to checkpoint and stop" in text and f"requeueing job {job}" in text
    assert "(restart 1)" in text and "Resumed from" in text  # --open-mode=append kept both attempts' output
    stopped = int(text.split("stopped at step ")[1].split(",")[0])
    assert 3 <= stopped < RESUME_STEPS
    final, expected = load_weights(run), load_weights(resume_reference)
    for key in expected:
        torch.testing.assert_close(final[key], expected[key], atol=1e-6, rtol=0, msg=key)
    assert read_example_ids(run) == read_example_ids(resume_reference)
    loss = read_scalars(run / "logs")["train/loss"]  # no step logged twice
    assert sorted(loss) == list(range(1, RESUME_STEPS + 1))
    assert results(run)["num_processes"] == 2


def test_two_nodes_train_one_run(slurm, tiny_model_dir, resume_data, resume_reference, tmp_path):
    """One process per node; the node rank expands on each node (else both claim rank 0 and hang)."""
    run = tmp_path / "run"
    job, log = submit(slurm, tmp_path, "dpo.sbatch", resume_args(tiny_model_dir, resume_data, run), nodes=2)
    record = slurm.wait(job, timeout=300)
    text = log_of(log)
    assert record["JobState"] == "COMPLETED" and record["NumNodes"] == "2", (record, text)
    assert "2 node(s) x 1 process(es)" in text
    assert results(run)["num_processes"] == 2
    final, expected = load_weights(run), load_weights(resume_reference)  # the same run as 2 processes on 1 node
    for key in expected:
        torch.testing.assert_close(final[key], expected[key], atol=1e-6, rtol=0, msg=key)
    assert read_example_ids(run) == read_example_ids(resume_reference)


def test_two_node_precompute_equals_one_process(slurm, tiny_model_dir, resume_data, tmp_path):
    common = ["--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(resume_data), "--eval_split",
              "test", "--max_length", "64", "--seed", "5"]
    job, log = submit(slurm, tmp_path, "precompute_ref.sbatch", [*common, "--output_dir", str(tmp_path / "two")],
                      nodes=2)
    run_script("precompute_ref_logprobs.py", [*common, "--output_dir", str(tmp_path / "one")])
    record = slurm.wait(job, timeout=300)
    text = log_of(log)
    assert record["JobState"] == "COMPLETED" and record["NumNodes"] == "2", (record, text)
    assert "num_processes=2" in text
    for split in ("train", "eval"):
        one, two = (load_file(tmp_path / d / f"{split}.safetensors") for d in ("one", "two"))
        assert one.keys() == two.keys()
        for key in one:  # other batches on other processes: float32 noise at most
            torch.testing.assert_close(two[key], one[key], atol=1e-5, rtol=0, msg=f"{split}/{key}")
    assert read_manifest(tmp_path / "one")["fingerprint"] == read_manifest(tmp_path / "two")["fingerprint"]
