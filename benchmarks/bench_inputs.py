"""The benchmark's inputs: a random Llama-shaped model with a word-level tokenizer (word `w<i>` is token id i,
so both tools see the identical token ids) and seeded synthetic preference pairs."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import torch

from dpo_core.config import BenchmarkArguments

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
N_SPECIAL = 3  # ids 0, 1, 2: pad, eos, unk; synthetic words are "w<id>" for ids 3..vocab_size-1


def build_model_and_tokenizer(output_dir: Path, args: BenchmarkArguments) -> Path:
    """A random Llama (float32, safetensors) and a word-level tokenizer: word `w<i>` <-> token id i."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    model = None
    if args.model_name_or_path:  # a real checkpoint's weights and shape; the ids stay synthetic
        from transformers import AutoModelForCausalLM

        from dpo_core.modeling import _serializable, split_gguf

        directory, gguf_file = split_gguf(args.model_name_or_path)
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file, dtype=torch.float32)
        _serializable(model)
        args.vocab_size = model.config.vocab_size
        model.config.pad_token_id, model.config.eos_token_id, model.config.bos_token_id = 0, 1, None
    vocab = {PAD: 0, EOS: 1, UNK: 2, **{f"w{i}": i for i in range(N_SPECIAL, args.vocab_size)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=PAD, eos_token=EOS, unk_token=UNK,
                                        model_max_length=args.max_length)
    if model is not None:
        model.generation_config.pad_token_id = model.generation_config.eos_token_id = None
        model.save_pretrained(output_dir, safe_serialization=True)
        tokenizer.save_pretrained(output_dir)
        return output_dir
    config = LlamaConfig(vocab_size=args.vocab_size, hidden_size=args.hidden_size,
                         intermediate_size=args.intermediate_size, num_hidden_layers=args.num_layers,
                         num_attention_heads=args.num_heads, num_key_value_heads=args.num_kv_heads,
                         max_position_embeddings=max(512, args.max_length), pad_token_id=0, eos_token_id=1,
                         bos_token_id=None, tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        model = LlamaForCausalLM(config)
    model.save_pretrained(output_dir, safe_serialization=True)
    tokenizer.save_pretrained(output_dir)
    return output_dir


def synthetic_pairs(args: BenchmarkArguments) -> list[dict[str, list[int]]]:
    """Seeded random token ids: `{"prompt_ids", "chosen_ids", "rejected_ids"}` (completions end with EOS)."""
    rng = random.Random(args.seed)

    def ids(lo, hi):
        return [rng.randrange(N_SPECIAL, args.vocab_size) for _ in range(rng.randint(lo, hi))]

    pairs = []
    for _ in range(args.num_pairs):
        prompt = ids(*args.prompt_lengths)
        chosen, rejected = ids(*args.completion_lengths), ids(*args.completion_lengths)
        while rejected == chosen:
            rejected = ids(*args.completion_lengths)
        pairs.append({"prompt_ids": prompt, "chosen_ids": chosen + [1], "rejected_ids": rejected + [1]})
    return pairs


def write_dataset(pairs: list[dict], data_dir: Path) -> Path:
    """`train.jsonl` of standard text records that the word-level tokenizer maps back to exactly the ids
    (EOS left out of the text: both tools append it)."""
    def text(ids):
        return " ".join(f"w{i}" for i in ids)

    data_dir.mkdir(parents=True, exist_ok=True)
    with open(data_dir / "train.jsonl", "w") as f:
        for p in pairs:
            f.write(json.dumps({"prompt": text(p["prompt_ids"]), "chosen": " " + text(p["chosen_ids"][:-1]),
                                "rejected": " " + text(p["rejected_ids"][:-1])}) + "\n")
    return data_dir


def token_hash(rows) -> str:
    """sha256 over (prompt, chosen, rejected) ids of every pair, in order."""
    digest = hashlib.sha256()
    for prompt, chosen, rejected in rows:
        digest.update(json.dumps([list(map(int, prompt)), list(map(int, chosen)), list(map(int, rejected))])
                      .encode())
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------- workers
