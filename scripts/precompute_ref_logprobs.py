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

    # DeepSpeed ZeRO-3 shards the reference over the processes (FSDP likewise, with accelerate_configs/fsdp.yaml)
    accelerate launch --config_file accelerate_configs/deepspeed_zero3.yaml scripts/precompute_ref_logprobs.py \
        --model_name_or_path runs/sft --dataset_name data/prefs --eval_split test --output_dir runs/ref-cache

    # then: accelerate launch scripts/dpo.py ... --ref_logprobs runs/ref-cache   (no reference model loaded)

The reference model is --ref_model_name_or_path, else --model_name_or_path; a directory holding a LoRA
adapter is its base + that adapter (the policy a dpo.py run on it starts from, and its reference there).
With --use_lora and a plain model, the reference is the base model (a new adapter starts at zero);
--load_in_4bit / --load_in_8bit quantize it as the dpo.py run will. --seed and --ld_alpha must equal the
dpo.py run's; the cache's fingerprint names any setting that differs when dpo.py loads it. With several
processes, `<output_dir>.partials/` must be on a filesystem all of them share. With --on_invalid skip, the
skipped records are listed in `<output_dir>.invalid_records.jsonl`. --forward_mode (auto, concat, padding_free,
shared_prefix) and --logps_chunk_size change the speed and memory of the forwards, not the log-probs (equal to
float32 rounding), so they are not part of the cache's fingerprint and need not match the dpo.py run's.
For a KTO run (--loss_type kto or apo_zero_unpaired) give --kto_batch_size (its --per_device_train_batch_size):
the cache then holds each completion's and its KL completion's reference log-probs.
"""

from dpo_core.allocator import preload_allocator

preload_allocator(__name__)  # first, before torch: tcmalloc or jemalloc where installed (dpo_core/allocator.py)

from pathlib import Path

from dpo_core import data as data_lib
from dpo_core.cli import run_cli
from dpo_core.config import (
    DataArguments,
    DPOArguments,
    ModelArguments,
    PrecomputeArguments,
    TrainArguments,
    parse_config,
)
from dpo_core.distributed import main_process_first, make_accelerator, prepare_reference, shutdown
from dpo_core.errors import ConfigError
from dpo_core.kto_data import KTOTokenize
from dpo_core.layouts import resolve_forward_mode
from dpo_core.modeling import gguf_of, load_model_from_args, load_tokenizer, quantization_name
from dpo_core.ref_cache import (
    check_output_dir,
    compute_reference,
    reference_fingerprint,
    write_cache,
)


def main(argv=None):
    model_args, data_args, args = parse_config((ModelArguments, DataArguments, PrecomputeArguments), argv,
                                               description=__doc__, yaml_ignore=(DPOArguments, TrainArguments))
    accelerator = make_accelerator()
    output_dir = Path(args.output_dir)
    check_output_dir(output_dir, overwrite=args.overwrite)  # fail before hours of forwards, not after
    ref_path = model_args.reference_path()
    if not ref_path:
        raise ConfigError("--model_name_or_path (or --ref_model_name_or_path) is required")
    # The tokenizer is the policy's, as in dpo.py: the cache must hold log-probs of the very same token ids.
    tok_path = model_args.model_name_or_path or ref_path
    tokenizer = load_tokenizer(tok_path, revision=model_args.revision, trust_remote_code=model_args.trust_remote_code,
                               gguf_file=gguf_of(model_args, tok_path))
    with main_process_first(accelerator):  # the same data pipeline as scripts/dpo.py
        records, examples = data_lib.prepare_from_args(
            data_args, tokenizer, seed=args.seed,
            report_path=output_dir.with_name(output_dir.name + ".invalid_records.jsonl"),
            progress=accelerator.is_main_process,
            tokenize=KTOTokenize(args.kto_batch_size) if args.kto_batch_size else None)
    fingerprint = None
    if accelerator.is_main_process:  # hashing the weights once is enough
        fingerprint = reference_fingerprint(
            ref_model_path=ref_path, revision=model_args.revision, gguf_file=gguf_of(model_args, ref_path),
            tokenizer=tokenizer, records_by_split=records,
            examples_by_split=examples, data_args=data_args, torch_dtype=model_args.torch_dtype,
            ld_alpha=args.ld_alpha, mixed_precision=accelerator.mixed_precision, seed=args.seed,
            quantization=quantization_name(model_args))
    model = load_model_from_args(model_args, ref_path, trainable=False)
    # ZeRO-3 and FSDP shard the weights (every rank runs the same forwards); otherwise one copy per process.
    model = prepare_reference(accelerator, model, micro_batch_size=args.per_device_batch_size)
    # `auto`: the layout training would pick for this model and data, probed on the prepared model.
    forward_mode = resolve_forward_mode(args.forward_mode, model, next(iter(examples.values())),
                                        pad_token_id=tokenizer.pad_token_id, accelerator=accelerator,
                                        log=accelerator.print)

    # Repeated examples (padding of the last batches) ran in other batches: in float32 their log-probs
    # agree to ~1e-6; low precision may differ more with the padding length, and is only sanity-checked.
    exact = accelerator.mixed_precision == "no" and model_args.torch_dtype == "float32"
    results, seconds = compute_reference(
        accelerator, model, examples, output_dir.with_name(output_dir.name + ".partials"),
        atol=1e-5 if exact else 2e-2, batch_size=args.per_device_batch_size, pad_token_id=tokenizer.pad_token_id,
        ld_alpha=args.ld_alpha, forward_mode=forward_mode, chunk_size=args.logps_chunk_size)
    if accelerator.is_main_process:
        write_cache(output_dir, fingerprint, results, overwrite=args.overwrite)
        for split, split_examples in examples.items():
            n, s = len(split_examples), seconds[split]
            print(f"{split}: {n} pairs in {s:.1f} s ({n / max(s, 1e-9):.1f} pairs/s), "
                  f"num_processes={accelerator.num_processes}, mixed_precision={accelerator.mixed_precision}, "
                  f"forward_mode={forward_mode}")
        print(f"reference cache written to {output_dir}")
    accelerator.wait_for_everyone()  # if the merge failed on the main process, the launcher stops the others
    accelerator.end_training()
    shutdown(accelerator)


if __name__ == "__main__":
    run_cli(main)
