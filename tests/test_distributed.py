"""Real multi-process runs of the scripts under the shipped accelerate configs, on CPU with gloo:
DDP (multi_cpu.yaml), DeepSpeed ZeRO-2 and ZeRO-3 (deepspeed_zero2/3.yaml with --num_processes 2
--mixed_precision no), and two emulated machines on one host. Every YAML is parsed by accelerate.

The training runs use the online reference model (ZeRO-3 shards it) and a NaN loss on rank 0 at step 2,
so the equivalences also cover the non-finite guard: DDP skips the step in `apply_update`, DeepSpeed
inside its own step, and both must leave the same weights. All runs are shared between the tests (one
module fixture); the first DeepSpeed run compiles DeepSpeed's CPU communication op (~60 s, once per machine).
"""

import json
import math
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from helpers import ROOT, free_port, load_weights, read_scalars, results, small_dataset, subprocess_env
from safetensors.torch import load_file

CONFIGS = ROOT / "accelerate_configs"
STEPS = 4
NAN_STEP = 2  # rank 0's loss is NaN at this step in every training run: the step must be skipped everywhere

# scripts/dpo.py with dpo_loss wrapped so that rank 0's losses of the NAN_STEP-th call are NaN.
NAN_WRAPPER = f"""
import os, runpy, sys
from dpo_core import dpo
real, calls = dpo.dpo_loss, []

def dpo_loss(*args, **kwargs):
    losses, chosen, rejected = real(*args, **kwargs)
    calls.append(1)
    if len(calls) == {NAN_STEP} and os.environ.get("RANK", "0") == "0" and not os.environ.get("NO_NAN"):
        losses = losses * float("nan")
    return losses, chosen, rejected

dpo.dpo_loss = dpo_loss
sys.argv[0] = {str(ROOT / "scripts" / "dpo.py")!r}
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def deepspeed_missing() -> str | None:
    try:
        import deepspeed  # noqa: F401
    except Exception as e:  # ImportError, or a broken build
        return f"deepspeed cannot be imported ({type(e).__name__}: {e})"
    return None


def launch(config: str, script, args, *, launch_args=(), env=None, check=True, background=False):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / config),
           *launch_args, str(script), *map(str, args)]
    if "--main_process_port" not in launch_args:
        cmd[5:5] = ["--main_process_port", str(free_port())]
    kwargs = dict(cwd=ROOT, env=env or subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if background:
        return subprocess.Popen(cmd, **kwargs)
    start = time.perf_counter()
    proc = subprocess.run(cmd, timeout=600, **kwargs)
    print(f"{config} {Path(args[args.index('--output_dir') + 1]).name}: {time.perf_counter() - start:.1f} s")
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-6000:]}")
    return proc


DEEPSPEED_2 = ("--num_processes", "2", "--mixed_precision", "no")  # the GPU YAMLs, on 2 CPU processes


def train_args(model, data, out, *extra):
    return ["--model_name_or_path", model, "--dataset_name", data, "--output_dir", out, "--max_length", "64",
            "--learning_rate", "5e-3", "--logging_steps", "1", "--seed", "3", "--max_steps", STEPS,
            "--per_device_train_batch_size", "2", "--max_grad_norm", "0.5", *extra]


def precompute_args(model, data, out):
    return [ROOT / "scripts" / "precompute_ref_logprobs.py", "--model_name_or_path", model, "--dataset_name", data,
            "--eval_split", "test", "--max_length", "64", "--per_device_batch_size", "3", "--output_dir", out]


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    """Every run once: {name: output dir}; with the launch outputs under `name + "_log"`."""
    reason = deepspeed_missing()
    if reason:
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("distributed")
    data = small_dataset(root / "data", n_train=16, n_test=7)
    wrapper = root / "dpo_nan.py"
    wrapper.write_text(NAN_WRAPPER)
    out = {name: root / name for name in ("ddp", "zero2", "zero3", "zero3_resumed", "machines")}
    logs = {}
    logs["ddp"] = launch("multi_cpu.yaml", wrapper, train_args(tiny_model_dir, data, out["ddp"]))
    logs["zero2"] = launch("deepspeed_zero2.yaml", wrapper, train_args(tiny_model_dir, data, out["zero2"]),
                           launch_args=DEEPSPEED_2)
    logs["zero3"] = launch("deepspeed_zero3.yaml", wrapper,
                           train_args(tiny_model_dir, data, out["zero3"], "--save_steps", "2"), launch_args=DEEPSPEED_2)
    # The same command again from the step-2 checkpoint, in a fresh directory (the NaN step lies before it).
    logs["zero3_resumed"] = launch(
        "deepspeed_zero3.yaml", wrapper, train_args(tiny_model_dir, data, out["zero3_resumed"],
                                                    "--resume_from_checkpoint",
                                                    out["zero3"] / "checkpoints" / "checkpoint-2"),
        launch_args=DEEPSPEED_2, env=subprocess_env(NO_NAN="1"))
    # Two "machines" on one host, one process each, started together (static rendezvous: any order).
    port = free_port()
    machines = [launch("multi_cpu.yaml", wrapper, train_args(tiny_model_dir, data, out["machines"]), background=True,
                       launch_args=("--num_machines", "2", "--num_processes", "2", "--machine_rank", str(rank),
                                    "--main_process_ip", "127.0.0.1", "--main_process_port", str(port)))
                for rank in (0, 1)]
    for rank, proc in enumerate(machines):
        stdout, stderr = proc.communicate(timeout=600)
        logs[f"machine{rank}"] = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    for name in ("cache_1", "cache_zero2", "cache_zero3"):
        out[name] = root / name
    one = subprocess.run([sys.executable, *map(str, precompute_args(tiny_model_dir, data, out["cache_1"]))],
                         cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-4000:]
    logs["cache_1"] = one
    for stage in ("zero2", "zero3"):
        script, *args = precompute_args(tiny_model_dir, data, out[f"cache_{stage}"])
        logs[f"cache_{stage}"] = launch(f"deepspeed_{stage}.yaml", script, args, launch_args=DEEPSPEED_2)
    return {"out": out, "logs": logs, "model": Path(tiny_model_dir)}


def losses(run_dir) -> dict[int, float]:
    return read_scalars(Path(run_dir) / "logs")["train/loss"]


def assert_same_losses(got: dict, want: dict, atol: float) -> float:
    """Same steps, same values (NaN where NaN); returns the largest difference."""
    assert sorted(got) == sorted(want) and len(want) == STEPS
    worst = 0.0
    for step, value in want.items():
        if math.isnan(value):
            assert math.isnan(got[step]), step
            continue
        worst = max(worst, abs(got[step] - value))
    assert worst <= atol, (worst, got, want)
    return worst


def max_weight_diff(a_dir, b_dir) -> float:
    a, b = load_weights(a_dir), load_weights(b_dir)
    assert sorted(a) == sorted(b)
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


# ------------------------------------------------------------------------------------------ the configs
# Every YAML in the folder, found by globbing: a new config is tested without editing this file, and its
# expectations (backend, DeepSpeed stage and offload, FSDP settings) come from the file's own content.
ALL_CONFIGS = sorted(CONFIGS.glob("*.yaml"))


def check_config(path: Path, monkeypatch) -> None:
    """accelerate's own path (`accelerate launch`'s `launch_command`): the YAML loader (unknown top-level keys
    are errors), every nested key a real launch option, the launcher's environment, and the DeepSpeed/FSDP
    plugin that the training processes build from that environment; each checked against the file's content."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import launch as launch_utils

    name = path.name
    raw = yaml.safe_load(path.read_text())
    assert isinstance(raw, dict), f"{name}: not a YAML mapping"
    backend = raw.get("distributed_type", "NO")
    options = {o.lstrip("-") for a in launch_command_parser()._actions for o in a.option_strings}
    for section in ("deepspeed_config", "fsdp_config"):
        for key in raw.get(section) or {}:
            assert key in options, f"{name}: {section}.{key} is not an accelerate option"
    # A section for another backend would be silently ignored by accelerate.
    assert bool(raw.get("deepspeed_config")) == (backend == "DEEPSPEED"), f"{name}: deepspeed_config vs {backend}"
    assert bool(raw.get("fsdp_config")) == (backend == "FSDP"), f"{name}: fsdp_config vs {backend}"
    args = launch_command_parser().parse_args(["--config_file", str(path), "x.py"])
    args, config, mp_from_config = _validate_launch_command(args)  # accelerate's config loader
    assert config.distributed_type == backend, name
    assert config.mixed_precision == raw.get("mixed_precision", "no"), name
    assert bool(config.use_cpu) == bool(raw.get("use_cpu", False)), name
    if config.use_cpu:
        assert config.mixed_precision == "no", f"{name}: CPU configs run in fp32"
    assert bool(args.use_deepspeed) == (backend == "DEEPSPEED") and bool(args.use_fsdp) == (backend == "FSDP"), name
    if args.use_deepspeed:
        pytest.importorskip("deepspeed", reason="deepspeed cannot be imported")
        from accelerate.utils import DeepSpeedPlugin

        want = raw["deepspeed_config"]
        args.deepspeed_fields_from_accelerate_config = ",".join([*config.deepspeed_config, "mixed_precision"])
        _, env = launch_utils.prepare_deepspeed_cmd_env(args)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        ds = DeepSpeedPlugin().deepspeed_config
        zero = ds["zero_optimization"]
        if "zero_stage" in want:
            assert zero["stage"] == want["zero_stage"], name
        assert ds["train_micro_batch_size_per_gpu"] == "auto"  # filled from the prepared dataloader
        assert ds["gradient_clipping"] == "auto"  # filled from --max_grad_norm (configure_deepspeed)
        if zero["stage"] == 3:  # without it the final save_pretrained fails
            assert want.get("zero3_save_16bit_model") is True, f"{name}: ZeRO-3 without zero3_save_16bit_model"
            assert zero["stage3_gather_16bit_weights_on_model_save"] is True
        for kind in ("optimizer", "param"):
            assert zero[f"offload_{kind}"]["device"] == want.get(f"offload_{kind}_device", "none"), (name, kind)
    elif args.use_fsdp:
        from accelerate.utils import FullyShardedDataParallelPlugin

        want = raw["fsdp_config"]
        env = launch_utils.prepare_multi_gpu_env(args)  # refuses cpu_ram_efficient_loading without sync
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        plugin = FullyShardedDataParallelPlugin()
        assert plugin.fsdp_version == want.get("fsdp_version", 1), name
        if "fsdp_reshard_after_forward" in want:
            assert plugin.reshard_after_forward == want["fsdp_reshard_after_forward"], name
        assert bool(plugin.cpu_ram_efficient_loading) == bool(want.get("fsdp_cpu_ram_efficient_loading")), name
        if "fsdp_state_dict_type" in want:
            assert plugin.state_dict_type.name == want["fsdp_state_dict_type"], name
        if want.get("fsdp_auto_wrap_policy") == "TRANSFORMER_BASED_WRAP":
            classes = want.get("fsdp_transformer_layer_cls_to_wrap")  # None: the model's _no_split_modules
            assert plugin.transformer_cls_names_to_wrap == (classes.split(",") if classes else None), name
            assert "transformer_auto_wrap_policy" in getattr(plugin.auto_wrap_policy, "__name__", ""), name


