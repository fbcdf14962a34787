"""VAR through `ccalign finetune`: from codes and from images encoded on the fly, resume,
final files in VAR's own layouts, the frozen quantiser, config errors, the recipe configs,
extract-codes writing every scale's codes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ccalign.data.codes import open_codes, write_flat_codes
from ccalign.io import read_safetensors
from ccalign.models import families, var
from ccalign.tokenizers import var_vq
from ccalign.train import run_training
from ccalign.train.config import load_config
from ccalign.train.state import list_checkpoints
from support.numerics import assert_same_run
from support.processes import Killed, kill_after, launch
from support.tiny import make_config
from support.tiny_var import CONFIGS, SEQ, TINY, tiny_pair, write_var_files


def image_folder(root: Path, n: int = 8) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def var_config(out: Path, files: dict, **sections):
    base = dict(model={"init": files["init"]}, data={"path": files["codes"]},
                method={"uncond_ratio": 0.25})
    for key, values in sections.items():
        base[key] = {**base.get(key, {}), **values}
    return make_config(out, **base)


def test_cca_from_codes_saves_var_files_with_trained_weights_and_frozen_quantizer(tmp_path):
    files = write_var_files(tmp_path)
    out = tmp_path / "run"
    run_training(var_config(out, files, model={"save_official": True}))
    init, final = var.load(files["init"]), var.load(out / "final.safetensors")
    assert families.of(final) is var.FAMILY
    moved = [k for k, p in init.named_parameters() if p.requires_grad]
    after, before = final.state_dict(), init.state_dict()
    assert all(not torch.equal(before[k], after[k]) for k in moved)
    frozen = [k for k in before if k.startswith("quantizer.")]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    official = var.load(out / "final.pth", "custom", vae=var_vq.load(files["vae"]), **TINY)
    assert all(torch.equal(official.state_dict()[k], after[k]) for k in after)
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and all(np.isfinite(r["loss"]) for r in log)


def test_official_file_with_vae_trains_like_the_ccalign_file(tmp_path):
    files = write_var_files(tmp_path)
    run_training(var_config(tmp_path / "a", files))
    official = var_config(tmp_path / "b", files, model={"init": files["official"],
                                                         "name": "custom", "vae": files["vae"],
                                                         "arch": TINY})
    run_training(official)
    a = var.load(tmp_path / "a" / "final.safetensors").state_dict()
    b = var.load(tmp_path / "b" / "final.safetensors").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cca_from_images_encoded_on_the_fly_equals_training_on_their_codes(tmp_path):
    files = write_var_files(tmp_path)
    images = image_folder(tmp_path / "images")
    vae = var_vq.load(files["vae"])
    from ccalign.data.encoded import EncodedImages

    encoded = EncodedImages(images, vae)
    assert encoded.seq_len == SEQ
    items = [encoded[i] for i in range(len(encoded))]
    codes = torch.stack([c for c, _ in items])
    labels = torch.stack([lab for _, lab in items])
    write_flat_codes(tmp_path / "img_codes.safetensors", codes, labels, vocab_size=16, grid=4,
                     seq_len=SEQ)
    common = dict(train={"global_batch": 4, "micro_batch": 2})
    run_training(var_config(tmp_path / "fly", files, data={"path": str(images),
                                                             "tokenizer": files["vae"]},
                            **common))
    run_training(var_config(tmp_path / "codes", files,
                            data={"path": str(tmp_path / "img_codes.safetensors")}, **common))
    a = var.load(tmp_path / "fly" / "final.safetensors").state_dict()
    b = var.load(tmp_path / "codes" / "final.safetensors").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_killed_and_resumed_var_run_is_bitwise_identical(tmp_path):
    files = write_var_files(tmp_path)
    sections = dict(
        method={"dropout": "both"},
        optim={"schedule": "linear", "warmup_steps": 2, "ema_decay": 0.9},
        train={"global_batch": 4, "micro_batch": 2, "steps": 6},
    )
    run_training(var_config(tmp_path / "straight", files, checkpoint={"every": 3}, **sections))
    broken = var_config(tmp_path / "broken", files, checkpoint={"every": 3, "keep": 1},
                        **sections)
    with pytest.raises(Killed):
        run_training(broken, callbacks=[kill_after(5)])
    assert [s for s, _ in list_checkpoints(tmp_path / "broken")] == [3]
    run_training(broken, resume=True)
    for name in ("final.safetensors", "final_ema.safetensors"):
        a = var.load(tmp_path / "straight" / name).state_dict()
        b = var.load(tmp_path / "broken" / name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name


@pytest.mark.parametrize("method", ["cca", "dpo", "unlearning", "mle"])
def test_every_objective_runs_and_dropout_none_starts_at_d_zero(tmp_path, method):
    files = write_var_files(tmp_path)
    records = []
    config = var_config(tmp_path / method, files, method={"name": method, "dropout": "none"})
    run_training(config, callbacks=[lambda trainer, record: records.append(record)])
    assert np.isfinite(records[-1]["loss"])
    if method != "mle":
        assert records[0]["d_pos"] == 0.0 and records[0]["d_neg"] == 0.0


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        (dict(model={"init": "OFFICIAL", "name": "custom", "arch": TINY}), "model.vae"),
        (dict(model={"init": "OFFICIAL", "vae": "VAE"}), "set model.name to its preset"),
        (dict(method={"name": "gft"}), "gft does not train VAR"),
        (dict(method={"name": "ddo", "negatives_temperature": 0.9}), "has no temperature"),
        (dict(method={"name": "ddo", "negatives_retokenize": True}), "needs the VQVAE"),
        (dict(model={"init": None, "name": "VAR-d16"}, method={"name": "mle"}), "model.vae"),
    ],
)
def test_config_errors_name_the_problem(tmp_path, sections, message):
    files = write_var_files(tmp_path)
    model = sections.get("model", {})
    for key, value in model.items():
        if value in ("OFFICIAL", "VAE"):
            model[key] = files["official" if value == "OFFICIAL" else "vae"]
    with pytest.raises(ValueError, match=message):
        run_training(var_config(tmp_path / "run", files, **sections))


def test_codes_of_another_length_are_refused(tmp_path):
    files = write_var_files(tmp_path)
    write_flat_codes(tmp_path / "short.safetensors", torch.zeros(8, 16, dtype=torch.long),
                     torch.zeros(8, dtype=torch.long), vocab_size=16, grid=4)
    config = var_config(tmp_path / "run", files, data={"path": str(tmp_path / "short.safetensors")})
    with pytest.raises(ValueError, match="16 tokens but the model expects 30 .every scale"):
        run_training(config)


#: depth -> (lambda, micro_batch, drop_path, min_lr_ratio) from thu-ml/CCA's README launch lines
RECIPES = {16: (50.0, 8, 0.0, 0.1), 20: (50.0, 4, None, 0.1), 24: (100.0, 4, None, 0.01),
           30: (1000.0, 2, None, 0.01)}


@pytest.mark.parametrize("depth", sorted(RECIPES))
def test_recipe_configs_carry_the_official_numbers(depth):
    lam, micro, drop_path, final_lr = RECIPES[depth]
    config = load_config(CONFIGS / f"var_d{depth}.toml")
    assert config.model.name == f"VAR-d{depth}" and config.model.init == f"var-d{depth}"
    assert config.method.name == "cca" and config.method.lam == lam
    assert config.method.beta == 0.02 and config.method.uncond_ratio == 0.1
    assert config.method.dropout == "both"
    assert config.model.arch.get("drop_path") == drop_path  # None: the preset's (VAR's dpr)
    assert config.optim.lr == 2e-5 and config.optim.grad_clip == 2.0
    assert config.optim.schedule == "linear" and config.optim.warmup_ratio == 0.02
    assert config.optim.warmup_start_ratio == 0.005 and config.optim.hold_ratio == 0.05
    assert config.optim.final_weight_decay == (0.08 if depth == 30 else None)
    assert config.optim.min_lr_ratio == final_lr and config.optim.weight_decay == 0.05
    assert config.train.global_batch == 256 and config.train.micro_batch == micro
    assert config.train.epochs == 1.0 and config.train.precision == "bf16"


def test_extract_codes_writes_every_scale_equal_to_encode(tmp_path):
    from ccalign.cli import main

    files = write_var_files(tmp_path)
    images = image_folder(tmp_path / "images", n=6)
    out = tmp_path / "extracted.safetensors"
    assert main(["extract-codes", str(images), "--tokenizer", files["vae"], "--flat", str(out),
                 "--out", str(tmp_path / "folder"), "--views", "center", "--device", "cpu",
                 "--workers", "0"]) == 0
    data = open_codes(out)
    folder = open_codes(tmp_path / "folder")  # LlamaGen's per-image .npy layout holds them too
    assert folder.seq_len == SEQ and all(torch.equal(folder[i][0], data[i][0]) for i in range(6))
    assert data.seq_len == SEQ and data.num_views == 1 and len(data) == 6
    vae = var_vq.load(files["vae"])
    from ccalign.data.encoded import EncodedImages

    encoded = EncodedImages(images, vae)
    for i in range(6):
        assert torch.equal(data[i][0], encoded[i][0]) and data[i][1] == encoded[i][1]


def test_weight_decay_groups_follow_vars_trainer():
    """VAR's filter_params: no decay on 1-D tensors, biases and its nowd_keys."""
    from ccalign.train.optim import param_groups

    model, _ = tiny_pair()
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): k for k, p in model.named_parameters()}
    nowd = ("pos_start", "pos_1LC", "lvl_embed", "ada_gss", "scale_mul")
    expected = {k for k, p in model.named_parameters() if p.requires_grad and p.ndim > 1
                and not k.endswith("bias") and not any(w in k for w in nowd)}
    assert {names[id(p)] for p in decay["params"]} == expected
    assert "lvl_embed.weight" in {names[id(p)] for p in no_decay["params"]}


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("mode", ["fp32", "autocast", "bf16-weights"])
def test_var_activation_estimate_matches_saved_tensor_bytes(mode, checkpointing):
    """The VAR estimate equals (to 1%) the bytes autograd keeps for backward, counted storage
    by storage, for float32, bf16 autocast and bf16 weights, with stochastic depth on."""
    from torch import nn

    from ccalign.train import memory as M
    from ccalign.train.precision import cast_parameters
    from ccalign.train.trainer import enable_activation_checkpointing

    torch.manual_seed(0)
    model = var.build("custom", depth=3, dim=64, n_head=4, patch_nums=(1, 2, 3, 4, 5),
                      vocab_size=32, vae_dim=8, num_classes=5, drop_path=0.1)
    if mode == "bf16-weights":
        cast_parameters(model, torch.bfloat16)
    if checkpointing:
        enable_activation_checkpointing(model)
    model.train()
    rows = 6
    tokens = torch.randint(0, 32, (rows, model.seq_len))
    labels = torch.randint(0, 5, (rows,))

    def forward():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode != "fp32"):
            return model(labels.clone(), tokens.clone())

    measured = M.saved_activation_bytes(forward, [*model.parameters(), *model.buffers()])
    dtypes = M.Dtypes(weights=torch.bfloat16 if mode == "bf16-weights" else torch.float32,
                      autocast=mode != "fp32", device_type="cpu")
    estimate = var.FAMILY.activations(model, rows, dtypes, checkpointing).saved
    if mode == "autocast":  # bf16 weight copies (the plan counts them as autocast_copies)
        copied = [model.head_nm.ada_lin[1]]
        if not checkpointing:
            copied += [m for m in model.blocks.modules() if isinstance(m, nn.Linear)]
        estimate += 2 * sum(m.weight.numel() for m in copied)
    assert estimate == pytest.approx(measured, rel=0.01)


