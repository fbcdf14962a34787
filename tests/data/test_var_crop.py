"""VAR's training view: short side to 1.125x the size (LANCZOS), a random crop, keyed by seed."""

import numpy as np
import pytest
import torch
from PIL import Image

from ccalign import tokenizers
from ccalign.cli import main
from ccalign.data.codes import open_codes
from ccalign.data.encoded import EncodedImages
from ccalign.data.images import var_crop, views

SIZE = 28


def ramp(width: int, height: int) -> Image.Image:
    """A float image whose value is the column index: a resize maps it linearly."""
    return Image.fromarray(np.tile(np.arange(width, dtype=np.float32), (height, 1)), mode="F")


@pytest.mark.parametrize(("width", "height"), [(400, 300), (300, 400), (256, 256)])
def test_crop_shows_the_image_at_vars_scale_at_the_drawn_offset(width, height):
    """The crop's columns are the original's at scale short / round(1.125 size), shifted by the
    drawn left offset (a LANCZOS resize of a linear ramp is the ramp, away from the borders)."""
    size = 256
    mid = round(1.125 * size)
    assert mid == 288
    scale = min(width, height) / mid
    seed = 7
    crop = var_crop(ramp(width, height), size, np.random.default_rng(seed))
    assert crop.shape == (size, size)
    rng = np.random.default_rng(seed)
    long = int(mid * max(width, height) / min(width, height))
    rows, cols = (long, mid) if width <= height else (mid, long)
    top, left = int(rng.integers(0, rows - size + 1)), int(rng.integers(0, cols - size + 1))
    assert 0 <= top <= rows - size and 0 <= left <= cols - size
    inner = slice(8, size - 8)  # away from the image's own borders (LANCZOS's edge effects)
    j = np.arange(size)[inner]
    expected = (left + j + 0.5) * (width / cols) - 0.5  # pixel centres through the resize
    assert np.allclose(crop[size // 2, inner], expected, atol=0.05)
    assert width / cols == pytest.approx(scale, rel=0.01)  # objects 1.125x the centre crop's


def test_offsets_are_keyed_and_cover_every_position():
    image = ramp(40, 32)  # mid = 32 on the short side: long side 40, crop 28
    lefts = set()
    for seed in range(200):
        a = var_crop(image, SIZE, np.random.default_rng([seed, 3]))
        b = var_crop(image, SIZE, np.random.default_rng([seed, 3]))
        assert np.array_equal(a, b)
        lefts.add(round(float(a[SIZE // 2, SIZE // 2]) - SIZE // 2))
    assert len(lefts) >= 12  # 13 possible left offsets (40 - 28 + 1), drawn uniformly
    with pytest.raises(ValueError, match="pass rng"):
        views(image, SIZE, "var-crop")


def test_extraction_and_on_the_fly_use_vars_view(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "img" / "a").mkdir(parents=True)
    for k in range(3):
        pixels = rng.integers(0, 256, size=(40, 52), dtype=np.uint8)
        Image.fromarray(pixels, mode="L").save(tmp_path / "img" / "a" / f"{k}.png")
    torch.manual_seed(0)
    tokenizer = tokenizers.build("small", codebook_size=64).eval()
    tokenizers.save(tokenizer, tmp_path / "tok.safetensors")
    tok = str(tmp_path / "tok.safetensors")
    base = ["extract-codes", str(tmp_path / "img"), "--tokenizer", tok, "--views", "var-crop"]
    for seed in (0, 1):
        flat = str(tmp_path / f"s{seed}.safetensors")
        assert main([*base, "--workers", "0", "--seed", str(seed), "--flat", flat]) == 0
    first, second = (open_codes(tmp_path / f"s{s}.safetensors") for s in (0, 1))
    assert first.codes.shape[:2] == (3, 1)
    assert not torch.equal(first.codes, second.codes)  # the crops moved with the seed

    def expected(seed_key) -> torch.Tensor:
        image = Image.open(tmp_path / "img" / "a" / "0.png")
        crop = var_crop(image, SIZE, np.random.default_rng(seed_key))
        x = torch.from_numpy(crop.astype(np.float32))[None, None] / 127.5 - 1
        with torch.no_grad():
            return tokenizer.encode(x)[0]

    assert torch.equal(first.codes[0, 0].long(), expected([0, 0]))  # (seed, image index)
    data = EncodedImages(tmp_path / "img", tmp_path / "tok.safetensors", views="var-crop", seed=4)
    epochs = []
    for epoch in (0, 1):
        data.set_epoch(epoch)
        epochs.append(data[0][0])
        assert torch.equal(epochs[-1], expected([4, epoch, 0]))  # (seed, epoch, index)
    assert not torch.equal(*epochs)
