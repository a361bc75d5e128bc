r"""Reference log-probs of every preference pair, computed once, offline, sharded over processes.

    # one process (CPU or one GPU); the same model/data/tokenization flags as the dpo.py run
    accelerate launch --config_file accelerate_configs/cpu.yaml scripts/precompute_ref_logprobs.py \
        --model_name_or_path runs/tiny-model \
        --dataset_name data/demo --eval_split test --max_length 512 --output_dir runs/ref-cache

    # two CPU processes (gloo)
    accelerate launch --config_file accelerate_configs/multi_cpu.yaml scripts/precompute_ref_logprobs.py \
        --model_name_or_path runs/tiny-model --dataset_name data/demo --eval_split test --output_dir runs/ref-cache

    # 8 GPUs, bf16 autocast (then train with the same mixed precision)
    accelerate launch --multi_gpu --num_processes 8 --mixed_precision bf16 scripts/precompute_ref_logprobs.py \
        --model_name_or_path runs/sft --dataset_name data/prefs --eval_split test --max_length 2048 \
        --torch_dtype bfloat16 --output_dir runs/ref-cache --per_device_batch_size 64

    # then: accelerate launch scripts/dpo.py ... --ref_logprobs runs/ref-cache   (no reference model loaded)

The reference model is --ref_model_name_or_path, else --model_name_or_path; a directory holding a LoRA
adapter is its base + that adapter (the policy a dpo.py run on it starts from, and its reference there).
With --use_lora and a plain model, the reference is the base model (a new adapter starts at zero);
--load_in_4bit / --load_in_8bit quantize it as the dpo.py run will. --seed and --ld_alpha must equal the
dpo.py run's; the cache's fingerprint names any setting that differs when dpo.py loads it. With several
processes, `<output_dir>.partials/` must be on a filesystem all of them share. With --on_invalid skip, the
skipped records are listed in `<output_dir>.invalid_records.jsonl`.
"""

import shutil
import time
from functools import partial
from pathlib import Path

import torch
from accelerate.utils import DistributedType
from safetensors.torch import load_file, save_file

from dpo_core import data as data_lib
from dpo_core.config import DataArguments, DPOArguments, ModelArguments, TrainArguments, parse_config, run_cli
from dpo_core.logps import FORWARDS
from dpo_core.modeling import load_model_from_args, load_tokenizer, quantization_name
from dpo_core.ref_cache import (
    PrecomputeArguments,
    check_output_dir,
    merge_partials,
    reference_fingerprint,
    write_cache,
)
from dpo_core.training import make_accelerator


@torch.no_grad()  # no_grad, not inference_mode: ZeRO-3 writes to parameters while gathering them
def forward_split(accelerator, model, examples, batch_size: int, pad_token_id: int, ld_alpha):
    """This process's share of a split: `{"ids", "chosen_logps", "rejected_logps"}` (ids may repeat)."""
    # Longest first: batches of similar lengths pad less. accelerate shards batches over processes and
    # repeats examples to give every process the same number of forwards (ZeRO-3 needs that).
    ordered = sorted(examples, key=lambda e: -(len(e.prompt_ids) + max(len(e.chosen_ids), len(e.rejected_ids))))
    loader = accelerator.prepare(torch.utils.data.DataLoader(
        data_lib.PairDataset(ordered), batch_size=batch_size, shuffle=False,
        collate_fn=partial(data_lib.collate_concat, pad_token_id=pad_token_id)))
    ids, chosen, rejected = [], [], []
    for batch in loader:
        with accelerator.autocast():
            out = FORWARDS["concat"](model, batch, ld_alpha=ld_alpha)  # the same forward as the online reference
        ids.append(batch["ids"].cpu())
        chosen.append(out.chosen_logps.float().cpu())
        rejected.append(out.rejected_logps.float().cpu())
    empty = torch.zeros(0)
    return {"ids": torch.cat(ids) if ids else empty.long(), "chosen_logps": torch.cat(chosen) if chosen else empty,
            "rejected_logps": torch.cat(rejected) if rejected else empty}


