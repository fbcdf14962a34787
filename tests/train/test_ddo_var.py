"""DDO on VAR references: keyed negatives from VAR's sampler (file and online), the optional
decode / re-encode of NVlabs/DDO's VAR recipe, resume, rounds and config errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ccalign.data.codes import open_codes
from ccalign.models import var
from ccalign.models.var import generate
from ccalign.models.var import sampler as var_sampler
from ccalign.models.var.sampler import VarSampler, retokenize
from ccalign.tokenizers import var_vq
from ccalign.train import TrainConfig, load_config, run_training
from ccalign.train.ddo import (
    FileNegatives,
    OnlineNegatives,
    Precision,
    negative_seed,
    step_rows,
)
from ccalign.train.distributed import BatchPlan
from ccalign.train.state import list_checkpoints
from support import REPO
from support.processes import Killed, kill_after
from support.tiny import write_files as write_llamagen_files
from support.tiny_var import SEQ, tiny_pair, write_var_files

FP32 = Precision(torch.float32, None)  # how the CPU tests score the reference


def ddo_var_config(out: Path, files: dict, *, vae: bool = False, **method) -> TrainConfig:
    model = {"init": files["init"], **({"vae": files["vae"]} if vae else {})}
    return TrainConfig.from_dict(
        {
            "model": model,
            "data": {"path": files["codes"]},
            "method": {"name": "ddo", "beta": 0.5, "alpha": 3.0, "uncond_ratio": 0.3,
                       "dropout": "none", "negatives_batch": 2, **method},
            "optim": {"lr": 1e-2, "schedule": "cosine", "warmup_steps": 1},
            "train": {"global_batch": 4, "micro_batch": 2, "steps": 4, "device": "cpu",
                      "precision": "fp32", "progress": False},
            "checkpoint": {"out": str(out), "every": 2, "keep": 1},
        }
    )


def same_weights(a: Path, b: Path) -> bool:
    x, y = var.load(a).state_dict(), var.load(b).state_dict()
    return all(torch.equal(x[k], y[k]) for k in x)


def by_hand(vae: var_vq.VarVQ, f_hat: torch.Tensor) -> torch.Tensor:
    """DDO's VAR_sample.py then VAR's loader: numpy's uint8 cast of (x + 1) / 2 * 255, / 255."""
    with torch.no_grad():
        images = vae.decode_fhat(f_hat).add(1).mul(0.5).mul(255)
    pixels = images.permute(0, 2, 3, 1).numpy().astype(np.uint8)
    back = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
    return vae.encode(back + back - 1)  # VAR's normalize_01_into_pm1: x + x - 1


def test_file_negatives_of_a_var_reference_are_keyed_var_samples(tmp_path):
    files = write_var_files(tmp_path)
    config = ddo_var_config(tmp_path / "run", files)
    run_training(config)
    path = tmp_path / "run" / "negatives.safetensors"
    negatives, data = FileNegatives(path), open_codes(files["codes"])
    plan = BatchPlan(len(data), 4, 2, 1, config.data.seed)
    rows, labels = zip(*[step_rows(data.all_labels(), plan, s, 0, 0.3) for s in range(1, 5)],
                       strict=True)
    assert torch.equal(negatives.rows, torch.from_numpy(np.concatenate(rows)))
    assert torch.equal(negatives.labels, torch.from_numpy(np.concatenate(labels)))
    assert negatives.tokens.shape[1] == SEQ and len(open_codes(path)) == len(negatives.rows)
    key = torch.Generator().manual_seed(negative_seed(0, 1, 1, 0))
    drawn = generate(var.load(files["init"]), torch.from_numpy(labels[0][:2]), generator=key)
    assert torch.equal(negatives.tokens[:2], drawn)
    manifest = json.loads(negatives.meta["manifest"])
    assert "retokenize_vae" not in manifest and manifest["sampling"]["temperature"] == 1.0


