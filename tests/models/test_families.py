"""The family registry: which family a file, a release, a preset or a spec belongs to; loading a
release by name with what the registry records; registering; capabilities against methods."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ccalign import hub
from ccalign.models import families, llamagen, var
from ccalign.models.family import BaseFamily, ModelSpec
from ccalign.tokenizers import var_vq
from ccalign.train import methods
from support.hub import put
from support.tiny import random_model
from support.tiny_var import TINY, VQ, tiny_pair


def test_a_spec_is_identified_by_family_registry_file_preset_options_or_the_default(tmp_path):
    gpt, (vq_var, _) = random_model(), tiny_pair()
    llamagen.save(gpt, tmp_path / "gpt.safetensors")
    torch.save({"model": gpt.state_dict()}, tmp_path / "gpt.pt")  # LlamaGen's official layout
    var.save(vq_var, tmp_path / "var.safetensors")
    var.save(vq_var, tmp_path / "var.pth", official=True)  # VAR's raw state_dict
    expected = [
        (ModelSpec(init=str(tmp_path / "gpt.safetensors"), preset="VAR-d16"), llamagen.FAMILY),
        (ModelSpec(init=str(tmp_path / "gpt.pt")), llamagen.FAMILY),
        (ModelSpec(init=str(tmp_path / "var.safetensors")), var.FAMILY),
        (ModelSpec(init=str(tmp_path / "var.pth"), preset="GPT-L"), var.FAMILY),  # the file wins
        (ModelSpec(init="var-d16"), var.FAMILY),  # the registry, nothing downloaded
        (ModelSpec(init="gft-llamagen-L-384"), llamagen.FAMILY),
        (ModelSpec(preset="VAR-d20"), var.FAMILY),
        (ModelSpec(preset="custom", options={"vae": "fmnist-msvq"}), var.FAMILY),
        (ModelSpec(preset="custom"), llamagen.FAMILY),  # the default
        (ModelSpec(preset="GPT-B", family="var"), var.FAMILY),  # said outright
    ]
    for spec, family in expected:
        assert families.identify(spec) is family, spec
    assert families.of(gpt) is llamagen.FAMILY and families.of(vq_var) is var.FAMILY
    with pytest.raises(ValueError, match="no model family 'dit' is registered"):
        families.get("dit")
    with pytest.raises(ValueError, match="model.vae is not read by LlamaGen models"):
        families.create(ModelSpec(init=str(tmp_path / "gpt.safetensors"),
                                  options={"vae": "fmnist-msvq"}))


def test_a_var_release_loads_by_name_with_its_own_vqvae(cache, monkeypatch, tmp_path):
    """The registry entry gives the preset and the VQVAE (var-vae) whose quantiser the model
    needs; the official files carry neither."""
    model, vae = tiny_pair(seed=2)
    monkeypatch.setitem(var.PRESETS, "VAR-tiny", {k: v for k, v in TINY.items()})
    entry, codec = hub.REGISTRY["var-d16"], hub.REGISTRY["var-vae"]
    monkeypatch.setitem(hub.REGISTRY, entry.name, dataclasses.replace(entry, preset="VAR-tiny"))
    var.save(model, tmp_path / "var_d16.pth", official=True)
    torch.save(vae.state_dict(), tmp_path / "vae.pth")  # VAR's raw VQVAE layout
    put(cache, entry.repo, entry.file, (tmp_path / "var_d16.pth").read_bytes())
    put(cache, codec.repo, codec.file, (tmp_path / "vae.pth").read_bytes())
    loaded = families.create(ModelSpec(init="var-d16")).eval()
    labels = torch.tensor([0, 4])
    tokens = torch.randint(0, VQ["vocab_size"], (2, loaded.seq_len))
    with torch.no_grad():
        assert torch.equal(loaded.logits(labels, tokens), model.eval().logits(labels, tokens))
    assert isinstance(var.FAMILY.codec_for(ModelSpec(init="var-d16"), "test"), var_vq.VarVQ)


def test_register_checks_the_interface_and_refuses_a_taken_name():
    class Incomplete:
        name = "half"

    with pytest.raises(TypeError, match="is not a model family: it lacks"):
        families.register(Incomplete())

    class Impostor(BaseFamily):
        name, title, model_class, presets = "llamagen", "not LlamaGen", torch.nn.Linear, {}
        sampler = activations = None

    with pytest.raises(ValueError, match="'llamagen' is registered already"):
        families.register(Impostor())
    assert families.register(llamagen.FAMILY) is llamagen.FAMILY  # again: a no-op


def test_methods_require_capabilities_that_families_declare():
    gft = methods.get("gft")
    assert gft.refusal(llamagen.FAMILY) is None
    refusal = gft.refusal(var.FAMILY)
    assert "method gft does not train VAR models: GFT needs a beta embedding" in refusal
    assert "use cca, ddo, dpo, unlearning, mle" in refusal
    assert all(methods.get(name).refusal(var.FAMILY) is None for name in ("cca", "ddo", "mle"))
    assert "retokenize" in var.FAMILY.capabilities
    assert "retokenize" not in llamagen.FAMILY.capabilities