def test_the_config_folder_holds_only_yaml_configs():
    """The glob below misses nothing: every file of accelerate_configs/ is a *.yaml config."""
    assert ALL_CONFIGS, "no accelerate config found"
    assert sorted(p for p in CONFIGS.iterdir() if p.is_file()) == ALL_CONFIGS


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=lambda p: p.name)
def test_config_is_parsed_by_accelerate_and_builds_its_plugin(path, monkeypatch):
    check_config(path, monkeypatch)


def test_a_config_accelerate_cannot_parse_fails(tmp_path, monkeypatch):
    """The check above fails on a YAML that accelerate's loader refuses (an unknown top-level key)."""
    bad = tmp_path / "bad.yaml"
    bad.write_text((CONFIGS / "cpu.yaml").read_text() + "not_an_accelerate_key: 1\n")
    with pytest.raises(ValueError, match="not_an_accelerate_key"):
        check_config(bad, monkeypatch)


def test_deepspeed_clipping_comes_from_max_grad_norm():
    from dpo_core.distributed import configure_deepspeed

    def accelerator(config):
        return SimpleNamespace(distributed_type="DEEPSPEED",
                               state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(deepspeed_config=config)))

    for config in ({"gradient_clipping": "auto"}, {}):  # "auto" (the YAMLs), or a JSON without the key
        configure_deepspeed(accelerator(config), max_grad_norm=0.5)
        assert config["gradient_clipping"] == 0.5
    configure_deepspeed(accelerator({"gradient_clipping": 0.5}), max_grad_norm=0.5)
    with pytest.raises(ValueError, match=r"gradient_clipping=1.0 but --max_grad_norm is 0.5"):
        configure_deepspeed(accelerator({"gradient_clipping": 1.0}), max_grad_norm=0.5)


