"""Files from elsewhere: pickled code never runs, official layouts load, damaged files are named.

Each hostile file's payload would create a marker file when unpickled; every path by which
ccalign opens a file (sample, --tokenizer, --init, --resume) must refuse it, marker unmade.
"""

from __future__ import annotations

import argparse
import os
import pickle
import random
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch

from ccalign import tokenizers
from ccalign.cli import main
from ccalign.data.codes import write_flat_codes
from ccalign.io import UnsafePickleError, read_tensor_file
from ccalign.models import llamagen
from ccalign.tokenizers.llamagen_vq import VQConfig, VQModel
from ccalign.train.state import (
    capture_rng,
    checkpoint_path,
    latest_checkpoint,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)
from ccalign.weights import load_weights

REPO = Path(__file__).resolve().parents[1]
TINY_GPT = dict(grid=4, dim=32, n_layer=1, n_head=2, vocab_size=64, num_classes=5)
#: GroupNorm(32) as released: official files are read by key names and shapes.
TINY_VQ = dict(codebook_size=64, codebook_embed_dim=4, ch=32, ch_mult=(1, 2), num_res_blocks=1,
               z_channels=32, norm_groups=32, usage_window=32, image_size=8)


class TouchPayload:
    """Unpickling this calls ``Path.touch(marker)``: the marker appears only if pickled code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


class ShellPayload(TouchPayload):
    """The same through a shell command (``os.system``)."""

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


PAYLOADS = [TouchPayload, ShellPayload]
#: The global each payload's pickle needs first (protocol 2 reaches Path.touch via getattr).
FIRST_GLOBAL = {TouchPayload: "getattr", ShellPayload: "system"}


def tiny_gpt() -> llamagen.LlamaGen:
    torch.manual_seed(0)
    return llamagen.build("custom", **TINY_GPT)


def tiny_vq() -> VQModel:
    torch.manual_seed(0)
    return VQModel(VQConfig(**TINY_VQ)).eval()


def hostile(path: Path, payload: type, weights: dict) -> Path:
    """Real weights under "model" with the payload beside them, as an official file would."""
    torch.save({"model": weights, "args": payload(path.parent / "marker")}, path)
    return path


def assert_refused(code: int, capsys, path: Path) -> None:
    err = capsys.readouterr().err
    assert code == 1
    assert str(path) in err and "will not unpickle" in err and "Traceback" not in err
    assert not (path.parent / "marker").exists()


@pytest.mark.parametrize("payload", PAYLOADS)
def test_the_payloads_are_live_under_a_full_unpickle(tmp_path, payload):
    """Control: the marker is a real witness, created as soon as the pickle is run."""
    path = hostile(tmp_path / "evil.pt", payload, tiny_gpt().state_dict())
    torch.load(path, weights_only=False)
    assert (tmp_path / "marker").exists()


@pytest.mark.parametrize("payload", PAYLOADS)
def test_refusal_names_the_file_and_the_global(tmp_path, payload):
    path = hostile(tmp_path / "evil.pt", payload, tiny_gpt().state_dict())
    expected = rf"{re.escape(str(path))} holds a pickled object \(\S*{FIRST_GLOBAL[payload]}\)"
    with pytest.raises(UnsafePickleError, match=expected + ".*could run code"):
        read_tensor_file(path)
    with pytest.raises(UnsafePickleError):
        load_weights(tiny_gpt(), path)
    assert not (tmp_path / "marker").exists()


WRITERS = {
    "torch pickle protocol 4": lambda obj, path: torch.save(obj, path, pickle_protocol=4),
    "torch legacy format": lambda obj, path: torch.save(
        obj, path, _use_new_zipfile_serialization=False
    ),
    **{
        f"bare pickle protocol {n}": lambda obj, path, n=n: path.write_bytes(pickle.dumps(obj, n))
        for n in range(pickle.HIGHEST_PROTOCOL + 1)
    },
}


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("writer", WRITERS)
def test_refusal_names_the_global_in_any_pickle_layout(tmp_path, writer):
    """Protocol 4+ pickles, which torch refuses without naming a global, are read statically."""
    path = tmp_path / "evil.pt"
    obj = {"steps": 1, "args": ShellPayload(path.parent / "marker")}
    if writer.startswith("torch"):  # bare pickles of tensors are refused for their own globals
        obj["model"] = tiny_gpt().state_dict()
    WRITERS[writer](obj, path)
    with pytest.raises(UnsafePickleError, match=r"\(\S*system\) that ccalign will not unpickle"):
        read_tensor_file(path)
    assert not (tmp_path / "marker").exists()


@pytest.mark.parametrize("payload", PAYLOADS)
def test_sample_refuses_a_hostile_model(tmp_path, capsys, payload):
    path = hostile(tmp_path / "evil.pt", payload, tiny_gpt().state_dict())
    code = main(["sample", str(path), "--out", str(tmp_path / "run"), "--classes", "0",
                 "--per-class", "1", "--device", "cpu", "--quiet"])
    assert_refused(code, capsys, path)


@pytest.mark.parametrize("payload", PAYLOADS)
def test_sample_refuses_a_hostile_tokenizer(tmp_path, capsys, payload):
    model = tmp_path / "model.safetensors"
    llamagen.save(tiny_gpt(), model)
    path = hostile(tmp_path / "vq.pt", payload, tiny_vq().state_dict())
    code = main(["sample", str(model), "--out", str(tmp_path / "run"), "--classes", "0",
                 "--per-class", "1", "--tokenizer", str(path), "--device", "cpu", "--quiet"])
    assert_refused(code, capsys, path)
    with pytest.raises(UnsafePickleError):
        tokenizers.load(path)


def finetune_args(tmp_path: Path, init: Path) -> list[str]:
    g = torch.Generator().manual_seed(0)
    codes = tmp_path / "codes.safetensors"
    vocab, classes = TINY_GPT["vocab_size"], TINY_GPT["num_classes"]
    tokens = torch.randint(0, vocab, (16, TINY_GPT["grid"] ** 2), generator=g)
    write_flat_codes(codes, tokens, torch.arange(16) % classes, vocab_size=vocab, grid=4)
    return ["finetune", "--config", str(REPO / "configs" / "tiny_cpu.toml"), "--init", str(init),
            "--data", str(codes), "--out", str(tmp_path / "run")]


@pytest.mark.parametrize("payload", PAYLOADS)
def test_finetune_refuses_a_hostile_init(tmp_path, capsys, payload):
    path = hostile(tmp_path / "init.pt", payload, tiny_gpt().state_dict())
    assert_refused(main(finetune_args(tmp_path, path)), capsys, path)


@pytest.mark.parametrize("payload", PAYLOADS)
def test_resume_refuses_a_planted_checkpoint(tmp_path, capsys, payload):
    init = tmp_path / "init.safetensors"
    llamagen.save(tiny_gpt(), init)
    planted = checkpoint_path(tmp_path / "run", 1)
    planted.parent.mkdir(parents=True)
    torch.save({"step": 1, "model": {}, "rng": payload(planted.parent / "marker")}, planted)
    code = main([*finetune_args(tmp_path, init), "--resume"])
    assert_refused(code, capsys, planted)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_refused_checkpoint_is_not_skipped_for_an_older_one(tmp_path):
    """A damaged newest file falls back with a warning; a planted one stops the resume."""
    out = tmp_path / "run"
    save_checkpoint({"step": 1, "model": {}}, out, keep=5)
    checkpoint_path(out, 2).write_bytes(b"not a checkpoint")
    with pytest.warns(UserWarning, match="step_00000002"):
        assert latest_checkpoint(out)[0] == checkpoint_path(out, 1)
    for protocol in (2, 4):  # 4: torch refuses it without naming a global
        planted = checkpoint_path(out, 3)
        payload = TouchPayload(tmp_path / "marker")
        torch.save({"step": 3, "model": {}, "rng": payload}, planted, pickle_protocol=protocol)
        with pytest.raises(UnsafePickleError, match="step_00000003"):
            latest_checkpoint(out)
    assert not (tmp_path / "marker").exists()


def test_training_checkpoint_rng_states_load_weights_only_and_restore_exactly(tmp_path):
    random.seed(3)
    np.random.seed(4)
    np.random.randn()  # leaves a cached Gaussian in numpy's state
    torch.manual_seed(5)
    state = {"step": 1, "model": tiny_gpt().state_dict(), "rng": [capture_rng()]}
    expected = (random.random(), np.random.randn(3), np.random.rand(), torch.rand(3))
    restored = load_checkpoint(save_checkpoint(state, tmp_path, keep=1))
    restore_rng(restored["rng"][0])
    again = (random.random(), np.random.randn(3), np.random.rand(), torch.rand(3))
    assert again[0] == expected[0] and again[2] == expected[2]
    assert np.array_equal(again[1], expected[1]) and torch.equal(again[3], expected[3])


def official_extras(model: torch.nn.Module) -> dict:
    """What LlamaGen's trainers save beside the weights: optimizer state, steps, argparse args."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95))
    sum(p.sum() for p in model.parameters()).backward()
    optimizer.step()
    args = argparse.Namespace(gpt_model="GPT-B", image_size=256, lr=1e-4, no_compile=False,
                              ckpt_every=5000, mixed_precision="bf16", vq_ckpt=None,
                              codebook_embed_dim=8, gpu_id=[0, 1])
    return {"optimizer": optimizer.state_dict(), "steps": 10, "args": args}


