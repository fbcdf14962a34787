"""Captioned two-item Fashion-MNIST scenes: the text-to-image demo's data.

A scene is two Fashion-MNIST items side by side (28 x 56 grey) and a caption that names both and
says which stands where, in one of four phrasings ("a sneaker to the left of a bag", "a bag to
the right of a sneaker", ...). Ten ordered class pairs, five unordered pairs in both orders, are
held out of every training set, so that a model's captions for them test composition: it saw
each item on each side, never those two together.

The captions are read by a small T5 encoder built here (``build_text_encoder``: a word-level
tokenizer over the captions' 20 words, two random layers of width 64) and bundled, so the demo
needs no download; it is frozen, as LlamaGen's FLAN-T5 is, and the T2I model learns to read it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ccalign.data import fashion_mnist
from ccalign.io import PathLike
from ccalign.tokenizers.files import ASSETS
from ccalign.tokenizers.slots import SlotTokenizer

#: the ten classes as the captions name them
ITEM_NAMES = (
    "t-shirt", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
)
#: {a}: the left item, {b}: the right one, each with its article
TEMPLATES = (
    "{a} to the left of {b}",
    "{b} to the right of {a}",
    "{a} on the left and {b} on the right",
    "{b} on the right and {a} on the left",
)
CLASSES = len(ITEM_NAMES)
#: (left, right) pairs no training scene shows: {0, 5}, {1, 6}, ... in both orders
HELD_OUT = frozenset((a, (a + CLASSES // 2) % CLASSES) for a in range(CLASSES))
SLOTS = 2
CAPTION_TOKENS = 16  # the longest caption has 14 words and the end token
SPECIAL_WORDS = ("<pad>", "</s>", "<unk>")
#: the bundled text encoder (docs/assets.md)
TEXT_ENCODER_PATH = ASSETS / "fmnist_text"


def named(item: int) -> str:
    """The item with its article: "a sneaker", "an ankle boot"."""
    name = ITEM_NAMES[item]
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def caption(left: int, right: int, template: int) -> str:
    return TEMPLATES[template].format(a=named(left), b=named(right))


def vocabulary() -> list[str]:
    """The special tokens, then every word of every caption (sorted)."""
    words = {w for t in TEMPLATES for w in t.format(a="", b="").split()}
    words |= {w for item in range(CLASSES) for w in named(item).split()}
    return [*SPECIAL_WORDS, *sorted(words)]


def held_out(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """bool: which (left, right) class pairs are held out of training."""
    return np.array([(a, b) in HELD_OUT for a, b in zip(left, right, strict=True)], dtype=bool)


@dataclass(frozen=True)
class Scenes:
    """Scene i: item ``left[i]`` beside item ``right[i]`` (indices into a set of images), of
    classes ``left_class[i]`` / ``right_class[i]``, captioned with ``template[i]``."""

    left: np.ndarray
    right: np.ndarray
    left_class: np.ndarray
    right_class: np.ndarray
    template: np.ndarray

    def __len__(self) -> int:
        return len(self.left)

    def captions(self) -> list[str]:
        return [caption(a, b, t) for a, b, t in
                zip(self.left_class, self.right_class, self.template, strict=True)]

    def held_out(self) -> np.ndarray:
        return held_out(self.left_class, self.right_class)

    def images(self, items: np.ndarray) -> np.ndarray:
        """uint8 (N, 28, 56): each scene's two items side by side."""
        return np.concatenate([items[self.left], items[self.right]], axis=2)


def training_scenes(labels: np.ndarray, count: int, seed: int) -> Scenes:
    """``count`` scenes of the seen class pairs (uniform over them), random items of those
    classes among ``labels`` and random phrasings; the same for the same seed."""
    rng = np.random.default_rng(seed)
    seen = np.array([(a, b) for a in range(CLASSES) for b in range(CLASSES)
                     if (a, b) not in HELD_OUT])
    pairs = seen[rng.integers(0, len(seen), count)]
    return _placed(labels, pairs[:, 0], pairs[:, 1], rng.integers(0, len(TEMPLATES), count), rng)


