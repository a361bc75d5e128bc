"""The tracker registry and the trackers themselves, through accelerate.

Unit tests: `--report_to` is validated against the registry (`all`, `none`), a missing package is named with its
pip extra before anything loads, each tracker's start-up arguments come from its one entry.

Slow tests run `scripts/dpo.py` with real packages and no network: wandb offline (its `run-*.wandb` files read
back), mlflow against a local tracking server started here, trackio's local SQLite store. Every scalar each
tracker recorded is compared with TensorBoard's (same tags, same steps, float32 values equal to 1e-6), the
config with the other trackers', and a run stopped by SIGUSR1 after step 2 and resumed must be ONE run per
tracker whose history has every step once, equal to the uninterrupted run's.
"""

import json
import os
import signal
import struct
import subprocess
import sys
import time
import urllib.request
from dataclasses import fields
from pathlib import Path

import pytest
from helpers import ROOT, free_port, read_scalars, read_scalars_as_shown, small_dataset, subprocess_env

from dpo_core import trackers
from dpo_core.checkpoints import complete_checkpoints
from dpo_core.config import DPOConfig, TrainArguments
from dpo_core.errors import ConfigError


def test_report_to_takes_the_registered_trackers_all_or_none():
    for name in trackers.TRACKERS:
        assert TrainArguments(output_dir="x", report_to=[name]).report_to == [name]
    assert set(trackers.TRACKERS) >= {"tensorboard", "wandb", "mlflow", "trackio", "comet_ml", "aim", "swanlab",
                                      "clearml", "dvclive"}
    assert TrainArguments(output_dir="x", report_to="none").report_to == ["none"]  # a YAML string
    assert TrainArguments(output_dir="x").report_to == ["tensorboard"]
    with pytest.raises(ConfigError, match="unknown \\['tensorbord'\\]"):
        TrainArguments(output_dir="x", report_to=["tensorbord"])
    for alone in ("none", "all"):
        with pytest.raises(ConfigError, match=f"{alone} stands alone"):
            TrainArguments(output_dir="x", report_to=[alone, "tensorboard"])
    choices = next(f for f in fields(TrainArguments) if f.name == "report_to").metadata["choices"]
    assert choices == [*trackers.TRACKERS, "all", "none"]  # the flag's choices come from the registry
    assert trackers.enabled_trackers(["none"]) == []
    assert trackers.enabled_trackers(["tensorboard", "tensorboard"]) == ["tensorboard"]


def test_all_expands_to_the_installed_trackers(monkeypatch):
    installed = {"tensorboard", "wandb"}
    monkeypatch.setattr(trackers, "installed", lambda tracker: tracker.name in installed)
    assert trackers.enabled_trackers(["all"]) == ["tensorboard", "wandb"]  # registry order
    real = [name for name, t in trackers.TRACKERS.items() if __import__("importlib").util.find_spec(t.package)]
    monkeypatch.undo()
    assert trackers.enabled_trackers(["all"]) == real and "tensorboard" in real


def test_a_missing_tracker_package_names_its_pip_extra(monkeypatch):
    fake = trackers.Tracker("faketracker", "no_such_package_for_dpo_core", "faketracker")
    monkeypatch.setitem(trackers.TRACKERS, "faketracker", fake)
    TrainArguments(output_dir="x", report_to=["faketracker"])  # names are checked at parse time, packages later
    with pytest.raises(ConfigError, match=r"pip install 'dpo_core\[faketracker\]'"):
        trackers.enabled_trackers(["faketracker"])
    # a registered tracker whose package is missing: the extra of setup.cfg
    monkeypatch.setattr(trackers, "installed", lambda tracker: tracker.name != "wandb")
    with pytest.raises(ConfigError, match=r"--report_to wandb needs the wandb package: pip install 'dpo_core\[wandb\]'"):
        trackers.enabled_trackers(["tensorboard", "wandb"])


def test_every_tracker_has_its_pip_extra_in_setup_cfg():
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    extras = cfg["options.extras_require"]
    for tracker in trackers.TRACKERS.values():
        assert tracker.extra in extras, tracker.extra
    for extra in ("trackers", "test"):  # CI installs the trackers the slow tests run
        names = {line.strip().split(">")[0].split("=")[0] for line in extras[extra].split("\n") if line.strip()}
        assert names >= {"wandb", "mlflow", "trackio"}, extra