@pytest.mark.parametrize("source", ["file", "online"])
def test_killed_and_resumed_var_round_is_bitwise_identical(tmp_path, source):
    files = write_var_files(tmp_path)
    method = {"negatives": source, "dropout": "both"}  # the tiny VAR has drop_path 0.1
    run_training(ddo_var_config(tmp_path / "straight", files, **method))
    broken = ddo_var_config(tmp_path / "broken", files, **method)
    with pytest.raises(Killed):
        run_training(broken, callbacks=[kill_after(3)])
    assert [s for s, _ in list_checkpoints(tmp_path / "broken")] == [2]
    run_training(broken, resume=True)
    final = "final.safetensors"
    assert same_weights(tmp_path / "straight" / final, tmp_path / "broken" / final)
    assert not same_weights(tmp_path / "straight" / final, Path(files["init"]))
    logs = [[json.loads(line)["loss"] for line in (tmp_path / r / "metrics.jsonl").open()]
            for r in ("straight", "broken")]
    assert logs[0] == logs[1] and len(logs[0]) == 4 and all(np.isfinite(logs[0]))


@pytest.mark.slow
def test_var_rounds_chain_with_the_vqvae_and_retokenized_negatives(tmp_path):
    """Round 2 samples from round 1's VAR, which carries the quantiser of model.vae."""
    files = write_var_files(tmp_path)
    out = tmp_path / "rounds"
    run_training(ddo_var_config(out, files, vae=True, rounds=2, negatives_retokenize=True))
    first, second = out / "round_1" / "final.safetensors", out / "round_2" / "final.safetensors"
    assert same_weights(second, out / "final.safetensors") and not same_weights(first, second)
    negatives = FileNegatives(out / "round_2" / "negatives.safetensors")
    manifest = json.loads(negatives.meta["manifest"])
    assert manifest["round"] == 2 and "retokenize_vae" in manifest


def test_online_var_negatives_are_keyed_samples_and_leave_the_reference_untouched():
    reference, _ = tiny_pair(seed=5)
    reference.train().requires_grad_(False)
    labels, rows = torch.tensor([2, 0, 4]), torch.tensor([8, 9, 11])
    source = OnlineNegatives(seed=7, round_index=2, sampling={"temperature": 1.0, "top_k": 0},
                             precision=FP32)
    rng = torch.get_rng_state()
    first = source.draw(reference, labels, rows)
    assert torch.equal(torch.get_rng_state(), rng)  # the dropout stream is not consumed
    assert reference.training and first.shape == (3, SEQ)
    assert torch.equal(first, source.draw(reference, labels, rows))
    key = torch.Generator().manual_seed(negative_seed(7, 2, 8))
    assert torch.equal(first, generate(reference, labels, generator=key))
    filtered = OnlineNegatives(seed=7, round_index=2, sampling={"top_k": 3, "top_p": 0.9},
                               precision=FP32)
    key = torch.Generator().manual_seed(negative_seed(7, 2, 8))
    expected = generate(reference, labels, top_k=3, top_p=0.9, generator=key)
    assert torch.equal(filtered.draw(reference, labels, rows), expected)
    assert source.draw(reference, labels[:0], rows[:0]).shape == (0, SEQ)


def test_retokenize_encodes_the_decoded_8bit_images(monkeypatch):
    model, vae = tiny_pair(seed=1)
    labels = torch.tensor([0, 3, 3, 1])
    key = torch.Generator().manual_seed(11)
    codes, f_hat = generate(model, labels, generator=key, return_fhat=True)
    expected = by_hand(vae, f_hat)
    assert torch.equal(retokenize(vae, f_hat), expected)
    monkeypatch.setattr(var_sampler, "RETOKENIZE_ROWS", 3)  # chunks: the same codes
    assert torch.equal(retokenize(vae, f_hat), expected)
    monkeypatch.undo()
    assert not torch.equal(expected, codes)  # the round trip changes codes (a random VQVAE)
    sampler = VarSampler(model, retokenize=vae)
    drawn = sampler.generate(labels, generator=torch.Generator().manual_seed(11))
    assert torch.equal(drawn, expected)
    with pytest.raises(ValueError, match="has no temperature"):
        sampler.generate(labels, temperature=0.5)


