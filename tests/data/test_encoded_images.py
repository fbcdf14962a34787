"""Training from images encoded on the fly: items, views, labels, model checks and the CLI."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ccalign import tokenizers
from ccalign.cli import main
from ccalign.data.codes import open_codes, validate_codes
from ccalign.data.encoded import EncodedImages
from ccalign.models import llamagen
from ccalign.train.config import TrainConfig
from support import REPO

VOCAB, GRID, SIDE = 64, 7, 28
COUNTS = {"ant": 3, "bee": 3, "cat": 2}  # images per class folder; labels follow sorted names



def tiny_tokenizer() -> tokenizers.VQModel:
    torch.manual_seed(0)
    return tokenizers.build("small", codebook_size=VOCAB).eval()


def write_folder(root: Path, shape: tuple[int, int] = (SIDE, SIDE)) -> list[np.ndarray]:
    """Random grey PNGs under root/<class>/; returns their pixels in ImageFolder order."""
    rng = np.random.default_rng(3)
    pixels = []
    for name, count in COUNTS.items():
        (root / name).mkdir(parents=True)
        for k in range(count):
            arr = rng.integers(0, 256, size=shape, dtype=np.uint8)
            Image.fromarray(arr, mode="L").save(root / name / f"{k}.png")
            pixels.append(arr)
    return pixels


def expected_labels() -> list[int]:
    return [label for label, count in enumerate(COUNTS.values()) for _ in range(count)]


def reference_encode(tokenizer, pixels: list[np.ndarray]) -> torch.Tensor:
    """One batch encode of uint8 (H, W) images mapped to [-1, 1] by hand, in float32."""
    x = torch.from_numpy(np.stack(pixels)).to(torch.float32)[:, None] / 255.0
    with torch.no_grad():
        return tokenizer.encode((x - 0.5) / 0.5)


def test_items_equal_one_batch_encode_of_the_images_and_labels_follow_folders(tmp_path):
    pixels = write_folder(tmp_path / "img")
    tokenizer = tiny_tokenizer()
    data = EncodedImages(tmp_path / "img", tokenizer)
    expected = reference_encode(tokenizer, pixels)
    assert len(torch.unique(expected)) > 5  # the comparison below is not between constants
    assert (len(data), data.seq_len, data.vocab_size, data.num_views) == (8, GRID**2, VOCAB, 1)
    batch = data.__getitems__(list(range(len(data))))
    assert torch.equal(torch.stack([codes for codes, _ in batch]), expected)
    for i in range(len(data)):
        codes, label = data[i]
        assert codes.dtype == torch.int64 and not codes.is_inference()
        assert torch.equal(codes, expected[i]) and int(label) == expected_labels()[i]
    assert data.all_labels().tolist() == expected_labels()
    assert data.classes == list(COUNTS)


def test_flip_views_are_keyed_by_seed_epoch_index_and_encode_the_mirror(tmp_path):
    pixels = write_folder(tmp_path / "img")
    tokenizer = tiny_tokenizer()
    plain = reference_encode(tokenizer, pixels)
    mirrored = reference_encode(tokenizer, [p[:, ::-1].copy() for p in pixels])
    assert not torch.equal(plain, mirrored)
    seen = set()
    for seed in (0, 5):
        data = EncodedImages(tmp_path / "img", tokenizer, views="flip", seed=seed)
        for epoch in (0, 1, 2):
            data.set_epoch(epoch)
            for i in range(len(data)):
                view = int(np.random.default_rng([seed, epoch, i]).integers(2))
                seen.add(view)
                want = mirrored[i] if view else plain[i]
                assert torch.equal(data[i][0], want), (seed, epoch, i)
    assert seen == {0, 1}
    again = EncodedImages(tmp_path / "img", tokenizer, views="flip", seed=5)
    again.set_epoch(2)
    data.set_epoch(2)
    assert all(torch.equal(again[i][0], data[i][0]) for i in range(len(data)))


def test_views_match_what_extract_codes_writes_for_larger_images(tmp_path):
    write_folder(tmp_path / "img", shape=(37, 45))  # centre crop + resize to 28 matter here
    tokenizer = tiny_tokenizer()
    tokenizers.save(tokenizer, tmp_path / "tok.safetensors")
    flat = tmp_path / "codes.safetensors"
    args = [
        "extract-codes",
        str(tmp_path / "img"),
        "--tokenizer",
        str(tmp_path / "tok.safetensors"),
    ]
    assert main([*args, "--flat", str(flat), "--views", "flip", "--workers", "0"]) == 0
    extracted = open_codes(flat)
    data = EncodedImages(tmp_path / "img", tmp_path / "tok.safetensors", views="flip", seed=1)
    for epoch in (0, 1):
        data.set_epoch(epoch)
        for i in range(len(data)):
            codes, label = data[i]
            assert torch.equal(codes, extracted.codes[i, data.view_index(i)].long())
            assert int(label) == int(extracted.labels[i])


def test_token_range_is_the_codebook_and_encodes_nothing(tmp_path):
    write_folder(tmp_path / "img")
    tokenizer = tiny_tokenizer()
    data = EncodedImages(tmp_path / "img", tokenizer)

    def refuse(images):
        raise AssertionError("token_range / validate_codes must not encode images")

    tokenizer.encode = refuse
    assert data.token_range() == (0, VOCAB - 1)
    validate_codes(data, num_classes=3, vocab_size=VOCAB, seq_len=GRID**2)
    with pytest.raises(ValueError, match=r"labels span \[0, 2\] but the model has 2 classes"):
        validate_codes(data, num_classes=2, vocab_size=VOCAB, seq_len=GRID**2)


def test_bad_views_image_only_keys_and_unreadable_images_are_refused(tmp_path):
    write_folder(tmp_path / "img")
    with pytest.raises(ValueError, match="unknown view mode 'mirror'"):
        EncodedImages(tmp_path / "img", tiny_tokenizer(), views="mirror")
    with pytest.raises(ValueError, match=r"data.views = 'mirror' is not one of"):
        TrainConfig.from_dict({"data": {"tokenizer": "fmnist-vq", "views": "mirror"}})
    with pytest.raises(ValueError, match="set data.tokenizer"):
        TrainConfig.from_dict({"data": {"views": "flip"}})
    (tmp_path / "img" / "bee" / "9.png").write_bytes(b"not a png")
    data = EncodedImages(tmp_path / "img", tiny_tokenizer())
    with pytest.raises(ValueError, match=r"cannot read training image .*bee/9.png"):
        data[6]
    config = TrainConfig.from_dict({"data": {"tokenizer": "fmnist-vq", "views": "flip"}})
    assert (config.data.tokenizer, config.data.views) == ("fmnist-vq", "flip")


def tiny_model(grid: int = GRID, vocab: int = VOCAB) -> llamagen.LlamaGen:
    torch.manual_seed(1)
    model = llamagen.build(
        "custom", grid=grid, dim=32, n_layer=2, n_head=4, vocab_size=vocab, num_classes=3
    )
    torch.nn.init.normal_(model.output.weight, std=0.2)
    return model


def finetune_args(tmp_path: Path, init: Path, *extra: str) -> list[str]:
    tokenizers.save(tiny_tokenizer(), tmp_path / "tok.safetensors")
    return [
        "finetune",
        "--config",
        str(REPO / "configs" / "tiny_cpu.toml"),
        "--init",
        str(init),
        "--data",
        str(tmp_path / "img"),
        "--tokenizer",
        str(tmp_path / "tok.safetensors"),
        "--out",
        str(tmp_path / "run"),
        *extra,
    ]


def test_cli_finetune_trains_from_images_encoded_on_the_fly_with_or_without_workers(tmp_path):
    write_folder(tmp_path / "img")
    init = tmp_path / "init.safetensors"
    llamagen.save(tiny_model(), init)
    args = finetune_args(tmp_path, init, "--steps", "2", "--set", 'data.views="flip"')
    finals, losses = [], []
    for workers in (0, 2):  # encoding in worker processes must give the very same run
        out = tmp_path / f"run{workers}"
        assert main([*args, "--out", str(out), "--set", f"data.num_workers={workers}"]) == 0
        finals.append(llamagen.load(out / "final.safetensors").state_dict())
        records = (out / "metrics.jsonl").read_text().splitlines()
        losses.append([json.loads(line)["loss"] for line in records])
    start = llamagen.load(init).state_dict()
    assert any(not torch.equal(finals[0][k], start[k]) for k in start)
    assert losses[0] == losses[1] and len(losses[0]) == 2
    assert all(torch.equal(finals[0][k], finals[1][k]) for k in start)


@pytest.mark.parametrize(
    "grid, vocab, message",
    [
        (4, VOCAB, "a 7x7 grid (49 tokens) but the model's grid is 4x4"),
        (GRID, 32, "tokenizer with 64 codes but the model's vocab is 32"),
    ],
)
def test_cli_refuses_a_tokenizer_that_does_not_fit_the_model(
    tmp_path, capsys, grid, vocab, message
):
    write_folder(tmp_path / "img")
    init = tmp_path / "init.safetensors"
    llamagen.save(tiny_model(grid, vocab), init)
    assert main(finetune_args(tmp_path, init)) == 1
    assert message in capsys.readouterr().err


def test_an_image_folder_without_images_is_named(tmp_path):
    (tmp_path / "img").mkdir()
    with pytest.raises(ValueError, match=r"img has no class sub-folders"):
        EncodedImages(tmp_path / "img", tiny_tokenizer())
    (tmp_path / "img" / "ant").mkdir()
    (tmp_path / "img" / "ant" / "notes.txt").write_text("no image here")
    with pytest.raises(ValueError, match=r"img holds no images with extensions"):
        EncodedImages(tmp_path / "img", tiny_tokenizer())