def test_a_missing_tracker_package_stops_the_run_before_the_model_loads(tmp_path, monkeypatch):
    from dpo_core import dpo as dpo_module

    monkeypatch.setattr(trackers, "installed", lambda tracker: tracker.name != "mlflow")
    monkeypatch.setattr(dpo_module, "load_model_and_tokenizer", lambda *a, **k: pytest.fail("model loaded"))
    config = DPOConfig(model_name_or_path="nowhere", dataset_name="nowhere", output_dir=str(tmp_path / "run"),
                       report_to=["tensorboard", "mlflow"], max_steps=1)
    with pytest.raises(ConfigError, match=r"pip install 'dpo_core\[mlflow\]'"):
        dpo_module.run_dpo(config, config, config, config)


def test_each_tracker_starts_with_the_run_name_and_continues_a_stored_run():
    run = trackers.RunInfo("proj", "my-run", "/out", resumed_step=0)
    kwargs = trackers.tracker_init_kwargs(["tensorboard", "wandb", "mlflow", "trackio"], run)
    assert kwargs == {"tensorboard": {"purge_step": None}, "wandb": {"name": "my-run"},
                      "mlflow": {"run_name": "my-run"}, "trackio": {"name": "my-run", "resume": "never"}}
    resumed = trackers.RunInfo("proj", "my-run", "/out", resumed_step=6)
    kwargs = trackers.tracker_init_kwargs(["tensorboard", "wandb", "mlflow", "trackio"], resumed,
                                          {"wandb": "abc123", "mlflow": "f00d"})
    assert kwargs == {"tensorboard": {"purge_step": 7}, "wandb": {"name": "my-run", "id": "abc123", "resume": "allow"},
                      "mlflow": {"run_id": "f00d"}, "trackio": {"name": "my-run", "resume": "allow"}}


def test_run_name_defaults_to_the_output_dir_name_and_project_to_dpo_core():
    args = TrainArguments(output_dir="runs/dpo-beta0.1/")
    assert trackers.run_name_of(args) == "dpo-beta0.1" and args.project_name == "dpo_core"
    assert trackers.run_name_of(TrainArguments(output_dir="runs/x", run_name="mine")) == "mine"


# ----------------------------------------------------------------------------------- real trackers, offline

STEPS = 4
TIME_BASED = ("train/tokens_per_second", "train/mfu")  # differ between two runs (not between two trackers)


def run_args(model, data, out, run_name, *extra):
    return ["--model_name_or_path", str(model), "--dataset_name", str(data), "--eval_split", "test",
            "--output_dir", str(out), "--max_length", "64", "--learning_rate", "5e-3", "--logging_steps", "1",
            "--eval_steps", "2", "--save_steps", "2", "--max_steps", str(STEPS), "--per_device_train_batch_size", "2",
            "--seed", "3", "--run_name", run_name, "--resume_from_checkpoint", "latest",
            "--report_to", "tensorboard", "wandb", "mlflow", "trackio", *extra]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server on 127.0.0.1 (SQLite backend), killed at teardown."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    log = open(root / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--default-artifact-root",
                             str(root / "artifacts"), "--workers", "1"], stdout=log, stderr=subprocess.STDOUT,
                            cwd=root, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            if urllib.request.urlopen(f"{uri}/health", timeout=2).status == 200:
                break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"mlflow server did not start:\n{(root / 'server.log').read_text()[-3000:]}")
        time.sleep(0.5)
    yield uri
    os.killpg(proc.pid, signal.SIGTERM)  # the server's own process group (it runs uvicorn workers)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    log.close()


@pytest.fixture(scope="module")
def tracker_env(mlflow_server, tmp_path_factory):
    root = tmp_path_factory.mktemp("trackers")
    return root, {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(root / "wandb"),
                  "MLFLOW_TRACKING_URI": mlflow_server, "TRACKIO_DIR": str(root / "trackio"),
                  "HF_HUB_OFFLINE": "1"}