def test_dry_run_plans_var_d30(capsys):
    from ccalign.cli import main

    assert main(["finetune", "--config", str(CONFIGS / "var_d30.toml"), "--dry-run",
                 "--set", "model.init='var_d30.pth'", "--gpu-memory", "141GiB"]) == 0
    out = capsys.readouterr().out
    assert "VAR-d30" in out and "680 tokens" in out


def test_export_round_trips_give_identical_logits(tmp_path, capsys):
    from ccalign.cli import main

    files = write_var_files(tmp_path)
    model = var.load(files["init"]).eval()  # eval: no stochastic depth
    tokens = torch.randint(0, 16, (3, SEQ), generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 3, 5])  # 5: the null class
    expected = model.logits(labels, tokens)
    pth, st = tmp_path / "out" / "var.pth", tmp_path / "out" / "var.safetensors"
    assert main(["export", files["init"], "--format", "official", "--out", str(pth)]) == 0
    assert main(["export", files["init"], "--format", "safetensors", "--out", str(st)]) == 0
    official = var.load(pth, "custom", vae=var_vq.load(files["vae"]), **TINY).eval()
    assert set(torch.load(pth, weights_only=True)) == set(var.official_state_dict(model))
    assert torch.equal(official.logits(labels, tokens), expected)
    assert torch.equal(var.load(st).eval().logits(labels, tokens), expected)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["family"] == "var" and config["depth"] == TINY["depth"]
    # an official VAR file is recognised by its keys and asks for its preset and VQVAE
    assert main(["export", str(pth), "--format", "safetensors", "--out", str(st),
                 "--overwrite"]) == 1
    assert "official VAR file: set model.name to its preset (--model" in capsys.readouterr().err