# ----------------------------------------------------------------------------------------- real runs
@pytest.mark.slow
def test_every_run_used_two_processes_and_its_backend(runs):
    expected = {"ddp": "MULTI_CPU", "zero2": "DEEPSPEED", "zero3": "DEEPSPEED", "zero3_resumed": "DEEPSPEED",
                "machines": "MULTI_CPU"}
    for name, backend in expected.items():
        final = results(runs["out"][name])
        assert final["num_processes"] == 2 and final["distributed_type"] == backend, (name, final)
        assert final["global_step"] == STEPS
    for name in ("ddp", "zero2", "zero3"):
        assert results(runs["out"][name])["skipped_steps"] == 1, name  # rank 0's NaN skipped on both ranks
    assert "num_processes 2 (DistributedType.DEEPSPEED)" in runs["logs"]["zero3"].stdout
    for stage in ("zero2", "zero3"):
        assert "num_processes=2" in runs["logs"][f"cache_{stage}"].stdout
    for name, proc in runs["logs"].items():  # teardown was clean everywhere (dpo_core.distributed.shutdown)
        assert proc.returncode == 0 and "terminate called" not in proc.stderr, name


@pytest.mark.slow
def test_zero2_equals_ddp(runs):
    out = runs["out"]
    loss_diff = assert_same_losses(losses(out["zero2"]), losses(out["ddp"]), atol=1e-6)
    weight_diff = max_weight_diff(out["zero2"], out["ddp"])
    print(f"ZeRO-2 vs DDP: max |loss diff| {loss_diff:.3g}, max |weight diff| {weight_diff:.3g}")
    # Not bitwise: DeepSpeed averages gradients in a reduce-scatter, DDP in an all-reduce (measured 3.8e-7).
    assert weight_diff <= 2e-6
    assert max_weight_diff(out["ddp"], runs["model"]) > 1e-3  # training moved the weights
    # DeepSpeed clips inside its step, to --max_grad_norm 0.5 (configure_deepspeed): the clipping acted
    # (norms above 0.5), and the norm it reports is DDP's; the skipped step logs none in either.
    norms = {name: read_scalars(out[name] / "logs")["train/grad_norm"] for name in ("ddp", "zero2", "zero3")}
    assert sorted(norms["ddp"]) == [s for s in range(1, STEPS + 1) if s != NAN_STEP]
    assert max(norms["ddp"].values()) > 0.5
    for name in ("zero2", "zero3"):
        assert sorted(norms[name]) == sorted(norms["ddp"])
        for step, value in norms["ddp"].items():
            assert norms[name][step] == pytest.approx(value, rel=1e-5), (name, step)