@pytest.mark.slow
def test_a_retokenized_round_records_its_vqvae_and_refuses_another_setting(tmp_path):
    files = write_var_files(tmp_path)
    config = ddo_var_config(tmp_path / "run", files, vae=True, negatives_retokenize=True)
    run_training(config)
    negatives = FileNegatives(tmp_path / "run" / "negatives.safetensors")
    assert "retokenize_vae" in json.loads(negatives.meta["manifest"])
    data = open_codes(files["codes"])
    plan = BatchPlan(len(data), 4, 2, 1, config.data.seed)
    _, labels = step_rows(data.all_labels(), plan, 1, 0, 0.3)
    key = torch.Generator().manual_seed(negative_seed(0, 1, 1, 0))
    _, f_hat = generate(var.load(files["init"]), torch.from_numpy(labels[:2]), generator=key,
                        return_fhat=True)
    assert torch.equal(negatives.tokens[:2], by_hand(var_vq.load(files["vae"]), f_hat))
    # online with the same setting trains too
    run_training(ddo_var_config(tmp_path / "online", files, vae=True, negatives="online",
                                negatives_retokenize=True))
    # a resume with the other setting: refused by the run's record (written at its start), and
    # where that is gone, before any checkpoint, by the negatives' manifest
    plain = ddo_var_config(tmp_path / "plain", files, vae=True)
    with pytest.raises(Killed):
        run_training(plain, callbacks=[kill_after(1)])
    assert not list_checkpoints(tmp_path / "plain")
    other = ddo_var_config(tmp_path / "plain", files, vae=True, negatives_retokenize=True)
    with pytest.raises(ValueError, match="negatives_retokenize: False -> True"):
        run_training(other, resume=True)
    record = (tmp_path / "plain" / "config.json").read_bytes()
    (tmp_path / "plain" / "config.json").unlink()
    with pytest.raises(ValueError, match="negatives sampled with other settings"):
        run_training(other, resume=True)
    (tmp_path / "plain" / "config.json").write_bytes(record)
    run_training(plain, resume=True)
    with pytest.raises(ValueError, match="negatives_retokenize: False -> True"):
        run_training(other, resume=True)


def test_config_errors_name_the_key(tmp_path):
    files = write_var_files(tmp_path)
    with pytest.raises(ValueError, match="negatives_temperature = 0.8: VAR's sampler has no"):
        run_training(ddo_var_config(tmp_path / "a", files, negatives="online",
                                    negatives_temperature=0.8))
    with pytest.raises(ValueError, match="negatives_retokenize needs the VQVAE"):
        run_training(ddo_var_config(tmp_path / "b", files, negatives_retokenize=True))
    init, codes = write_llamagen_files(tmp_path)
    llamagen = ddo_var_config(tmp_path / "c", {"init": init, "codes": codes},
                              negatives_retokenize=True)
    with pytest.raises(ValueError, match="a LlamaGen reference's negatives are its own tokens"):
        run_training(llamagen)


def test_the_var_ddo_recipe_carries_the_papers_numbers():
    config = load_config(REPO / "configs" / "var_d16_ddo.toml")
    method = config.method
    assert (method.name, method.beta, method.alpha, method.uncond_ratio) == ("ddo", 0.02, 50.0, 0.5)
    assert method.negatives_retokenize and config.model.vae == "var-vae"
    assert (config.optim.lr, config.train.global_batch, config.train.steps) == (4e-6, 1024, 100)
    assert config.model.arch["drop_path"] == 0.0 and method.dropout == "none"
