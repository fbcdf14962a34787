"""Sharded sampling runs and the `ccalign sample` command: files, seeds, resume, ranks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats

import ccalign.tokenizers
from ccalign.cli import main
from ccalign.commands.sample import parse_classes
from ccalign.models import llamagen
from ccalign.sample import RunConfig, Sampler, image_grid, plan_labels, run_sampling, sample_grid
from ccalign.sample.runner import shard_seed, weights_fingerprint
from ccalign.tokenizers.base import ImageTokenizer
from support.tiny import random_model


class CodebookTokenizer:
    """Each code is a fixed random 2x2 RGB patch; decode tiles the patches (grid 4 -> 8x8 px)."""

    vocab_size, grid, image_size, channels = 64, 4, 8, 3

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.patches = torch.rand(self.vocab_size, 3, 2, 2, generator=g) * 2 - 1

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        b = codes.shape[0]
        p = self.patches[codes].view(b, self.grid, self.grid, 3, 2, 2)
        return p.permute(0, 3, 1, 4, 2, 5).reshape(b, 3, self.image_size, self.image_size)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        b = images.shape[0]
        p = images.view(b, 3, self.grid, 2, self.grid, 2).permute(0, 2, 4, 1, 3, 5)
        flat = p.reshape(b * self.grid**2, -1)
        return torch.cdist(flat, self.patches.view(self.vocab_size, -1)).argmin(1).view(b, -1)


def tiny_model(seed: int = 0) -> llamagen.LlamaGen:
    return random_model(seed, dim=32, n_layer=1, n_head=2, num_classes=5)


def config(**changes) -> RunConfig:
    fields = dict(
        labels=plan_labels(5, per_class=2), batch_size=3, seed=7, sampling={"cfg_scale": 2.0}
    )
    fields.update(changes)
    return RunConfig(**fields)


def test_tokenizer_fixture_satisfies_protocol():
    tok = CodebookTokenizer()
    assert isinstance(tok, ImageTokenizer)
    codes = torch.randint(0, 64, (3, 16))
    assert torch.equal(tok.encode(tok.decode(codes)), codes)


def test_plan_labels_and_class_parsing():
    assert plan_labels(4, per_class=2) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert plan_labels(4, classes=[3, 1], per_class=2) == [3, 3, 1, 1]
    assert plan_labels(4, num_samples=6) == [0, 1, 2, 3, 0, 1]
    assert plan_labels(4, classes=[2], num_samples=3) == [2, 2, 2]
    assert plan_labels(4, classes=[1, 2]) == [1, 2]
    assert parse_classes("1,5,7-9") == [1, 5, 7, 8, 9]
    with pytest.raises(ValueError, match="classes must be in"):
        plan_labels(4, classes=[4], per_class=1)
    with pytest.raises(ValueError, match="say what to sample"):
        plan_labels(4)
    with pytest.raises(ValueError, match="not both"):
        plan_labels(4, per_class=1, num_samples=2)
    with pytest.raises(ValueError, match="expected indices"):
        parse_classes("a-b")


def test_random_labels_are_uniform_reproducible_and_seeded_apart_from_the_shards():
    labels = plan_labels(10, num_samples=20000, mode="random", seed=3)
    assert labels == plan_labels(10, num_samples=20000, mode="random", seed=3)
    assert labels != plan_labels(10, num_samples=20000, mode="random", seed=4)
    counts = np.bincount(labels, minlength=10)
    assert stats.chisquare(counts).pvalue > 1e-3 and counts.sum() == 20000
    subset = plan_labels(10, classes=[7, 2], num_samples=500, mode="random", seed=3)
    assert set(subset) == {2, 7}
    # not the balanced order, and not drawn from a shard's stream
    assert labels[:10] != list(range(10))
    shard0 = np.random.default_rng(shard_seed(3, 0)).integers(0, 10, size=10).tolist()
    assert labels[:10] != shard0
    with pytest.raises(ValueError, match="--labels random draws every label at random: give"):
        plan_labels(10, per_class=5, mode="random")
    with pytest.raises(ValueError, match="--num-samples"):
        plan_labels(10, classes=[1, 2], mode="random")
    with pytest.raises(ValueError, match="choose one of balanced, random"):
        plan_labels(10, num_samples=5, mode="uniform")


def test_random_labels_give_the_same_run_on_two_ranks_and_after_a_kill(tmp_path):
    labels = plan_labels(5, num_samples=10, mode="random", seed=7)
    single = run_sampling(Sampler(tiny_model()), config(labels=labels), tmp_path / "one",
                          progress=False)
    assert np.load(single.tokens)["labels"].tolist() == labels

    def killed(shard):
        raise KeyboardInterrupt  # rank 0 dies after its first shard

    folder = tmp_path / "two"
    with pytest.raises(KeyboardInterrupt):
        run_sampling(Sampler(tiny_model()), config(labels=labels), folder, rank=0, world_size=2,
                     progress=False, on_shard_done=killed)
    labels_again = plan_labels(5, num_samples=10, mode="random", seed=7)  # a new process
    assert run_sampling(Sampler(tiny_model()), config(labels=labels_again), folder, rank=1,
                        world_size=2, progress=False) is None
    both = run_sampling(Sampler(tiny_model()), config(labels=labels_again), folder, rank=0,
                        world_size=2, progress=False)
    assert both.shards_sampled == 1  # rank 0's second shard; its first survived the kill
    assert both.tokens.read_bytes() == single.tokens.read_bytes()


def test_run_writes_tokens_pngs_and_adm_npz(tmp_path):
    sampler, tok, cfg = Sampler(tiny_model()), CodebookTokenizer(), config()
    out = run_sampling(sampler, cfg, tmp_path, tokenizer=tok, progress=False)
    tokens = np.load(out.tokens)
    assert tokens["tokens"].shape == (10, 16)
    assert tokens["labels"].tolist() == cfg.labels
    # shard i is exactly Sampler.generate with the shard's own seed
    for shard in range(4):
        g = torch.Generator().manual_seed(shard_seed(7, shard))
        want = sampler.generate(cfg.shard_labels(shard), generator=g, cfg_scale=2.0)
        assert np.array_equal(tokens["tokens"][3 * shard : 3 * shard + 3], want.numpy())
    samples = np.load(out.samples)
    arr = samples["arr_0"]
    assert arr.dtype == np.uint8 and arr.shape == (10, 8, 8, 3)
    decoded = tok.decode(torch.from_numpy(tokens["tokens"]))
    want = torch.clamp(127.5 * decoded + 128, 0, 255).permute(0, 2, 3, 1).to(torch.uint8)
    assert np.array_equal(arr, want.numpy())
    assert samples["labels"].tolist() == cfg.labels
    pngs = sorted(out.images.glob("*.png"))
    assert len(pngs) == 10
    assert np.array_equal(np.asarray(Image.open(pngs[4])), arr[4])


def test_resize_and_shard_seeds_are_distinct(tmp_path):
    out = run_sampling(
        Sampler(tiny_model()), config(resize=6), tmp_path, tokenizer=CodebookTokenizer(),
        write_png=False, progress=False,
    )
    assert np.load(out.samples)["arr_0"].shape == (10, 6, 6, 3)
    assert out.images is None
    assert len({shard_seed(7, s) for s in range(1000)} | {shard_seed(8, 0)}) == 1001


def test_resume_after_kill_gives_identical_files(tmp_path):
    tok = CodebookTokenizer()
    whole = run_sampling(
        Sampler(tiny_model()), config(), tmp_path / "a", tokenizer=tok, progress=False
    )

    def killed(shard):
        if shard == 1:
            raise KeyboardInterrupt  # the process dies after its second shard
    with pytest.raises(KeyboardInterrupt):
        run_sampling(
            Sampler(tiny_model()), config(), tmp_path / "b", tokenizer=tok, progress=False,
            on_shard_done=killed,
        )
    assert not (tmp_path / "b" / "samples.npz").exists()
    (tmp_path / "b" / "shards" / ".000002.npz.abc.tmp").write_bytes(b"half a file")
    done = []
    resumed = run_sampling(
        Sampler(tiny_model()), config(), tmp_path / "b", tokenizer=tok, progress=False,
        on_shard_done=done.append,
    )
    assert done == [2, 3]  # finished shards were not redone
    assert resumed.tokens.read_bytes() == whole.tokens.read_bytes()
    assert resumed.samples.read_bytes() == whole.samples.read_bytes()


def test_two_ranks_give_the_single_process_result(tmp_path):
    single = run_sampling(Sampler(tiny_model()), config(), tmp_path / "one", progress=False)
    folder = tmp_path / "two"
    with pytest.raises(RuntimeError, match="2 shard\\(s\\) missing"):
        run_sampling(Sampler(tiny_model()), config(), folder, rank=0, world_size=2, progress=False)
    assert sorted(p.name for p in (folder / "shards").iterdir()) == ["000000.npz", "000002.npz"]
    assert run_sampling(Sampler(tiny_model()), config(), folder, rank=1, world_size=2) is None
    both = run_sampling(Sampler(tiny_model()), config(), folder, rank=0, world_size=2)
    assert both.shards_sampled == 0
    assert both.tokens.read_bytes() == single.tokens.read_bytes()


def test_resume_with_other_settings_is_refused(tmp_path):
    run_sampling(Sampler(tiny_model()), config(), tmp_path, progress=False)
    with pytest.raises(ValueError, match="different settings \\(sampling, seed\\)"):
        run_sampling(
            Sampler(tiny_model()), config(seed=8, sampling={}), tmp_path, progress=False
        )
    with pytest.raises(ValueError, match="resize must be >= 1 pixel"):
        run_sampling(Sampler(tiny_model()), config(resize=0), tmp_path / "new", progress=False)


def test_resume_with_other_weights_or_tokenizer_is_refused(tmp_path):
    def killed(shard):
        raise KeyboardInterrupt

    tok = CodebookTokenizer()
    with pytest.raises(KeyboardInterrupt):
        run_sampling(Sampler(tiny_model()), config(), tmp_path, tokenizer=tok, progress=False,
                     on_shard_done=killed)
    other = tiny_model(seed=1)  # same architecture and settings, other weights
    with pytest.raises(ValueError, match="holds samples of a different model .*new output"):
        run_sampling(Sampler(other), config(), tmp_path, tokenizer=tok, progress=False)
    edited = tiny_model()
    with torch.no_grad():
        edited.output.weight[3, 5] += 1e-3  # one weight, slightly
    with pytest.raises(ValueError, match="different model"):
        run_sampling(Sampler(edited), config(), tmp_path, tokenizer=tok, progress=False)
    retrained = CodebookTokenizer()
    retrained.vocab_size = 65  # a tokenizer that is not a torch module: class and sizes
    with pytest.raises(ValueError, match="holds samples of images of a different tokenizer"):
        run_sampling(Sampler(tiny_model()), config(), tmp_path, tokenizer=retrained,
                     progress=False)
    assert len(list((tmp_path / "shards").iterdir())) == 1  # nothing was mixed in
    done = run_sampling(Sampler(tiny_model()), config(), tmp_path, tokenizer=tok, progress=False)
    assert done.shards_sampled == 3  # the same model and tokenizer resume


def test_weights_fingerprint_follows_contents_not_identity():
    a, b = tiny_model(), tiny_model()
    assert weights_fingerprint(a) == weights_fingerprint(b)
    assert weights_fingerprint(a) != weights_fingerprint(tiny_model(seed=1))
    assert weights_fingerprint(a) != weights_fingerprint(a.to(torch.bfloat16))
    assert weights_fingerprint(b, grid=4) != weights_fingerprint(b, grid=5)


def test_grid_helpers():
    images = np.arange(5 * 2 * 3 * 3, dtype=np.uint8).reshape(5, 2, 3, 3)
    grid = np.asarray(image_grid(images, nrow=3, padding=1))
    assert grid.shape == (2 * 3 + 1, 3 * 4 + 1, 3)
    assert np.array_equal(grid[4:6, 5:8], images[4])
    picture = sample_grid(tiny_model(), CodebookTokenizer(), [0, 1, 2, 3], seed=1, cfg_scale=2.0)
    assert picture.size == (2 * 10 + 2, 2 * 10 + 2)
    again = sample_grid(tiny_model(), CodebookTokenizer(), [0, 1, 2, 3], seed=1, cfg_scale=2.0)
    assert np.array_equal(np.asarray(picture), np.asarray(again))


def test_cli_sample_end_to_end(tmp_path, monkeypatch, capsys):
    checkpoint = tmp_path / "model.safetensors"
    llamagen.save(tiny_model(), checkpoint)
    opened = []
    monkeypatch.setattr(
        ccalign.tokenizers, "load", lambda path: opened.append(path) or CodebookTokenizer()
    )
    args = [
        "sample", str(checkpoint), "--out", str(tmp_path / "run"), "--classes", "1-3",
        "--per-class", "2", "--batch-size", "4", "--cfg-scale", "1.5", "--top-k", "10",
        "--tokenizer", "tok.pt", "--resize", "4", "--device", "cpu", "--quiet",
    ]
    assert main(args) == 0
    assert opened == ["tok.pt"]
    arr = np.load(tmp_path / "run" / "samples.npz")["arr_0"]
    assert arr.shape == (6, 4, 4, 3)
    assert len(list((tmp_path / "run" / "images").glob("*.png"))) == 6
    first = (tmp_path / "run" / "samples.npz").read_bytes()
    assert main(args) == 0  # a finished run re-assembles the same file
    assert (tmp_path / "run" / "samples.npz").read_bytes() == first
    assert "0 batches sampled now" in capsys.readouterr().out
    assert main(["sample", str(checkpoint), "--out", str(tmp_path / "x"), "--device", "cpu"]) == 1
    assert "say what to sample" in capsys.readouterr().err


def test_the_tokenizer_follows_the_model_grid(tmp_path):
    """A convolutional VQ saved at one size decodes the model's grid (VQ-16: 256 -> 384 px)."""
    from ccalign import tokenizers

    tokenizers.save(tokenizers.build("small"), tmp_path / "vq.safetensors")
    default = tokenizers.load(tmp_path / "vq.safetensors")
    config = llamagen.LlamaGenConfig(grid=default.grid + 2)
    sized = llamagen.FAMILY.load_tokenizer(str(tmp_path / "vq.safetensors"), config)
    assert sized.grid == default.grid + 2
    assert sized.image_size == (default.grid + 2) * (default.image_size // default.grid)
    codes = torch.zeros(1, sized.grid**2, dtype=torch.long)
    assert sized.decode(codes).shape[-1] == sized.image_size