@pytest.mark.numerics
@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_match_one_accumulating(tmp_path, parallel):
    """gloo, 2 processes: DDP, and FSDP sharding VAR's blocks (and the root with the frozen
    quantiser), make the updates of one process accumulating two micro-batches; FSDP's sharded
    checkpoints resume bitwise."""

    files = write_var_files(tmp_path, n=24)
    sections = dict(method={"dropout": "none"}, optim={"grad_clip": 0.5, "ema_decay": 0.5},
                    train={"global_batch": 8, "micro_batch": 4, "steps": 3,
                           "weights_dtype": "fp64"},  # the comparison holds on any CPU
                    checkpoint={"every": 2})
    run_training(var_config(tmp_path / "single", files, **sections))
    two = {**sections, "train": {**sections["train"], "parallel": parallel}}
    launch(var_config(tmp_path / "multi", files, **two))
    for name in ("final.safetensors", "final_ema.safetensors"):
        single = var.load(tmp_path / "single" / name).state_dict()
        multi = var.load(tmp_path / "multi" / name).state_dict()
        assert_same_run(single, multi)
    if parallel == "fsdp":  # sharded checkpoints: killed after step 3 (saved at 2), resumed
        broken = var_config(tmp_path / "broken", files, **two)
        launch(broken, kill=3)
        launch(broken, resume=True)
        for name in ("final.safetensors", "final_ema.safetensors"):
            a = var.load(tmp_path / "multi" / name).state_dict()
            b = var.load(tmp_path / "broken" / name).state_dict()
            assert all(torch.equal(a[k], b[k]) for k in a), name


