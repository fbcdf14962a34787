"""Scenes of items side by side: raster codes made of each item's own codes, decoded back."""

from __future__ import annotations

import pytest
import torch

from ccalign import tokenizers
from ccalign.data import fashion_mnist
from ccalign.tokenizers.slots import SlotTokenizer


@pytest.fixture(scope="module")
def items():
    images, _ = fashion_mnist.load("test")
    return torch.from_numpy(images[:6]).float()[:, None] / 127.5 - 1


def test_scene_codes_are_the_items_codes_row_by_row(items):
    item = tokenizers.load("fmnist-vq")
    slots = SlotTokenizer(item, 3)
    left, middle, right = items[:2], items[2:4], items[4:6]
    codes = slots.encode(torch.cat([left, middle, right], dim=-1))
    assert codes.shape == (2, 7 * 21) and slots.seq_len == 147 and slots.width == 21
    own = [item.encode(x).view(2, 7, 7) for x in (left, middle, right)]
    scene = codes.view(2, 7, 21)
    for r in range(7):
        for c in range(21):
            assert torch.equal(scene[:, r, c], own[c // 7][:, r, c % 7])


def test_decoding_cuts_the_rows_back_into_items(items):
    item = tokenizers.load("fmnist-vq")
    slots = SlotTokenizer(item, 2)
    left, right = items[:3], items[3:6]
    codes = slots.encode(torch.cat([left, right], dim=-1))
    with torch.no_grad():
        scenes = slots.decode(codes)
        assert scenes.shape == (3, 1, 28, 56)
        assert torch.equal(scenes[..., :28], item.decode(item.encode(left)))
        assert torch.equal(scenes[..., 28:], item.decode(item.encode(right)))


def test_wrong_shapes_are_refused(items):
    slots = SlotTokenizer(tokenizers.load("fmnist-vq"), 2)
    with pytest.raises(ValueError, match="28 x 56 pixels"):
        slots.encode(items)
    with pytest.raises(ValueError, match="98 per image"):
        slots.decode(torch.zeros(1, 49, dtype=torch.long))
    with pytest.raises(ValueError, match="2 slots, got codes of 1"):
        slots.join([torch.zeros(1, 49, dtype=torch.long)])
