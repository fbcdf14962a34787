"""Fine-tuning a text-to-image model: CCA with rolled captions as negatives and the null caption
as the unconditional input; against a hand-written loss, through `ccalign finetune`, resumed
bit-exactly, and on two processes equal to one."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ccalign.cli import main
from ccalign.conditions import CaptionBatch
from ccalign.data.captions import CaptionedCodes, CaptionFile, write_caption_file
from ccalign.data.codes import open_codes, write_flat_codes
from ccalign.io import read_safetensors
from ccalign.models.llamagen import T2I_FAMILY, LlamaGenT2I, LlamaGenT2IConfig
from ccalign.train import TrainConfig, Trainer, run_training
from ccalign.train.distributed import keyed_row_mask
from support.numerics import assert_same_run
from support.processes import Killed, kill_after, launch
from support.tiny import capture_grads, make_config

L, C, GRID, VOCAB = 5, 8, 3, 24
TINY = dict(dim=32, n_layer=2, n_head=4, grid=GRID, vocab_size=VOCAB, caption_len=L,
            caption_dim=C, token_dropout=0.0, resid_dropout=0.0, ffn_dropout=0.0)


def tiny_t2i(seed: int = 0) -> LlamaGenT2I:
    torch.manual_seed(seed)
    model = LlamaGenT2I(LlamaGenT2IConfig(**TINY))
    torch.nn.init.normal_(model.output.weight, std=0.2)
    return model


def write_data(folder, n: int = 16) -> tuple[str, str, str]:
    """A tiny T2I init, codes of n images and one left-padded caption per image."""
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (n, GRID * GRID), generator=g)
    codes = str(folder / "codes.safetensors")
    write_flat_codes(codes, tokens, torch.zeros(n, dtype=torch.long), vocab_size=VOCAB,
                     grid=GRID)
    lengths = torch.randint(1, L + 1, (n,), generator=g)
    mask = torch.arange(L)[None, :] >= (L - lengths)[:, None]
    features = torch.randn(n, L, C, generator=g)
    captions = str(write_caption_file(folder / "captions.safetensors", features, mask))
    init = str(folder / "init.safetensors")
    T2I_FAMILY.save(tiny_t2i(), init)
    return init, codes, captions


def save_tiny_vq(path) -> None:
    """A tiny VQ (codebook VOCAB) that encodes 2 GRID-pixel images to GRID x GRID codes."""
    from ccalign import tokenizers

    torch.manual_seed(0)
    vq = tokenizers.build("VQ-16", ch=32, ch_mult=(1, 1), z_channels=32, num_res_blocks=1,
                          codebook_size=VOCAB, usage_window=0, image_size=2 * GRID).eval()
    tokenizers.save(vq, path)


def finetune_on(tmp_path, images, captions) -> int:
    """One CCA step of a tiny T2I model on ``images`` (tmp_path's VQ) and ``captions``."""
    init = str(tmp_path / "init.safetensors")
    T2I_FAMILY.save(tiny_t2i(), init)
    vq_path, caps = json.dumps(str(tmp_path / "vq.safetensors")), json.dumps(str(captions))
    return main(["finetune", "--config", "configs/tiny_cpu.toml", "--init", init, "--data",
                 str(images), "--set", f"data.tokenizer={vq_path}", "--set",
                 f"data.captions={caps}", "--set", "train.steps=1", "--out",
                 str(tmp_path / "run")])


def test_cca_gradient_with_caption_negatives_matches_a_hand_written_loss(tmp_path):
    init, codes, captions = write_data(tmp_path)
    data = CaptionedCodes(open_codes(codes), CaptionFile(captions, L, C))
    model, start = tiny_t2i(), tiny_t2i()
    config = make_config(tmp_path / "run", method={"uncond_ratio": 0.3}, train={"steps": 1},
                         optim={"grad_clip": 0.0})
    trainer = Trainer(config, model, data)
    grads = capture_grads(trainer)
    trainer.fit()

    beta, lam = 0.5, 10.0
    order = np.random.default_rng([0, 0]).permutation(16)[:8]
    null_rows = keyed_row_mask(0, 1, 8, 0.3)
    reference = copy.deepcopy(start).eval()
    total = 0.0
    for chunk in (slice(0, 4), slice(4, 8)):
        rows = order[chunk]
        tokens, conds = data.collate([data[int(i)] for i in rows])
        null = null_rows[chunk]
        rolled = [1, 2, 3, 0]
        pos = CaptionBatch(conds.features, conds.mask, null)
        # a null row's negative is its positive: the null caption under the row's own mask
        neg_mask = torch.where(null[:, None], conds.mask, conds.mask[rolled])
        neg = CaptionBatch(conds.features[rolled], neg_mask, null)
        is_pos = null
        with torch.no_grad():
            ref_pos, ref_neg = reference(pos, tokens), reference(neg, tokens)
        d_pos, d_neg = start(pos, tokens) - ref_pos, start(neg, tokens) - ref_neg
        weight = torch.where(is_pos, 1.0, lam)
        sign = torch.where(is_pos, 1.0, -1.0)
        per_row = -F.logsigmoid(beta * d_pos) - weight * F.logsigmoid(sign * beta * d_neg)
        total = total + per_row.mean() / lam / 2
    total.backward()
    assert null_rows.any() and not null_rows.all()
    for name, param in start.named_parameters():
        scale = param.grad.abs().max().item() + 1e-12
        torch.testing.assert_close(grads[0][name], param.grad, rtol=1e-4, atol=1e-5 * scale)


def t2i_config(out, init, codes, captions, short=None, **train) -> TrainConfig:
    return TrainConfig.from_dict({
        "model": {"init": init},
        "data": {"path": codes, "captions": captions, "short_captions": short},
        "method": {"name": "cca", "beta": 0.5, "lam": 10.0, "uncond_ratio": 0.3},
        "optim": {"lr": 1e-3, "grad_clip": 0.5},
        "train": {"global_batch": 8, "micro_batch": 4, "steps": 3, "device": "cpu",
                  "precision": "fp32", "progress": False, **train},
        "checkpoint": {"out": str(out), "every": 1, "keep": 3},
    })


@pytest.mark.slow
def test_finetune_with_captions_runs_and_resumes_bit_exact(tmp_path, capsys):
    init, codes, captions = write_data(tmp_path)
    assert main(["finetune", "--config", "configs/tiny_cpu.toml", "--init", init, "--data",
                 codes, "--set", f"data.captions={json.dumps(captions)}", "--out",
                 str(tmp_path / "cli"), "--set", "train.steps=2"]) == 0
    tuned = T2I_FAMILY.load(_spec(tmp_path / "cli" / "final.safetensors"))
    assert isinstance(tuned, LlamaGenT2I)
    short = str(write_caption_file(tmp_path / "short.safetensors",
                                   torch.randn(16, L, C), torch.ones(16, L, dtype=torch.bool)))
    run_training(t2i_config(tmp_path / "straight", init, codes, captions, short))
    broken = t2i_config(tmp_path / "broken", init, codes, captions, short)
    with pytest.raises(Killed):
        run_training(broken, callbacks=[kill_after(2)])
    run_training(broken, resume=True)
    a, b = (read_safetensors(tmp_path / r / "final.safetensors") for r in ("straight", "broken"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert main(["finetune", "--config", "configs/tiny_cpu.toml", "--init", init, "--data",
                 codes, "--out", str(tmp_path / "nocap")]) == 1
    assert "set data.captions" in capsys.readouterr().err


def _spec(path):
    from ccalign.models.family import ModelSpec

    return ModelSpec(init=str(path))


@pytest.mark.numerics
@pytest.mark.slow
def test_two_processes_match_one_with_captions(tmp_path):
    init, codes, captions = write_data(tmp_path, n=24)
    run_training(t2i_config(tmp_path / "single", init, codes, captions, weights_dtype="fp64"))
    launch(t2i_config(tmp_path / "multi", init, codes, captions, weights_dtype="fp64",
                      parallel="ddp"))
    single, multi = (read_safetensors(tmp_path / r / "final.safetensors")
                     for r in ("single", "multi"))
    assert_same_run(single, multi)


@pytest.mark.slow
def test_llamagen_t2i_lists_with_t5_feature_folders_train(tmp_path):
    """LlamaGen's T2I data: .jsonl lists naming images (encoded on the fly) and one .npy of
    real-token features per line under <features>/<list>/<line>.npy."""
    from PIL import Image

    from ccalign.data.captions import CaptionFolder

    save_tiny_vq(tmp_path / "vq.safetensors")
    rng = np.random.default_rng(0)
    (tmp_path / "lists").mkdir()
    lines, counts = [], [1, 3, 5, 7, 2, 4, 6, 5]  # 7 > L: cut to the first L, as LlamaGen does
    for i, n in enumerate(counts):
        image = tmp_path / "images" / f"{i}.png"
        image.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (2 * GRID, 2 * GRID, 3), dtype=np.uint8)).save(image)
        lines.append(json.dumps({"image_path": str(image), "caption": f"caption {i}"}))
        feature = tmp_path / "t5" / "part0" / f"{i}.npy"
        feature.parent.mkdir(parents=True, exist_ok=True)
        np.save(feature, rng.normal(size=(1, n, C)).astype(np.float32))
    (tmp_path / "lists" / "part0.jsonl").write_text("\n".join(lines))
    folder = CaptionFolder(tmp_path / "t5", [("part0", i) for i in range(8)], L, C)
    batch = folder.batch([1, 3])
    first = np.load(tmp_path / "t5" / "part0" / "1.npy")[0]
    np.testing.assert_array_equal(batch.features[0, L - 3 :].numpy(), first)
    assert batch.mask[0].tolist() == [False, False, True, True, True] and batch.mask[1].all()
    np.testing.assert_array_equal(batch.features[1].numpy(),
                                  np.load(tmp_path / "t5" / "part0" / "3.npy")[0, :L])
    assert finetune_on(tmp_path, tmp_path / "lists", tmp_path / "t5") == 0
    assert (tmp_path / "run" / "final.safetensors").exists()


@pytest.mark.slow
def test_an_image_folder_with_caption_sidecars_trains(tmp_path, capsys):
    """encode-captions reads photo.txt beside photo.png in the order training reads the images,
    so the caption file's row i is image i of the folder."""
    from PIL import Image

    from ccalign.data.images import list_image_folder
    from support.text import save_tiny_text_encoder

    save_tiny_vq(tmp_path / "vq.safetensors")
    rng = np.random.default_rng(0)
    words = ["a red shirt", "a boot", "a bag on the left of a sneaker", "the shirt"]
    for i in range(8):
        image = tmp_path / "images" / f"class{i % 2}" / f"{i}.png"
        image.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (2 * GRID, 2 * GRID, 3), dtype=np.uint8)).save(image)
        image.with_suffix(".txt").write_text(words[i % 4])
    t5 = str(save_tiny_text_encoder(tmp_path / "t5", C))
    assert main(["encode-captions", str(tmp_path / "images"), "--out",
                 str(tmp_path / "caps.safetensors"), "--text-encoder", t5, "--length", str(L),
                 "--device", "cpu", "--quiet"]) == 0
    order = [Path(p).stem for p, _ in list_image_folder(tmp_path / "images").samples]
    from ccalign.data.text_encoder import TextEncoder

    expected = TextEncoder(t5, length=L).encode([words[int(s) % 4] for s in order])
    got = CaptionFile(tmp_path / "caps.safetensors", L, C).batch(range(8))
    torch.testing.assert_close(got.features, expected.features)
    assert finetune_on(tmp_path, tmp_path / "images", tmp_path / "caps.safetensors") == 0
    (tmp_path / "images" / "class0" / "0.txt").unlink()
    assert main(["encode-captions", str(tmp_path / "images"), "--out",
                 str(tmp_path / "again.safetensors"), "--text-encoder", t5, "--quiet"]) == 1
    assert "0.png has no caption beside it (0.txt)" in capsys.readouterr().err