def test_quantizer_stays_float32_and_outside_autocast():
    """bf16 weights leave the frozen quantiser float32, and under autocast the teacher-forcing
    input is the float32 one (VAR's trainer builds it outside autocast)."""
    from ccalign.train.precision import cast_parameters

    model, _ = tiny_pair()
    tokens = torch.randint(0, 16, (2, SEQ), generator=torch.Generator().manual_seed(0))
    exact = model.quantizer.teacher_forcing_input(tokens)
    seen = []
    model.word_embed.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.tensor([0, 1]), tokens)
    assert torch.equal(seen[0], exact)
    cast_parameters(model, torch.bfloat16)
    assert all(p.dtype == torch.float32 for p in model.quantizer.parameters())
    assert model.head.weight.dtype == torch.bfloat16
    seen.clear()
    model(torch.tensor([0, 1]), tokens)
    assert torch.equal(seen[0], exact.to(torch.bfloat16))


def test_bf16_weights_train_var_and_keep_the_quantizer(tmp_path):
    files = write_var_files(tmp_path)
    out = tmp_path / "run"
    run_training(var_config(out, files, train={"weights_dtype": "bf16", "precision": "bf16"}))
    before, after = var.load(files["init"]).state_dict(), var.load(out / "final.safetensors")
    frozen = [k for k in before if k.startswith("quantizer.")]
    assert all(torch.equal(before[k], after.state_dict()[k]) for k in frozen)
    assert not torch.equal(before["head.weight"], after.state_dict()["head.weight"])