@pytest.mark.slow
def test_zero3_equals_ddp_and_saves_a_loadable_full_model(runs):
    from transformers import AutoModelForCausalLM

    out = runs["out"]
    loss_diff = assert_same_losses(losses(out["zero3"]), losses(out["ddp"]), atol=1e-5)
    weight_diff = max_weight_diff(out["zero3"], out["ddp"])
    print(f"ZeRO-3 vs DDP: max |loss diff| {loss_diff:.3g}, max |weight diff| {weight_diff:.3g}")
    # ZeRO-3 also gathers/partitions the weights in other orders; Adam's 1/sqrt(v) amplifies the float32
    # differences for parameters with near-zero gradients (rare tokens' embeddings): measured 1.5e-5.
    assert weight_diff <= 1e-4
    model = AutoModelForCausalLM.from_pretrained(out["zero3"])  # full weights, not ZeRO-3 shards
    ddp = load_weights(out["ddp"])
    for name, param in model.state_dict().items():
        if name in ddp:
            assert param.shape == ddp[name].shape, name


@pytest.mark.slow
def test_zero3_resume_gives_the_uninterrupted_run(runs):
    out = runs["out"]
    assert "Resumed from" in runs["logs"]["zero3_resumed"].stdout
    full, resumed = losses(out["zero3"]), losses(out["zero3_resumed"])
    assert sorted(resumed) == [3, 4]
    for step in resumed:
        assert resumed[step] == pytest.approx(full[step], abs=1e-6)
    weight_diff = max_weight_diff(out["zero3_resumed"], out["zero3"])
    print(f"ZeRO-3 resumed vs uninterrupted: max |weight diff| {weight_diff:.3g}")
    assert weight_diff <= 1e-6
    ckpt = out["zero3"] / "checkpoints" / "checkpoint-2"
    assert (ckpt / "COMPLETE").exists() and list(ckpt.rglob("*optim_states*"))  # DeepSpeed's sharded states