def main(argv=None):
    model_args, data_args, args = parse_config((ModelArguments, DataArguments, PrecomputeArguments), argv,
                                               description=__doc__, yaml_ignore=(DPOArguments, TrainArguments))
    accelerator = make_accelerator()
    output_dir = Path(args.output_dir)
    check_output_dir(output_dir, overwrite=args.overwrite)  # fail before hours of forwards, not after
    ref_path = model_args.ref_model_name_or_path or model_args.model_name_or_path
    if not ref_path:
        raise ValueError("--model_name_or_path (or --ref_model_name_or_path) is required")
    # The tokenizer is the policy's, as in dpo.py: the cache must hold log-probs of the very same token ids.
    tokenizer = load_tokenizer(model_args.model_name_or_path or ref_path, revision=model_args.revision,
                               trust_remote_code=model_args.trust_remote_code)
    with accelerator.main_process_first():  # the same data pipeline as scripts/dpo.py
        records, examples = data_lib.prepare_from_args(
            data_args, tokenizer, seed=args.seed,
            report_path=output_dir.with_name(output_dir.name + ".invalid_records.jsonl"))
    fingerprint = None
    if accelerator.is_main_process:  # hashing the weights once is enough
        fingerprint = reference_fingerprint(
            ref_model_path=ref_path, revision=model_args.revision, tokenizer=tokenizer, records_by_split=records,
            examples_by_split=examples, data_args=data_args, torch_dtype=model_args.torch_dtype,
            ld_alpha=args.ld_alpha, mixed_precision=accelerator.mixed_precision, seed=args.seed,
            quantization=quantization_name(model_args))
    model = load_model_from_args(model_args, ref_path, trainable=False)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        model = accelerator.prepare(model)  # ZeRO-3 shards the weights (every rank runs the same forwards)
    else:  # frozen: one full copy per process, no DDP wrapper (FSDP: the model must fit one device)
        model = accelerator.prepare_model(model, evaluation_mode=True)
    model.eval()

    partials = output_dir.with_name(output_dir.name + ".partials")  # shared by all processes
    if accelerator.is_main_process:
        shutil.rmtree(partials, ignore_errors=True)  # a crashed earlier run's leftovers
        partials.mkdir(parents=True)
    accelerator.wait_for_everyone()
    seconds = {}
    for split, split_examples in examples.items():
        start = time.perf_counter()
        part = forward_split(accelerator, model, split_examples, args.per_device_batch_size,
                             tokenizer.pad_token_id, args.ld_alpha)
        save_file(part, str(partials / f"{split}-rank{accelerator.process_index:05d}.safetensors"))
        accelerator.wait_for_everyone()
        seconds[split] = time.perf_counter() - start

    if accelerator.is_main_process:
        # Repeated examples (padding of the last batches) ran in other batches: in float32 their log-probs
        # agree to ~1e-6; low precision may differ more with the padding length, and is only sanity-checked.
        exact = accelerator.mixed_precision == "no" and model_args.torch_dtype == "float32"
        tolerance = 1e-5 if exact else 2e-2
        results = {}
        for split, split_examples in examples.items():
            parts = [load_file(str(partials / f"{split}-rank{rank:05d}.safetensors"))
                     for rank in range(accelerator.num_processes)]
            results[split] = merge_partials(parts, [e.id for e in split_examples], split=split, atol=tolerance)
        write_cache(output_dir, fingerprint, results, overwrite=args.overwrite)
        shutil.rmtree(partials, ignore_errors=True)
        for split, split_examples in examples.items():
            n, s = len(split_examples), seconds[split]
            print(f"{split}: {n} pairs in {s:.1f} s ({n / max(s, 1e-9):.1f} pairs/s), "
                  f"num_processes={accelerator.num_processes}, mixed_precision={accelerator.mixed_precision}")
        print(f"reference cache written to {output_dir}")
    accelerator.wait_for_everyone()  # if the merge failed on the main process, the launcher stops the others
    accelerator.end_training()


if __name__ == "__main__":
    run_cli(main)