def test_lora_on_var_adapts_its_module_applied_layers_only(tmp_path):
    files = write_var_files(tmp_path)
    lora = {"enabled": True, "target_modules": ["mat_qkv"]}
    with pytest.raises(ValueError, match="'mat_qkv' matches no linear layer"):
        run_training(var_config(tmp_path / "a", files, method={"lora": lora}))
    lora = {"enabled": True, "target_modules": ["proj", "fc1", "fc2"]}
    run_training(var_config(tmp_path / "b", files, method={"lora": lora}))
    before = var.load(files["init"]).state_dict()
    after = var.load(tmp_path / "b" / "final.safetensors").state_dict()
    assert not torch.equal(before["blocks.0.ffn.fc1.weight"], after["blocks.0.ffn.fc1.weight"])
    assert torch.equal(before["head.weight"], after["head.weight"])


def test_lora_on_var_with_the_default_targets_adapts_vars_own_layers(tmp_path):
    """No target_modules: the family's defaults (VAR's proj, fc1, fc2 and AdaLN projections),
    not LlamaGen's layer names (which VAR refused: 'wqkv' matches no linear layer)."""
    files = write_var_files(tmp_path)
    run_training(var_config(tmp_path / "run", files, method={"lora": {"enabled": True}}))
    adapters = read_safetensors(tmp_path / "run" / "final_lora.safetensors")
    adapted = {key.split(".lora_")[0].removeprefix("base_model.model.") for key in adapters}
    assert {"blocks.0.attn.proj", "blocks.1.ffn.fc1", "blocks.0.ffn.fc2",
            "blocks.1.ada_lin.1", "head_nm.ada_lin.1"} <= adapted
    assert not any(name.endswith(("mat_qkv", ".head")) for name in adapted)
    record = json.loads((tmp_path / "run" / "config.json").read_text())
    assert record["method"]["lora"]["target_modules"] == []  # the family's, resolved at run time


def test_cli_finetune_official_var_file_from_images(tmp_path):
    from ccalign.cli import main

    files = write_var_files(tmp_path)
    images = image_folder(tmp_path / "images")
    arch = "{depth = 2, dim = 32, n_head = 2, patch_nums = [1, 2, 3, 4], vocab_size = 16, " \
           "vae_dim = 4, num_classes = 5}"
    out = tmp_path / "run"
    assert main(["finetune", "--init", files["official"], "--data", str(images), "--tokenizer",
                 files["vae"], "--out", str(out), "--steps", "1", "--device", "cpu",
                 "--set", "model.name=custom", "--set", f"model.arch={arch}",
                 "--set", f"model.vae={files['vae']}", "--set", "model.save_official=true",
                 "--set", "train.global_batch=4", "--set", "train.micro_batch=2",
                 "--set", "train.progress=false", "--set", "train.precision=fp32"]) == 0
    assert (out / "final.safetensors").exists() and (out / "final.pth").exists()
    assert families.of_file(out / "final.pth") is var.FAMILY
    final = families.load_file(out / "final.safetensors")
    assert families.of(final) is var.FAMILY
    assert torch.equal(final.head.weight, var.load(out / "final.safetensors").head.weight)
    with pytest.raises(ValueError, match="does not record its architecture"):
        families.load_file(out / "final.pth")  # official layout: VAR's, but no preset