def launch(args, env, **extra_env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "scripts" / "dpo.py"), *args], cwd=ROOT,
                            env=subprocess_env(**env, **extra_env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def finish(proc, timeout=600) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-6000:]
    return out


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tracker_env, tmp_path_factory):
    """The uninterrupted run, logging to TensorBoard, wandb (offline), mlflow (local server) and trackio at once."""
    root, env = tracker_env
    data = small_dataset(tmp_path_factory.mktemp("tracker-data"), n_train=16, n_test=4)
    out = root / "reference"
    (root / "wandb-reference").mkdir()
    finish(launch(run_args(tiny_model_dir, data, out, "reference"), {**env, "WANDB_DIR": str(root / "wandb-reference")}))
    return out, data


# --- reading each tracker back: {tag: {step: value}}, asserting no step twice


def wandb_records(path: Path):
    """The records of a `run-*.wandb` file (wandb's LevelDB-log format: 7-byte file header ':W&B', magic,
    version; 32 KiB blocks of records, each with a 7-byte header crc32, length, type FULL/FIRST/MIDDLE/LAST)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B", path
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        room = block - pos % block
        if room < 7:
            pos += room
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:  # zero padding to the end of a block
            pos += room
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            yield record


def read_wandb(wandb_dir: Path) -> tuple[list[dict], dict[str, dict[int, list[float]]]]:
    """(each run file's run record as a dict, {tag: {step: [values over every file]}})."""
    runs, history = [], {}
    files = sorted(wandb_dir.rglob("offline-run-*/run-*.wandb"))
    assert files, f"no offline wandb runs under {wandb_dir}"
    for file in files:
        for record in wandb_records(file):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                config = {item.key: json.loads(item.value_json) for item in record.run.config.update
                          if not item.key.startswith("_")}
                config = {k: v["value"] if isinstance(v, dict) and "value" in v else v for k, v in config.items()}
                runs.append({"id": record.run.run_id, "name": record.run.display_name,
                             "project": record.run.project, "config": config})
            elif kind == "config":  # `wandb.config.update` after the start (accelerate's store_init_configuration)
                runs[-1]["config"].update({item.key: json.loads(item.value_json)
                                           for item in record.config.update if not item.key.startswith("_")})
            elif kind == "history":
                items = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item}
                for key, value in items.items():
                    if not key.startswith("_") and isinstance(value, (int, float)):  # a table: a dict
                        history.setdefault(key, {}).setdefault(int(items["_step"]), []).append(float(value))
    return runs, history