def test_official_gpt_layout_with_argparse_args_loads(tmp_path):
    model = tiny_gpt()
    path = tmp_path / "c2i_B_256.pt"
    torch.save({"model": model.state_dict(), **official_extras(model)}, path)
    loaded = llamagen.load(path, "custom", **TINY_GPT)
    assert all(torch.equal(a, b) for a, b in
               zip(loaded.state_dict().values(), model.state_dict().values(), strict=True))
    assert read_tensor_file(path)["args"].gpt_model == "GPT-B"
    with pytest.raises(pickle.UnpicklingError):  # the allow-list is scoped to ccalign's loads
        torch.load(path, weights_only=True)


def test_official_vq_layout_with_argparse_args_loads(tmp_path):
    model, disc = tiny_vq(), torch.nn.Conv2d(3, 4, 3)
    path = tmp_path / "vq_ds16_c2i.pt"
    torch.save({"model": model.state_dict(), "discriminator": disc.state_dict(),
                "optimizer_disc": torch.optim.Adam(disc.parameters()).state_dict(),
                **official_extras(model)}, path)
    loaded = tokenizers.load(path, image_size=8)
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    assert torch.equal(loaded.encode(x), model.encode(x))


def damage(path: Path, how: str) -> Path:
    data = path.read_bytes()
    garbage = random.Random(0).randbytes(len(data))  # seeded: the same bytes every run
    path.write_bytes(data[: len(data) // 2] if how == "truncated" else garbage)
    return path


@pytest.mark.parametrize("how", ["truncated", "random"])
def test_damaged_safetensors_raise_one_value_error_naming_the_file(tmp_path, capsys, how):
    model = tmp_path / "model.safetensors"
    llamagen.save(tiny_gpt(), model)
    damage(model, how)
    tok = tmp_path / "tok.safetensors"
    tokenizers.save(tiny_vq(), tok)
    damage(tok, how)
    expected = rf"{re.escape(str(model))} is damaged or not a safetensors file"
    for read in (read_tensor_file, llamagen.config_from_file, llamagen.load,
                 lambda p: load_weights(tiny_gpt(), p)):
        with pytest.raises(ValueError, match=expected):
            read(model)
    with pytest.raises(ValueError, match=rf"{re.escape(str(tok))} is damaged"):
        tokenizers.load(tok)
    code = main(["sample", str(model), "--out", str(tmp_path / "run"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 1 and str(model) in err and "Traceback" not in err


@pytest.mark.parametrize("how", ["truncated", "random"])
def test_damaged_torch_files_raise_a_value_error_naming_the_file(tmp_path, how):
    path = tmp_path / "model.pt"
    llamagen.save(tiny_gpt(), path, official=True)
    damage(path, how)
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))} is damaged or not a torch file"):
        read_tensor_file(path)


def test_a_damaged_classifier_file_is_named(tmp_path):
    from ccalign.eval.classifier import bundled_classifier_path, load_classifier

    damaged = tmp_path / "classifier.safetensors"
    data = bundled_classifier_path().read_bytes()
    damaged.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="classifier.safetensors is damaged or not a safetensors"):
        load_classifier(damaged)
