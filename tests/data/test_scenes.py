"""Captioned two-item scenes: the held-out pairs stay out of training, the captions say what
stands where in words the bundled encoder knows, and the written data are the scenes' own
codes and captions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ccalign import tokenizers
from ccalign.data import fashion_mnist, scenes
from ccalign.data.captions import CaptionFile
from ccalign.data.codes import open_codes
from ccalign.data.text_encoder import TextEncoder
from ccalign.tokenizers.slots import SlotTokenizer


@pytest.fixture(scope="module")
def encoder():
    return TextEncoder(scenes.TEXT_ENCODER_PATH, length=scenes.CAPTION_TOKENS)


def test_held_out_pairs_are_five_pairs_in_both_orders_never_trained_on():
    assert len(scenes.HELD_OUT) == 10
    assert all((b, a) in scenes.HELD_OUT and a != b for a, b in scenes.HELD_OUT)
    assert {a for a, _ in scenes.HELD_OUT} == set(range(10))  # every item on each side
    _, labels = fashion_mnist.load("train")
    trained = scenes.training_scenes(labels, 5000, seed=3)
    assert not trained.held_out().any()
    pairs = set(zip(trained.left_class.tolist(), trained.right_class.tolist(), strict=True))
    assert len(pairs) == 90  # every other pair is seen
    assert (labels[trained.left] == trained.left_class).all()
    assert (labels[trained.right] == trained.right_class).all()
    again = scenes.training_scenes(labels, 5000, seed=3)
    assert np.array_equal(trained.left, again.left) and np.array_equal(trained.template,
                                                                        again.template)


def test_evaluation_cycles_every_pair_and_phrasing():
    _, labels = fashion_mnist.load("test")
    planned = scenes.evaluation_scenes(labels, 800, seed=0)
    pairs = list(zip(planned.left_class.tolist(), planned.right_class.tolist(), strict=True))
    assert pairs[:100] == [(a, b) for a in range(10) for b in range(10)]
    assert planned.held_out().sum() == 80
    assert np.array_equal(np.bincount(planned.template), [200] * 4)


def test_captions_name_both_items_in_their_places():
    assert scenes.caption(7, 8, 0) == "a sneaker to the left of a bag"
    assert scenes.caption(7, 8, 1) == "a bag to the right of a sneaker"
    assert scenes.caption(9, 0, 2) == "an ankle boot on the left and a t-shirt on the right"
    assert scenes.caption(9, 0, 3) == "a t-shirt on the right and an ankle boot on the left"


def test_the_bundled_encoder_knows_every_word(encoder):
    everything = [scenes.caption(a, b, t) for a in range(10) for b in range(10) for t in range(4)]
    ids = encoder.tokenizer(everything, padding=True)["input_ids"]
    unknown = encoder.tokenizer.convert_tokens_to_ids("<unk>")
    assert not any(unknown in row for row in ids)
    longest = max(len([i for i in row if i != encoder.tokenizer.pad_token_id]) for row in ids)
    assert longest <= scenes.CAPTION_TOKENS
    batch = encoder.encode(everything[:3])
    assert batch.features.shape == (3, scenes.CAPTION_TOKENS, 64)
    # left-padded; "a t-shirt to the left of a t-shirt": 8 words + </s>
    assert batch.mask[0].tolist() == [False] * 7 + [True] * 9


def test_written_training_data_are_the_scenes_codes_and_captions(tmp_path, encoder):
    slots = SlotTokenizer(tokenizers.load("fmnist-vq"), scenes.SLOTS)
    data = scenes.write_training_data(tmp_path, slots, encoder, 40, seed=5)
    items, labels = fashion_mnist.load("train")
    planned = scenes.training_scenes(labels, 40, seed=5)
    pixels = torch.from_numpy(planned.images(items)).float()[:, None] / 127.5 - 1
    codes = open_codes(data["path"])
    assert len(codes) == 40
    stored = torch.stack([codes[i][0].view(-1) for i in range(40)]).long()
    assert torch.equal(stored, slots.encode(pixels))
    captions = CaptionFile(data["captions"], scenes.CAPTION_TOKENS, 64).batch(torch.arange(40))
    expected = encoder.encode(planned.captions())
    torch.testing.assert_close(captions.features, expected.features, rtol=0, atol=1e-6)
    assert torch.equal(captions.mask, expected.mask)
    assert scenes.write_training_data(tmp_path, slots, encoder, 40, seed=5) == data  # reused


def test_the_rebuilt_text_encoder_has_the_bundled_ones_vocabulary_and_architecture(tmp_path):
    """scripts/t2i_demo_assets.py's builder (its weights depend on transformers' T5 init, so
    only the transformers version that wrote the bundle reproduces them bit for bit)."""
    import json

    from transformers import AutoTokenizer

    built = scenes.build_text_encoder(tmp_path / "enc")
    keys = ("d_model", "d_kv", "d_ff", "num_layers", "num_heads", "vocab_size",
            "feed_forward_proj", "pad_token_id", "eos_token_id")
    ours, bundled = (json.loads((f / "config.json").read_text())
                     for f in (built, scenes.TEXT_ENCODER_PATH))
    assert {k: ours[k] for k in keys} == {k: bundled[k] for k in keys}
    assert AutoTokenizer.from_pretrained(built).get_vocab() == \
        AutoTokenizer.from_pretrained(scenes.TEXT_ENCODER_PATH).get_vocab()
