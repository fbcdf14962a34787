"""Fine-tuning Janus: CCA with rolled prompts as negatives against a hand-written loss, through
`ccalign finetune` from a transformers folder, resumed bit-exactly, and LoRA whose reference is
the model with its adapters off."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ccalign.cli import main
from ccalign.conditions import CaptionBatch
from ccalign.data.captions import CaptionedCodes, CaptionFile, write_caption_file
from ccalign.data.codes import open_codes, write_flat_codes
from ccalign.io import read_safetensors
from ccalign.models import families
from ccalign.models.family import ModelSpec
from ccalign.train import TrainConfig, Trainer, run_training
from ccalign.train.distributed import keyed_row_mask
from support.processes import Killed, kill_after
from support.tiny import make_config

pytest.importorskip("transformers")

from support.janus import PAD, save_tiny_janus  # noqa: E402

#: 16 distinct captions (a rolled neighbour with the same caption would count as a positive)
CAPTIONS = [f"{first} {second}" + " on the left" * (i % 3) for i, (first, second) in enumerate(
    (a, b) for a in ("a", "red", "blue", "the") for b in ("cat", "dog", "sneaker", "bag"))]


def write_data(folder, n: int = 16) -> tuple[str, str, str]:
    """A tiny Janus folder, image codes of n images and the prompt ids of a caption each."""
    init = save_tiny_janus(folder / "janus")
    g = torch.Generator().manual_seed(1)
    codes = str(folder / "codes.safetensors")
    write_flat_codes(codes, torch.randint(0, 64, (n, 16), generator=g),
                     torch.zeros(n, dtype=torch.long), vocab_size=64, grid=4)
    captions = folder / "captions.txt"
    captions.write_text("\n".join(CAPTIONS[i % len(CAPTIONS)] for i in range(n)))
    assert n <= len(CAPTIONS)
    prompts = str(folder / "prompts.safetensors")
    assert main(["encode-captions", str(captions), "--text-encoder", str(init), "--length",
                 "16", "--out", prompts, "--quiet"]) == 0
    return str(init), codes, prompts


def load(init: str):
    return families.create(ModelSpec(init=init))


def test_cca_gradient_with_prompt_negatives_matches_a_hand_written_loss(tmp_path):
    init, codes, prompts = write_data(tmp_path)
    data = CaptionedCodes(open_codes(codes), CaptionFile(prompts, 0, 0))
    model, start = load(init), load(init)
    config = make_config(tmp_path / "run", method={"uncond_ratio": 0.3}, train={"steps": 1},
                         optim={"grad_clip": 0.0})
    trainer = Trainer(config, model, data)
    grads = []
    trainer.optimizer.register_step_pre_hook(lambda *a: grads.append(
        {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}))
    trainer.fit()

    beta, lam = 0.5, 10.0
    order = np.random.default_rng([0, 0]).permutation(16)[:8]
    null_rows = keyed_row_mask(0, 1, 8, 0.3)
    reference = copy.deepcopy(start).eval()
    start.train()
    total = 0.0
    for chunk in (slice(0, 4), slice(4, 8)):
        tokens, conds = data.collate([data[int(i)] for i in order[chunk]])
        null, rolled = null_rows[chunk], [1, 2, 3, 0]
        pos = CaptionBatch(conds.features, conds.mask, null)
        # a null row's negative is its positive: its own prompt blanked, under its own mask
        neg_ids = torch.where(null[:, None], conds.features, conds.features[rolled])
        neg_mask = torch.where(null[:, None], conds.mask, conds.mask[rolled])
        neg = CaptionBatch(neg_ids, neg_mask, null)
        with torch.no_grad():
            ref_pos, ref_neg = reference(pos, tokens), reference(neg, tokens)
        d_pos, d_neg = start(pos, tokens) - ref_pos, start(neg, tokens) - ref_neg
        weight = torch.where(null, 1.0, lam)
        sign = torch.where(null, 1.0, -1.0)
        per_row = -F.logsigmoid(beta * d_pos) - weight * F.logsigmoid(sign * beta * d_neg)
        total = total + per_row.mean() / lam / 2
    total.backward()
    assert null_rows.any() and not null_rows.all()
    checked = 0
    for name, param in start.named_parameters():
        if not param.requires_grad:
            assert name not in grads[0]
            continue
        scale = param.grad.abs().max().item() + 1e-12
        torch.testing.assert_close(grads[0][name], param.grad, rtol=1e-4, atol=1e-5 * scale)
        checked += 1
    assert checked > 10


def janus_config(out, init, codes, prompts, lora: bool = False, **train) -> TrainConfig:
    method = {"name": "cca", "beta": 0.5, "lam": 10.0, "uncond_ratio": 0.3}
    if lora:
        method.update(dropout="none", lora={"enabled": True, "rank": 4, "alpha": 8.0})
    return TrainConfig.from_dict({
        "model": {"init": init},
        "data": {"path": codes, "captions": prompts},
        "method": method,
        "optim": {"lr": 1e-3, "grad_clip": 0.5},
        "train": {"global_batch": 8, "micro_batch": 4, "steps": 3, "device": "cpu",
                  "precision": "fp32", "progress": False, **train},
        "checkpoint": {"out": str(out), "every": 1, "keep": 3},
    })


@pytest.mark.slow
def test_finetune_from_a_transformers_folder_runs_and_resumes_bit_exact(tmp_path):
    init, codes, prompts = write_data(tmp_path)
    config = tmp_path / "janus.toml"
    config.write_text("[method]\nname = 'cca'\n[train]\nglobal_batch = 4\nmicro_batch = 2\n"
                      "device = 'cpu'\nprecision = 'fp32'\nprogress = false\n")
    assert main(["finetune", "--config", str(config), "--init", init, "--data", codes, "--set",
                 f"data.captions={json.dumps(prompts)}", "--out", str(tmp_path / "cli"),
                 "--set", "train.steps=2"]) == 0
    tuned = families.load_file(tmp_path / "cli" / "final.safetensors")
    assert families.of(tuned).name == "janus"
    run_training(janus_config(tmp_path / "straight", init, codes, prompts))
    broken = janus_config(tmp_path / "broken", init, codes, prompts)
    with pytest.raises(Killed):
        run_training(broken, callbacks=[kill_after(2)])
    run_training(broken, resume=True)
    a, b = (read_safetensors(tmp_path / r / "final.safetensors") for r in ("straight", "broken"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_lora_trains_only_adapters_and_its_reference_is_the_model_with_them_off(tmp_path):
    from ccalign.train import lora as L

    init, codes, prompts = write_data(tmp_path)
    data = CaptionedCodes(open_codes(codes), CaptionFile(prompts, 0, 0))
    base = load(init).eval()
    trainer = Trainer(janus_config(tmp_path / "run", init, codes, prompts, lora=True),
                      load(init), data)
    tokens, conds = data.collate([data[i] for i in range(4)])
    with torch.no_grad():
        expected = base(conds, tokens)
        assert torch.equal(trainer.reference(conds, tokens), expected)
    trainer.fit()
    adapters = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert adapters and all(L.is_adapter_key(n) for n in adapters)
    assert any("q_proj" in n for n in adapters) and any("down_proj" in n for n in adapters)
    with torch.no_grad():
        assert torch.equal(trainer.reference(conds, tokens), expected)  # adapters off
        assert not torch.equal(trainer.model(conds, tokens), expected)


def test_null_prompts_keep_bos_and_boi_and_blank_the_rest():
    from ccalign.models.janus import unconditional_ids
    from support.janus import BOI, BOS

    ids = torch.tensor([[PAD, PAD, BOS, 9, 11, BOI], [BOS, 12, 13, 14, 15, BOI]])
    null = torch.tensor([True, False])
    config = type("C", (), {"bos_id": BOS, "boi_id": BOI, "pad_id": PAD})
    out = unconditional_ids(ids, null, config)
    assert out.tolist() == [[PAD, PAD, BOS, PAD, PAD, BOI], ids[1].tolist()]
    with pytest.raises(ValueError, match="token ids"):
        write_caption_file("x.safetensors", torch.zeros(2, 3), torch.ones(2, 3))


@pytest.mark.parametrize("size, trainable", [("1B", "1,485,053,952"), ("7B", "159,350,784")])
def test_the_recipes_memory_plans_fit_one_80_gb_gpu(size, trainable, capsys):
    """1B fully fine-tuned, 7B with LoRA (rank 64): the plan from the preset's sizes, since no
    checkpoint is cached here."""
    assert main(["finetune", "--config", f"configs/janus_pro_{size}.toml", "--dry-run",
                 "--device", "cuda", "--gpu-memory", "80GiB"]) == 0
    out = capsys.readouterr().out
    assert f"({trainable} trainable)" in out and "micro-batch 8 " in out
    fits = int(out.split("largest micro-batch that fits: ")[1].split()[0])
    assert fits >= 8


@pytest.mark.numerics
@pytest.mark.slow
def test_two_fsdp_processes_match_one(tmp_path):
    """FSDP2 shards the language model's blocks (recomputed in backward) on two processes; in
    float64 the result equals one process's accumulation of the same micro-batches."""
    from support.numerics import assert_same_run
    from support.processes import launch

    init, codes, prompts = write_data(tmp_path, n=16)
    run_training(janus_config(tmp_path / "single", init, codes, prompts, weights_dtype="fp64"))
    launch(janus_config(tmp_path / "multi", init, codes, prompts, weights_dtype="fp64",
                        parallel="fsdp", activation_checkpointing=True))
    single, multi = (families.load_file(tmp_path / r / "final.safetensors").state_dict()
                     for r in ("single", "multi"))
    assert_same_run(single, multi)