def test_var_cca_gradient_matches_the_official_loss_written_out(tmp_path):
    """One CCA step on VAR: the gradient equals autograd of VAR_CCA_trainer's loss written out
    from full logits (log_softmax, gather, sum over the 30 tokens), pairs rolled per micro-batch,
    keyed null rows, loss / accum."""
    import copy

    import torch.nn.functional as F

    from ccalign.train.distributed import keyed_row_mask
    from ccalign.train.trainer import Trainer

    model, _ = tiny_pair()
    init = copy.deepcopy(model)
    g = torch.Generator().manual_seed(5)
    tokens, labels = torch.randint(0, 16, (16, SEQ), generator=g), torch.arange(16) % 5
    config = make_config(tmp_path, method={"uncond_ratio": 0.3, "dropout": "none"},
                         train={"steps": 1}, optim={"grad_clip": 0.0})
    trainer = Trainer(config, model, list(zip(tokens, labels, strict=True)))
    grads = []
    trainer.optimizer.register_step_pre_hook(lambda *_: grads.append(
        {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}))
    trainer.fit()

    def logp(net, y, x):
        return net.logits(y, x).log_softmax(-1).gather(2, x[..., None]).squeeze(2).sum(-1)

    beta, lam = 0.5, 10.0
    order = np.random.default_rng([0, 0]).permutation(16)[:8]
    null_rows = keyed_row_mask(0, 1, 8, 0.3)
    reference = copy.deepcopy(init).eval().requires_grad_(False)
    init.eval()
    total = 0.0
    for chunk in (slice(0, 4), slice(4, 8)):
        x, y = tokens[order[chunk]], labels[order[chunk]]
        mask = null_rows[chunk]
        pos = torch.where(mask, 5, y)
        neg = torch.where(mask, 5, torch.roll(y, -1))
        flag = mask | (neg == pos)  # VAR_CCA_trainer's neg_weight: null rows and equal labels
        d_pos = logp(init, pos, x) - logp(reference, pos, x)
        d_neg = logp(init, neg, x) - logp(reference, neg, x)
        weight = torch.where(flag, 1.0, lam)
        sign = torch.where(flag, 1.0, -1.0)
        per_row = -F.logsigmoid(beta * d_pos) - weight * F.logsigmoid(sign * beta * d_neg)
        total = total + per_row.mean() / lam / 2
    total.backward()
    for name, param in init.named_parameters():
        if param.requires_grad:
            scale = param.grad.abs().max().item() + 1e-12
            torch.testing.assert_close(grads[0][name], param.grad, rtol=1e-4, atol=1e-5 * scale)


def test_warmup_start_and_hold_follow_vars_lin0_within_a_step():
    """VAR's lin0 in optimizer steps (it = step - 1; warmup W steps from wp0, then the peak for
    5% of the rest, then linear to wpe at the last step), against ccalign's 1-based schedule."""
    from ccalign.train.optim import LRSchedule

    total, warmup, wp0, wpe = 1000, 20, 0.005, 0.1

    def lin0(it: int) -> float:
        if it < warmup:
            return wp0 + (1 - wp0) * it / warmup
        passed = (it - warmup) / (total - 1 - warmup)
        return 1.0 if passed < 0.05 else wpe + (1 - wpe) * (1 - passed) / 0.95

    ours = LRSchedule(1.0, total, kind="linear", warmup_steps=warmup, min_lr_ratio=wpe,
                      warmup_start_ratio=wp0, hold_ratio=0.05)
    assert ours(total) == pytest.approx(wpe) and ours(warmup) == 1.0
    assert ours(warmup + 49) == 1.0 and ours(warmup + 51) < 1.0  # the hold: 5% of 980 steps
    for step in range(1, total + 1):
        assert abs(ours(step) - lin0(step - 1)) <= 1.0 / warmup + 1e-12, step
    assert LRSchedule(1.0, 10, kind="linear", warmup_steps=2)(1) == 0.5  # defaults unchanged


def test_weight_decay_ramp_is_vars_half_cosine_on_the_decayed_group(tmp_path):
    """twd -> twde: wd(it) = twde + (twd - twde) (1 + cos(pi it / (T - 1))) / 2, it = step - 1,
    on the decayed group only."""
    import math

    from ccalign.train.trainer import Trainer

    model, _ = tiny_pair()
    g = torch.Generator().manual_seed(5)
    data = list(zip(torch.randint(0, 16, (16, SEQ), generator=g), torch.arange(16) % 5,
                    strict=True))
    config = make_config(tmp_path, train={"steps": 4},
                         optim={"weight_decay": 0.05, "final_weight_decay": 0.08})
    trainer = Trainer(config, model, data)
    seen = []
    trainer.optimizer.register_step_pre_hook(
        lambda opt, *_: seen.append([group["weight_decay"] for group in opt.param_groups]))
    trainer.fit()
    expected = [0.08 + (0.05 - 0.08) * (1 + math.cos(math.pi * it / 3)) / 2 for it in range(4)]
    assert [wd for wd, _ in seen] == pytest.approx(expected) and expected[-1] == 0.08
    assert all(nowd == 0.0 for _, nowd in seen)