def evaluation_scenes(labels: np.ndarray, count: int, seed: int) -> Scenes:
    """``count`` scenes cycling through all 100 class pairs (held-out ones included), each
    pair's phrasings in turn, with random items of those classes among ``labels``."""
    i = np.arange(count)
    pair = i % (CLASSES * CLASSES)
    template = (i // (CLASSES * CLASSES)) % len(TEMPLATES)
    rng = np.random.default_rng(seed)
    return _placed(labels, pair // CLASSES, pair % CLASSES, template, rng)


def _placed(labels, left_class, right_class, template, rng) -> Scenes:
    by_class = [np.flatnonzero(labels == c) for c in range(CLASSES)]
    missing = [ITEM_NAMES[c] for c in range(CLASSES) if len(by_class[c]) == 0]
    if missing:
        raise ValueError(f"scenes need images of every class; none of {', '.join(missing)}")

    def pick(classes: np.ndarray) -> np.ndarray:
        choice = rng.random(len(classes))
        return np.array([by_class[c][int(u * len(by_class[c]))] for c, u in
                         zip(classes, choice, strict=True)], dtype=np.int64)

    left_class, right_class = np.asarray(left_class), np.asarray(right_class)
    return Scenes(pick(left_class), pick(right_class), left_class, right_class,
                  np.asarray(template))


def slot_images(scenes: np.ndarray) -> list[np.ndarray]:
    """uint8 (N, 28, 56) scenes -> the items of each slot, left to right, (N, 28, 28) each."""
    side = fashion_mnist.SIDE
    return [scenes[..., s * side : (s + 1) * side] for s in range(SLOTS)]


def build_text_encoder(folder: PathLike, seed: int = 0, width: int = 64) -> Path:
    """Write the demo's text encoder to ``folder`` in transformers' format: a word-level
    tokenizer over :func:`vocabulary` (captions end with ``</s>``, as T5's) and a two-layer T5
    encoder of ``width`` with T5's random initialisation (seeded)."""
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    words = vocabulary()
    index = {word: i for i, word in enumerate(words)}
    tokenizer = Tokenizer(models.WordLevel(index, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", index["</s>"])]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>",
                                   eos_token="</s>", unk_token="<unk>",
                                   model_max_length=CAPTION_TOKENS)
    config = T5Config(vocab_size=len(words), d_model=width, d_kv=width // 2, d_ff=2 * width,
                      num_layers=2, num_heads=2, feed_forward_proj="gated-gelu",
                      pad_token_id=index["<pad>"], eos_token_id=index["</s>"])
    torch.manual_seed(seed)
    folder = Path(folder)
    T5EncoderModel(config).save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


def scene_codes(tokenizer: SlotTokenizer, items: np.ndarray, scenes: Scenes,
                batch: int = 2000) -> torch.Tensor:
    """The scenes' codes (N, seq_len): each item image they use coded once, then joined per
    scene (the codes ``tokenizer.encode`` gives for the composed scenes)."""
    used, where = np.unique(np.concatenate([scenes.left, scenes.right]), return_inverse=True)
    codes = fashion_mnist.encode(tokenizer.item, items[used], batch)
    rows = torch.from_numpy(where.reshape(2, -1))
    return tokenizer.join([codes[rows[0]], codes[rows[1]]])


def encode_captions(encoder, captions: list[str]):
    """A CaptionBatch of ``captions``, each distinct caption encoded once."""
    from ccalign.conditions import CaptionBatch

    distinct = sorted(set(captions))
    encoded = encoder.encode(distinct)
    where = {text: i for i, text in enumerate(distinct)}
    rows = torch.tensor([where[text] for text in captions], dtype=torch.long)
    return CaptionBatch.of(encoded.features[rows], encoded.mask[rows])


def write_training_data(folder: PathLike, tokenizer: SlotTokenizer, encoder, count: int,
                        seed: int, split: str = "train") -> dict[str, str]:
    """Codes and caption features of ``count`` training scenes of the ``split`` images in
    ``folder`` (reused when present); returns the training config's data keys for them."""
    from ccalign.data.captions import write_caption_file
    from ccalign.data.codes import write_flat_codes

    folder = Path(folder)
    codes_path = folder / f"scene_codes_{split}{count}_seed{seed}.safetensors"
    captions_path = folder / f"scene_captions_{split}{count}_seed{seed}.safetensors"
    if not (codes_path.exists() and captions_path.exists()):
        items, labels = fashion_mnist.load(split)
        scenes = training_scenes(labels, count, seed)
        codes = scene_codes(tokenizer, items, scenes)
        captions = encode_captions(encoder, scenes.captions())
        write_caption_file(captions_path, captions.features, captions.mask)
        no_labels = np.zeros(count, dtype=np.int64)  # the captions are the conditions
        write_flat_codes(codes_path, codes, no_labels, vocab_size=tokenizer.vocab_size,
                         grid=tokenizer.grid, seq_len=tokenizer.seq_len,
                         record={"scenes": count, "seed": seed, "split": split})
    return {"path": str(codes_path), "captions": str(captions_path)}