@pytest.mark.slow
def test_two_emulated_machines_equal_one_two_process_run(runs):
    for rank in (0, 1):
        proc = runs["logs"][f"machine{rank}"]
        assert proc.returncode == 0, f"machine {rank} failed:\n{proc.stderr[-4000:]}"
    out = runs["out"]
    assert "num_processes 2" in runs["logs"]["machine0"].stdout
    assert_same_losses(losses(out["machines"]), losses(out["ddp"]), atol=0)
    assert max_weight_diff(out["machines"], out["ddp"]) == 0


@pytest.mark.slow
def test_precompute_under_zero2_and_zero3_equals_one_process(runs):
    one = runs["out"]["cache_1"]
    for stage in ("zero2", "zero3"):
        cache = runs["out"][f"cache_{stage}"]
        manifest, manifest_one = (json.loads((c / "manifest.json").read_text()) for c in (cache, one))
        assert manifest["fingerprint"] == manifest_one["fingerprint"]
        worst = 0.0
        for split in ("train", "eval"):
            a, b = load_file(str(cache / f"{split}.safetensors")), load_file(str(one / f"{split}.safetensors"))
            assert torch.equal(a["ids"], b["ids"]) and a["ids"].numel() == (16 if split == "train" else 7)
            for key in ("chosen_logps", "rejected_logps"):
                worst = max(worst, (a[key] - b[key]).abs().max().item())
        print(f"precompute {stage} (2 processes) vs 1 process: max |logp diff| {worst:.3g}")
        assert worst <= 1e-5  # float32 batching noise at most (measured: 0, the same batches)