@pytest.mark.slow
def test_webdataset_shards_are_read_by_index_and_train(tmp_path):
    """Tar shards in WebDataset's layout (<key>.png beside <key>.txt): the captions encoded in
    the order training reads the images, each image read back exactly."""
    import io
    import tarfile

    from PIL import Image

    from ccalign.data.images import ShardSource, open_source
    from support.text import save_tiny_text_encoder

    save_tiny_vq(tmp_path / "vq.safetensors")
    rng = np.random.default_rng(0)
    (tmp_path / "shards").mkdir()
    pixels, texts = [], ["a red shirt", "a boot", "a bag", "the sneaker on the left"]
    for shard in range(2):
        with tarfile.open(tmp_path / "shards" / f"{shard:05d}.tar", "w") as tar:
            for i in range(4):
                array = rng.integers(0, 256, (2 * GRID, 2 * GRID, 3), dtype=np.uint8)
                pixels.append(array)
                png = io.BytesIO()
                Image.fromarray(array).save(png, format="PNG")
                for name, data in ((f"{shard}/s{i:03d}.png", png.getvalue()),
                                   (f"{shard}/s{i:03d}.txt", texts[i].encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    source = open_source(str(tmp_path / "shards"))
    assert isinstance(source, ShardSource) and len(source.items) == 8
    assert source.captions == texts + texts
    for index in (0, 5):
        np.testing.assert_array_equal(np.asarray(source.image(index, "RGB")), pixels[index])
    t5 = str(save_tiny_text_encoder(tmp_path / "t5", C))
    assert main(["encode-captions", str(tmp_path / "shards"), "--out",
                 str(tmp_path / "caps.safetensors"), "--text-encoder", t5, "--length", str(L),
                 "--device", "cpu", "--quiet"]) == 0
    assert finetune_on(tmp_path, tmp_path / "shards", tmp_path / "caps.safetensors") == 0


def test_short_captions_are_a_keyed_share_of_the_items(tmp_path):
    """LlamaGen's T2I training takes the short caption for 30% of the items: here a draw per
    (seed, epoch, item), so the same epoch takes the same ones, another epoch others."""
    init, codes, captions = write_data(tmp_path, n=200)
    long = CaptionFile(captions, L, C)
    g = torch.Generator().manual_seed(9)
    mask = torch.ones(200, L, dtype=torch.bool)
    short_path = write_caption_file(tmp_path / "short.safetensors",
                                    torch.randn(200, L, C, generator=g), mask)
    data = CaptionedCodes(open_codes(codes), long, CaptionFile(short_path, L, C), 0.3, seed=4)
    taken = [data.takes_short(i) for i in range(200)]
    assert 0.2 < np.mean(taken) < 0.4 and taken == [data.takes_short(i) for i in range(200)]
    _, conds = data.collate(data.__getitems__(list(range(200))))
    for i in (taken.index(True), taken.index(False)):
        source = CaptionFile(short_path if taken[i] else captions, L, C).batch([i])
        assert torch.equal(conds.features[i], source.features[0])
    data.set_epoch(1)
    assert [data.takes_short(i) for i in range(200)] != taken
