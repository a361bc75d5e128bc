"""Builds the embedded tiny demo model (Llama architecture, random weights) and its tokenizer, offline.

    python scripts/build_tiny_model.py runs/tiny-model
    python scripts/build_tiny_model.py runs/tiny-model --seed 1 --hidden_size 128 --num_layers 4

Deterministic for a seed; takes a few seconds. Load it like any model: `--model_name_or_path runs/tiny-model`.
"""

import argparse

from dpo_core.demo import build_tiny_model


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir", help="Where to save the model and tokenizer.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the random initialisation.")
    parser.add_argument("--hidden_size", type=int, default=64, help="Hidden size (heads: 4, KV heads: 2).")
    parser.add_argument("--num_layers", type=int, default=2, help="Decoder layers.")
    args = parser.parse_args(argv)
    path = build_tiny_model(args.output_dir, seed=args.seed, hidden_size=args.hidden_size,
                            num_layers=args.num_layers)
    print(f"tiny model and tokenizer saved to {path}")


if __name__ == "__main__":
    main()
