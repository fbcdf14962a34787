"""Rebuild the text-to-image demo's inputs (docs/assets.md): the bundled text encoder, and the
training scenes (codes and caption features) its base model is pretrained on.

    python scripts/t2i_demo_assets.py text-encoder src/ccalign/assets/fmnist_text
    python scripts/t2i_demo_assets.py scenes runs/t2i_pretrain --count 60000 --seed 0
    ccalign pretrain --config configs/fmnist_t2i_pretrain.toml
"""

from __future__ import annotations

import argparse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    encoder = sub.add_parser("text-encoder", help="the word-level T5 encoder (seeded)")
    encoder.add_argument("out")
    encoder.add_argument("--seed", type=int, default=0)
    data = sub.add_parser("scenes", help="codes and caption features of training scenes")
    data.add_argument("out")
    data.add_argument("--count", type=int, default=60000)
    data.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from ccalign.data import scenes

    if args.what == "text-encoder":
        print(scenes.build_text_encoder(args.out, seed=args.seed))
        return
    from ccalign import tokenizers
    from ccalign.data.text_encoder import TextEncoder
    from ccalign.tokenizers.slots import SlotTokenizer

    slots = SlotTokenizer(tokenizers.load("fmnist-vq"), scenes.SLOTS)
    encoder = TextEncoder(scenes.TEXT_ENCODER_PATH, length=scenes.CAPTION_TOKENS)
    print(scenes.write_training_data(args.out, slots, encoder, args.count, args.seed))


if __name__ == "__main__":
    main()