def read_mlflow(uri: str, run_name: str) -> tuple[list, dict[str, dict[int, list[float]]]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("dpo_core")
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.mlflow.runName = '{run_name}'")
    history = {}
    for run in runs:
        for key in run.data.metrics:
            for metric in client.get_metric_history(run.info.run_id, key):
                history.setdefault(key, {}).setdefault(metric.step, []).append(metric.value)
    return runs, history


def read_trackio(trackio_dir: Path, run_name: str) -> tuple[list[str], dict[str, dict[int, list[float]]], dict]:
    code = ("import json, sys; from trackio.sqlite_storage import SQLiteStorage as S; "
            "print(json.dumps([S.get_runs('dpo_core'), S.get_logs('dpo_core', sys.argv[1]), "
            "S.get_run_config('dpo_core', sys.argv[1])]))")
    # trackio reads TRACKIO_DIR at import: a fresh interpreter
    proc = subprocess.run([sys.executable, "-c", code, run_name], env=subprocess_env(TRACKIO_DIR=str(trackio_dir)),
                          capture_output=True, text=True, check=True)
    runs, logs, config = json.loads(proc.stdout.strip().splitlines()[-1])
    history = {}
    for row in logs:
        for key, value in row.items():
            if key not in ("step", "timestamp") and isinstance(value, (int, float)):
                history.setdefault(key, {}).setdefault(row["step"], []).append(float(value))
    return [r for r in runs if r == run_name], history, {k: v for k, v in config.items() if not k.startswith("_")}


def once(history: dict[str, dict[int, list[float]]], who: str) -> dict[str, dict[int, float]]:
    for tag, steps in history.items():
        twice = {step: values for step, values in steps.items() if len(values) != 1}
        assert not twice, f"{who}: {tag} logged more than once at steps {twice}"
    return {tag: {step: values[0] for step, values in steps.items()} for tag, steps in history.items()}


def assert_same_scalars(got: dict, expected: dict, who: str, *, skip=()) -> int:
    """Same tags and steps; values as TensorBoard stores them (float32) equal to 1e-6. Returns the count."""
    import numpy as np

    tags = [tag for tag in expected if tag not in skip]
    # eval_final/*: what scripts/evaluate.py adds to the run (test_evaluate_logs_its_results_into_the_training_run)
    assert sorted(t for t in got if t not in skip and not t.startswith("eval_final/")) == sorted(tags), who
    count = 0
    for tag in tags:
        assert sorted(got[tag]) == sorted(expected[tag]), (who, tag)
        for step, value in expected[tag].items():
            mine = float(np.float32(got[tag][step]))
            assert mine == pytest.approx(float(np.float32(value)), abs=1e-6, rel=1e-6), (who, tag, step)
            count += 1
    return count


@pytest.mark.slow
def test_wandb_offline_records_every_scalar_tensorboard_does(reference, tracker_env):
    out, _ = reference
    root, _ = tracker_env
    tb = read_scalars(out / "logs")
    assert len(tb["train/loss"]) == STEPS and sorted(tb["eval/loss"]) == [2, 4]
    runs, history = read_wandb(root / "wandb-reference")
    assert len(runs) == 1 and runs[0]["name"] == "reference" and runs[0]["project"] == "dpo_core"
    assert json.loads((out / "trackers.json").read_text())["runs"]["wandb"] == runs[0]["id"]
    assert assert_same_scalars(once(history, "wandb"), tb, "wandb") > 40
    config = runs[0]["config"]
    assert config["beta"] == 0.1 and config["run_name"] == "reference" and config["max_steps"] == STEPS


@pytest.mark.slow
def test_mlflow_server_records_every_scalar_tensorboard_does(reference, tracker_env, mlflow_server):
    out, _ = reference
    root, _ = tracker_env
    tb = read_scalars(out / "logs")
    runs, history = read_mlflow(mlflow_server, "reference")
    assert len(runs) == 1 and runs[0].info.run_id == json.loads((out / "trackers.json").read_text())["runs"]["mlflow"]
    assert assert_same_scalars(once(history, "mlflow"), tb, "mlflow") > 40
    wandb_config = read_wandb(root / "wandb-reference")[0][0]["config"]
    assert runs[0].data.params == {k: str(v) for k, v in wandb_config.items()}  # the same resolved config


@pytest.mark.slow
def test_trackio_local_store_records_every_scalar_tensorboard_does(reference, tracker_env):
    out, _ = reference
    root, _ = tracker_env
    tb = read_scalars(out / "logs")
    runs, history, config = read_trackio(root / "trackio", "reference")
    assert runs == ["reference"]
    assert assert_same_scalars(once(history, "trackio"), tb, "trackio") > 40
    wandb_config = read_wandb(root / "wandb-reference")[0][0]["config"]
    # the same resolved config; trackio's `config.update` stores accelerate's `allow_val_change=True` as a key
    assert config.pop("allow_val_change", True) is True and config == wandb_config


@pytest.mark.slow
def test_a_preempted_and_resumed_run_is_one_tracker_run_with_every_step_once(
        tiny_model_dir, reference, tracker_env, mlflow_server):
    ref_out, data = reference
    root, env = tracker_env
    out = root / "resumed"
    args = run_args(tiny_model_dir, data, out, "resumed", "--log_example_ids")
    # 1. SIGUSR1 while step 2 runs: the run stops at the end of step 2 with a checkpoint (slowed from outside).
    proc = launch(args, env, PYTHONPATH=os.pathsep.join([str(ROOT / "tests" / "hooks"), os.environ.get("PYTHONPATH", "")]),
                  DPO_CORE_TEST_BATCH_SLEEP="0.5")
    ids = out / "example_ids" / "rank0.jsonl"
    deadline = time.monotonic() + 300
    while not (ids.exists() and '"step": 2,' in ids.read_text()):
        assert proc.poll() is None and time.monotonic() < deadline, "the run did not reach step 2"
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    first = finish(proc)
    assert "Stop signal received" in first
    stopped = int(complete_checkpoints(out)[-1].name.split("-")[1])
    assert 2 <= stopped < STEPS and not (out / "train_results.json").exists()
    first_ids = json.loads((out / "trackers.json").read_text())["runs"]
    # 2. The same command resumes from the checkpoint: the checkpoint's tracker ids continue the same runs.
    finish(launch(args, env))
    assert json.loads((out / "trackers.json").read_text())["runs"] == first_ids

    expected = read_scalars(ref_out / "logs")
    tb = read_scalars_as_shown(out / "logs")
    counts = {"tensorboard": assert_same_scalars(tb, expected, "tensorboard", skip=TIME_BASED)}
    runs, history = read_wandb(root / "wandb")
    # offline, each attempt writes its own run file under the SAME run id (`wandb sync` uploads both to that run)
    assert len(runs) == 2 and {r["id"] for r in runs} == {first_ids["wandb"]}
    counts["wandb"] = assert_same_scalars(once(history, "wandb"), expected, "wandb", skip=TIME_BASED)
    runs, history = read_mlflow(mlflow_server, "resumed")
    assert [r.info.run_id for r in runs] == [first_ids["mlflow"]]  # ONE run
    counts["mlflow"] = assert_same_scalars(once(history, "mlflow"), expected, "mlflow", skip=TIME_BASED)
    runs, history, _ = read_trackio(root / "trackio", "resumed")
    assert runs == ["resumed"]
    counts["trackio"] = assert_same_scalars(once(history, "trackio"), expected, "trackio", skip=TIME_BASED)
    assert min(counts.values()) > 40, counts


@pytest.mark.slow
def test_evaluate_logs_its_results_into_the_training_runs(reference, tracker_env, mlflow_server, tiny_model_dir):
    """scripts/evaluate.py --tracker_run_dir RUN: the results go into the runs RUN/trackers.json names."""
    import numpy as np

    out, data = reference
    root, env = tracker_env
    ids = json.loads((out / "trackers.json").read_text())["runs"]
    (root / "wandb-eval").mkdir()
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "evaluate.py"), "--models", f"dpo={out}",
                           "--reference_model", str(tiny_model_dir), "--dataset_name", str(data), "--eval_split",
                           "test", "--max_length", "64", "--kl_samples", "0", "--generation_prompts", "0",
                           "--output_dir", str(root / "eval"), "--tracker_run_dir", str(out),
                           "--report_to", "tensorboard", "wandb", "mlflow", "trackio"], cwd=ROOT, capture_output=True,
                          text=True, env=subprocess_env(**{**env, "WANDB_DIR": str(root / "wandb-eval")}), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    models = json.loads((root / "eval" / "results.json").read_text())["models"]
    expected = {f"eval_final/{name}/{key}": m[key] for name, m in models.items()
                for key in ("accuracy", "perplexity", "kl_token_level") if isinstance(m.get(key), float)}
    expected.update({f"eval_final/{name}/reward_margin/mean": m["reward_margin"]["mean"]
                     for name, m in models.items() if "reward_margin" in m})
    assert len(expected) >= 4 and "eval_final/dpo/accuracy" in expected

    def check(history, who):
        got = {tag: once({tag: steps}, who)[tag] if isinstance(next(iter(steps.values())), list) else steps
               for tag, steps in history.items() if tag.startswith("eval_final/")}
        got = {tag: next(iter(steps.values())) for tag, steps in got.items()}  # one step each
        for tag, value in expected.items():  # TensorBoard stores float32: both sides rounded to it
            assert float(np.float32(got[tag])) == pytest.approx(float(np.float32(value)), abs=1e-6, rel=1e-6), \
                (who, tag)

    runs, history = read_wandb(root / "wandb-eval")
    assert [r["id"] for r in runs] == [ids["wandb"]]  # the training run, continued
    check(history, "wandb")
    tables = list((root / "wandb-eval").rglob("*.table.json"))
    assert tables and "dpo" in tables[0].read_text()  # the wandb.Table
    runs, history = read_mlflow(mlflow_server, "reference")
    assert [r.info.run_id for r in runs] == [ids["mlflow"]]
    check(history, "mlflow")
    from mlflow.tracking import MlflowClient

    artifacts = [a.path for a in MlflowClient(mlflow_server).list_artifacts(ids["mlflow"], "eval_final")]
    assert artifacts == ["eval_final/results.json"]
    runs, history, _ = read_trackio(root / "trackio", "reference")
    assert runs == ["reference"]
    check(history, "trackio")
    check(read_scalars(root / "eval" / "logs"), "tensorboard")