FSDP2_WORKER = """
import json, sys
from types import SimpleNamespace

import torch
import torch.distributed as dist
from accelerate.utils import FullyShardedDataParallelPlugin
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule
from transformers import AutoModelForCausalLM

from dpo_core.distributed import prepare_reference

dist.init_process_group("gloo")
rank = dist.get_rank()
model_dir, out = sys.argv[1], sys.argv[2]
plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                        reshard_after_forward=True, cpu_ram_efficient_loading=True,
                                        sync_module_states=True)
# The fields of an Accelerator that the FSDP2 path reads (accelerate's FSDP Accelerator needs GPUs).
accelerator = SimpleNamespace(distributed_type="FSDP", state=SimpleNamespace(fsdp_plugin=plugin),
                              device=torch.device("cpu"), mixed_precision="no", is_main_process=rank == 0)
full = AutoModelForCausalLM.from_pretrained(model_dir)
ref = AutoModelForCausalLM.from_pretrained(model_dir)
if rank != 0:  # fsdp_cpu_ram_efficient_loading: only rank 0 read the weights
    with torch.no_grad():
        for p in ref.parameters():
            p.zero_()
ref = prepare_reference(accelerator, ref, micro_batch_size=2)
result = {"training": ref.training, "layers_sharded": all(isinstance(m, FSDPModule) for m in ref.model.layers),
          "local_params": sum(p.to_local().numel() for p in ref.parameters()),  # before a forward unshards the root
          "total_params": sum(p.numel() for p in full.parameters())}
ids = torch.randint(0, full.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    result["logit_diff"] = (ref(input_ids=ids).logits - full(input_ids=ids).logits).abs().max().item()
# What save_final gets from accelerator.get_state_dict under FSDP2: the full weights, on rank 0.
gathered = get_model_state_dict(ref, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
if rank == 0:
    result["state_dict_diff"] = max((gathered[k] - v).abs().max().item() for k, v in full.state_dict().items())
json.dump(result, open(f"{out}/rank{rank}.json", "w"))
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_fsdp2_reference_is_sharded_per_layer_and_filled_from_rank0(tiny_model_dir, tmp_path):
    """dpo_core's FSDP2 reference path with plain torch FSDP2 on 2 CPU processes (gloo): per-layer shards,
    rank 1's empty weights filled from rank 0, the same logits as the unsharded model, a full state dict."""
    worker = tmp_path / "worker.py"
    worker.write_text(FSDP2_WORKER)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(free_port()), str(worker), str(tiny_model_dir), str(tmp_path)],
                          cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for result in ranks:
        assert result["layers_sharded"] and not result["training"]
        assert result["logit_diff"] <= 1e-6
        assert result["local_params"] < 0.6 * result["total_params"]  # about half of the weights per rank
    assert sum(r["local_params"] for r in ranks) == ranks[0]["total_params"]
    assert ranks[0]["state_dict_diff"] == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="accelerate's FSDP needs CUDA GPUs (none here)")
def test_fsdp_online_reference_and_full_save_on_gpu(tiny_model_dir, tmp_path):
    """fsdp.yaml for real: the online reference sharded like the policy, a sharded checkpoint, a full final model."""
    from transformers import AutoModelForCausalLM

    n = min(torch.cuda.device_count(), 2)
    data = small_dataset(tmp_path / "data", n_train=16, n_test=4)
    out = tmp_path / "fsdp"
    launch("fsdp.yaml", ROOT / "scripts" / "dpo.py",
           train_args(tiny_model_dir, data, out, "--save_steps", "2"), launch_args=("--num_processes", str(n)))
    final = results(out)
    assert final["distributed_type"] == "FSDP" and final["num_processes"] == n
    assert (out / "checkpoints" / "checkpoint-2" / "COMPLETE").exists()
    AutoModelForCausalLM.from_pretrained(out)
    assert max_weight_diff(out, tiny_model_dir) > 0


@pytest.mark.slow
def test_bad_data_in_a_two_process_run_is_the_same_one_line_error_on_every_rank(tiny_model_dir, tmp_path):
    """Rank 0 prepares the data while rank 1 waits; when rank 0 finds bad records, rank 1 is let go, reads the same
    problems from the store and raises the same error: no rank is left at a barrier whose peer is gone."""
    from helpers import run_script

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": "word " * 200, "chosen": f"Yes {i}.", "rejected": f"No {i}."}) + "\n"
                            for i in range(8)))
    proc = run_script("dpo.py", ["--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(data),
                                 "--max_length", "64", "--max_steps", "1", "--output_dir", str(tmp_path / "run"),
                                 "--data_cache_dir", str(tmp_path / "store"), "--report_to", "none"],
                      processes=2, check=False, timeout=300)
    assert proc.returncode != 0
    assert proc.stderr.count("error: 8 invalid record(s)") == 2, proc.stderr[-4000:]
    assert f"{data}, line 8, field 'prompt'" in proc.stderr
    assert "Connection closed by peer" not in proc.stderr  # rank 1 was not left waiting for rank 0
    assert "[rank0]: Traceback" not in proc.stderr and "[rank1]: Traceback" not in proc.stderr
