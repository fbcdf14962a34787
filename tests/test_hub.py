"""Released checkpoints by name: the registry, resolution through a Hugging Face cache built here
(offline), the one-line failure for a file that is not cached, `ccalign models`, the commands
that take names, and `ccalign export` round trips."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub.constants
import huggingface_hub.utils
import numpy as np
import pytest
import torch
from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError

from ccalign import hub, tokenizers
from ccalign.cli import main
from ccalign.errors import UserError
from ccalign.models import families, llamagen
from ccalign.train.build import model_from_config
from ccalign.train.config import ModelSection
from support.hub import COMMIT_A, COMMIT_B, put

LLAMAGEN = "FoundationVision/LlamaGen"
TINY = dict(n_layer=1, n_head=2, dim=32)


@pytest.fixture
def tiny_preset(monkeypatch):
    """A tiny LlamaGen preset standing in for GPT-L under the registry name llamagen-L-384."""
    monkeypatch.setitem(llamagen.PRESETS, "GPT-tiny", TINY)
    entry = hub.REGISTRY["llamagen-L-384"]
    monkeypatch.setitem(
        hub.REGISTRY, entry.name, dataclasses.replace(entry, preset="GPT-tiny", grid=4)
    )


def tiny_gpt(seed: int = 0) -> llamagen.LlamaGen:
    torch.manual_seed(seed)
    model = llamagen.build("GPT-tiny", grid=4)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model.eval()


def tiny_vq() -> tokenizers.VQModel:
    torch.manual_seed(0)
    return tokenizers.build(
        "VQ-16", ch=32, ch_mult=(1, 1), z_channels=32, num_res_blocks=1, usage_window=0
    ).eval()


def official_bytes(state_dict: dict, tmp_path: Path) -> bytes:
    path = tmp_path / "official.pt"
    torch.save({"model": state_dict}, path)
    return path.read_bytes()


def logits(model: llamagen.LlamaGen) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, model.vocab_size, (3, model.seq_len), generator=generator)
    with torch.no_grad():
        return model.logits(torch.tensor([0, 7, 999]), tokens)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    return err


# ---- the registry ----


def test_every_release_names_a_registered_family_tokenizer_and_preset():
    for name, release in hub.REGISTRY.items():
        family = families.get(release.family)  # the families' own words, models and codecs
        assert release.name == name and release.kind in ("model", "tokenizer")
        assert release.tokenizer is None or hub.REGISTRY[release.tokenizer].kind == "tokenizer"
        assert (release.grid is None) == (release.kind == "tokenizer")
        if release.kind == "model":
            assert release.preset in family.presets
            assert set(release.options) <= family.capabilities  # GFT: the beta embedding
        if release.kind == "model" and family is llamagen.FAMILY:
            assert release.grid == int(name.rsplit("-", 1)[1]) // 16  # 256 px: 16, 384 px: 24
        if release.kind == "tokenizer" and family is llamagen.FAMILY:
            assert release.preset in tokenizers.NAMES
    assert hub.REGISTRY["gft-llamagen-L-384"].options == {"beta_embedding": True}
    assert hub.REGISTRY["cca-llamagen-L-384"].file.endswith("c2i_L_384_CCA_0005000.pt")
    assert hub.REGISTRY["var-d16"].uri == "hf://FoundationVision/var/var_d16.pth"


def test_uris_parse_with_and_without_a_revision():
    assert hub.parse_uri("hf://o/r/f.pt") == ("o/r", None, "f.pt")
    assert hub.parse_uri("hf://o/r@v1.0/sub/f.pt") == ("o/r", "v1.0", "sub/f.pt")
    assert hub.parse_uri("hf://o/r@refs/pr/3/f.pt") == ("o/r", "refs/pr/3", "f.pt")
    for bad in ("hf://o/r", "hf://o", "hf://o/r@v1"):
        with pytest.raises(ValueError, match="is not a Hub file URI"):
            hub.parse_uri(bad)


# ---- resolution through the cache ----


def test_names_and_uris_resolve_to_the_cached_files(cache, tmp_path):
    gpt = put(cache, LLAMAGEN, "c2i_L_384.pt", b"gpt")
    cca_file = "CCA_LlamaGen_Guidance_Free/c2i_L_384_CCA_0005000.pt"
    cca = put(cache, "ChenDRAG/CCA_LlamaGen", cca_file, b"cca")
    assert hub.resolve("llamagen-L-384") == gpt
    assert hub.resolve("llamagen-L-384").read_bytes() == b"gpt"
    assert hub.resolve(f"hf://{LLAMAGEN}/c2i_L_384.pt") == gpt
    assert hub.resolve("cca-llamagen-L-384").read_bytes() == b"cca"
    assert hub.resolve(f"hf://ChenDRAG/CCA_LlamaGen/{cca_file}") == cca
    local = tmp_path / "mine.pt"
    assert hub.resolve(local) == local and hub.resolve(str(local)) == local  # paths unchanged
    assert hub.find(local) is None and hub.find("llamagen-L-384@v1").name == "llamagen-L-384"


def test_a_local_file_wins_over_a_registry_name(cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("llamagen-L-384").write_bytes(b"local")
    assert hub.find("llamagen-L-384") is None
    assert hub.resolve("llamagen-L-384") == Path("llamagen-L-384")


def test_revisions_pick_their_snapshot(cache):
    put(cache, LLAMAGEN, "c2i_L_384.pt", b"old", COMMIT_A, refs=("v1",))
    put(cache, LLAMAGEN, "c2i_L_384.pt", b"new", COMMIT_B, refs=("main",))
    assert hub.resolve("llamagen-L-384").read_bytes() == b"new"
    assert hub.resolve("llamagen-L-384@v1").read_bytes() == b"old"
    assert hub.resolve(f"llamagen-L-384@{COMMIT_A}").read_bytes() == b"old"
    assert hub.resolve(f"hf://{LLAMAGEN}@v1/c2i_L_384.pt").read_bytes() == b"old"
    assert hub.resolve(f"hf://{LLAMAGEN}@{COMMIT_B}/c2i_L_384.pt").read_bytes() == b"new"
    with pytest.raises(UserError, match="at revision v2 is not in the Hugging Face cache"):
        hub.resolve("llamagen-L-384@v2")


def test_a_name_missing_from_the_cache_fails_offline_in_one_line(cache, tmp_path, capsys):
    assert main(["sample", "llamagen-XL-384", "--out", str(tmp_path / "s"), "--classes", "1",
                 "--device", "cpu"]) == 1
    err = one_line_error(capsys)
    assert "c2i_XL_384.pt of the Hub repo FoundationVision/LlamaGen is not in" in err
    assert str(cache) in err and "HF_HUB_OFFLINE is set" in err
    assert "`hf download FoundationVision/LlamaGen c2i_XL_384.pt`" in err
    assert main(["extract-codes", "fashion-mnist:test", "--tokenizer", "llamagen-vq8",
                 "--out", str(tmp_path / "codes")]) == 1
    assert "`hf download FoundationVision/LlamaGen vq_ds8_c2i.pt`" in one_line_error(capsys)
    assert main(["export", f"hf://{LLAMAGEN}@v3/c2i_B_256.pt", "--format", "official",
                 "--out", str(tmp_path / "x.pt")]) == 1
    assert "--revision v3`" in one_line_error(capsys)


def _http_error(kind: str) -> Exception:
    """An error of huggingface_hub's kind ``kind``, as its HTTP layer raises it."""
    response = SimpleNamespace(headers={}, status_code=404, url="u", request=None)
    message = "404 Client Error.\nEntry Not Found for url: u"
    return getattr(huggingface_hub.utils, kind)(message, response=response)


@pytest.mark.parametrize(
    ("error", "message"),
    [
        (lambda: _http_error("GatedRepoError"), "the repo is gated; accept its terms"),
        (lambda: _http_error("RepositoryNotFoundError"), "no such repo (or it is private"),
        (lambda: _http_error("RevisionNotFoundError"), "the repo has no revision 'v9'"),
        (lambda: _http_error("HfHubHTTPError"), "could not be downloaded: 404 Client Error."),
        (lambda: EntryNotFoundError("gone"), "the repo has no such file"),
        (lambda: LocalEntryNotFoundError("no"), "is not in the Hugging Face cache"),
    ],
)
def test_hub_failures_become_one_line_naming_file_and_repo(cache, monkeypatch, error, message):
    def fail(*args, **kwargs):
        raise error()

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fail)
    with pytest.raises(UserError) as raised:
        hub.resolve("llamagen-B-256@v9")
    text = str(raised.value)
    assert "\n" not in text and message in text
    assert "c2i_B_256.pt of the Hub repo FoundationVision/LlamaGen at revision v9" in text
    if "cache" in message:
        assert "the Hub cannot be reached" in text and "check the network" in text


def test_wrong_kind_and_families_not_loadable_yet_are_refused_before_download(
    cache, capsys, tmp_path, monkeypatch
):
    with pytest.raises(UserError, match="llamagen-vq16 is a LlamaGen VQ tokenizer, not a model"):
        hub.resolve("llamagen-vq16", kind="model")
    with pytest.raises(UserError, match="llamagen-L-384 is a LlamaGen GPT, not a tokenizer"):
        tokenizers.load("llamagen-L-384")
    monkeypatch.setattr(families, "_REGISTRY", {"llamagen": llamagen.FAMILY})
    assert main(["sample", "var-d16", "--out", str(tmp_path / "s"), "--classes", "1"]) == 1
    err = one_line_error(capsys)
    assert "var-d16 is a VAR checkpoint (family 'var'), which this version of ccalign cannot " \
           "load: no such family is registered" in err


# ---- the commands ----


def test_sample_a_registry_name_end_to_end(cache, tiny_preset, tmp_path, capsys):
    """The name brings the preset, the grid and the tokenizer: the same run as from the files
    with every option spelled out."""
    model, vq = tiny_gpt(), tiny_vq()
    gpt_path = put(cache, LLAMAGEN, "c2i_L_384.pt", official_bytes(model.state_dict(), tmp_path))
    vq_path = put(cache, LLAMAGEN, "vq_ds16_c2i.pt", official_bytes(vq.state_dict(), tmp_path))
    common = ["--classes", "1,2", "--device", "cpu", "--quiet", "--batch-size", "2", "--no-png"]
    assert main(["sample", "llamagen-L-384", "--out", str(tmp_path / "named"), *common]) == 0
    assert main(["sample", str(gpt_path), "--model", "GPT-tiny", "--grid", "4", "--tokenizer",
                 str(vq_path), "--out", str(tmp_path / "files"), *common]) == 0
    named, files = np.load(tmp_path / "named" / "tokens.npz"), np.load(tmp_path / "files" /
                                                                        "tokens.npz")
    assert named["tokens"].shape == (2, 16)
    np.testing.assert_array_equal(named["tokens"], files["tokens"])
    images = np.load(tmp_path / "named" / "samples.npz")["arr_0"]
    assert images.shape == (2, 8, 8, 3)  # decoded by the registry's tokenizer at grid 4
    np.testing.assert_array_equal(images, np.load(tmp_path / "files" / "samples.npz")["arr_0"])


def test_finetune_init_and_data_tokenizer_take_names(cache, tiny_preset, tmp_path):
    model, vq = tiny_gpt(), tiny_vq()
    put(cache, LLAMAGEN, "c2i_L_384.pt", official_bytes(model.state_dict(), tmp_path))
    put(cache, LLAMAGEN, "vq_ds16_c2i.pt", official_bytes(vq.state_dict(), tmp_path))
    # the registry's preset and grid win over the section's defaults (GPT-L, 24)
    loaded = model_from_config(ModelSection(init="llamagen-L-384", arch={"token_dropout": 0.0}))
    assert loaded.config.grid == 4 and loaded.config.token_dropout == 0.0
    assert torch.equal(logits(loaded.eval()), logits(model))
    by_uri = model_from_config(ModelSection(name="GPT-tiny", grid=4,
                                            init=f"hf://{LLAMAGEN}/c2i_L_384.pt"))
    assert torch.equal(logits(by_uri.eval()), logits(model))
    named = tokenizers.load("llamagen-vq16")
    for key, value in vq.state_dict().items():
        assert torch.equal(named.state_dict()[key], value)


def test_models_lists_the_registry_with_cached_flags(cache, capsys):
    put(cache, LLAMAGEN, "c2i_L_384.pt", b"gpt")
    assert main(["models"]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()}
    assert set(hub.REGISTRY) <= set(rows)
    assert rows["llamagen-L-384"] == ["llamagen-L-384", "llamagen", "model", "GPT-L", "24",
                                      "llamagen-vq16", "yes", f"hf://{LLAMAGEN}/c2i_L_384.pt"]
    assert rows["llamagen-L-256"][6] == "no"
    assert rows["var-d16"][1:6] == ["var", "model", "VAR-d16", "16", "var-vae"]
    assert rows["var-vae"][1:3] == ["var", "tokenizer"]
    assert main(["models", "--family", "var"]) == 0
    lines = capsys.readouterr().out.splitlines()[1:-1]
    shown = [line.split()[0] for line in lines if not line.startswith(" ")]
    assert "var-vae" in shown and all(n.startswith(("var", "cca-var", "ddo-var")) for n in shown)
    protocols = [line.strip() for line in lines if line.startswith(" ")]
    assert "protocol: 50k balanced, cfg 1 (0 official), top-k 900, top-p 0.96, 256, fp32+fp16 " \
        "autocast, FID 4.03" in protocols
    assert main(["models", "--family", "dit"]) == 1
    assert "--family 'dit': choose one of" in one_line_error(capsys)


def test_models_json_carries_every_release_and_its_protocol(cache, capsys):
    put(cache, "ChenDRAG/CCA_VAR", "CCA_VAR_Guidance_Free/VAR_d16_CCA.pth", b"var")
    assert main(["models", "--json"]) == 0
    records = {r["name"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert set(records) == set(hub.REGISTRY)
    keys = {"labels", "num_samples", "cfg_scale", "top_k", "top_p", "temperature",
            "weights_dtype", "autocast_dtype", "image_size", "resize", "published", "source"}
    for name, record in records.items():
        assert {"name", "family", "preset", "grid", "tokenizer", "file", "cached",
                "protocol"} <= record.keys()
        if hub.REGISTRY[name].family == "llamagen-t2i" and record["kind"] == "model":
            assert record["protocol"]["published"] == {} and record["protocol"]["cfg_scale"] == 7.5
        elif hub.REGISTRY[name].family == "janus":  # generation_inference.py: cfg 5, 384 px
            assert keys <= record["protocol"].keys() and record["protocol"]["published"] == {}
            assert (record["protocol"]["cfg_scale"], record["protocol"]["image_size"]) == (5, 384)
        elif hub.REGISTRY[name].kind == "model":
            assert keys <= record["protocol"].keys() and record["protocol"]["published"]["fid"]
        else:
            assert record["protocol"] is None
    assert records["cca-var-d16"]["cached"] and not records["cca-var-d20"]["cached"]


# the CCA releases' protocols, as thu-ml/CCA's sampling scripts run them (docs/protocols.md)
CCA_LLAMAGEN = dict(labels="random", num_samples=50000, cfg_scale=1.0, top_k=0, top_p=1.0,
                    temperature=1.0, weights_dtype="bfloat16", autocast_dtype=None,
                    image_size=384, resize=256, uint8="round")
CCA_VAR = dict(labels="balanced", num_samples=50000, cfg_scale=1.0, official_cfg=0.0, top_k=900,
               top_p=0.96, weights_dtype="float32", autocast_dtype="float16", image_size=256,
               resize=None, uint8="floor")


@pytest.mark.parametrize("name, expected, fid", [
    ("cca-llamagen-B-384", CCA_LLAMAGEN, 7.04), ("cca-llamagen-L-384", CCA_LLAMAGEN, 3.43),
    ("cca-llamagen-XL-384", CCA_LLAMAGEN, 3.10), ("cca-llamagen-XXL-384", CCA_LLAMAGEN, 3.12),
    ("cca-llamagen-3B-384", CCA_LLAMAGEN, 2.69), ("cca-var-d16", CCA_VAR, 4.03),
    ("cca-var-d20", CCA_VAR, 3.02), ("cca-var-d24", CCA_VAR, 2.63), ("cca-var-d30", CCA_VAR, 2.54),
])
def test_cca_protocols_are_the_official_scripts(name, expected, fid):
    protocol = hub.REGISTRY[name].protocol.to_dict()
    assert {key: protocol[key] for key in expected} == expected
    assert protocol["published"] == {"fid": fid} and protocol["tf32"]
    assert protocol["source"].startswith("thu-ml/CCA@7d5a0730 ")


def test_base_and_gft_protocols():
    var = hub.REGISTRY["var-d16"].protocol
    assert (var.cfg_scale, var.official_cfg) == (2.5, 1.5)
    assert dict(var.settings) == {"official_cfg": 1.5}
    assert [hub.REGISTRY[f"llamagen-{s}-384"].protocol.cfg_scale
            for s in ("B", "L", "XL", "XXL", "3B")] == [2.0, 2.0, 1.75, 1.75, 1.65]
    gft = hub.REGISTRY["gft-llamagen-L-384"]
    assert dict(gft.protocol.settings) == {"gft_beta": 0.66}
    assert dict(gft.find_protocol("released-sampler").settings) == {
        "gft_beta": 0.66, "gft_numerics": "released"}
    with pytest.raises(hub.UserError, match="cca-var-d16 has no sampling protocol "
                       "'released-sampler'; it has paper"):
        hub.REGISTRY["cca-var-d16"].find_protocol("released-sampler")


# ---- export ----


def test_export_official_round_trip_gives_identical_logits(tiny_preset, tmp_path):
    model = tiny_gpt()
    source = tmp_path / "model.safetensors"
    llamagen.save(model, source)
    out = tmp_path / "export" / "c2i_tiny.pt"
    assert main(["export", str(source), "--format", "official", "--out", str(out)]) == 0
    saved = torch.load(out, map_location="cpu", weights_only=True)
    assert list(saved) == ["model"] and saved["model"].keys() == model.state_dict().keys()
    assert torch.equal(logits(llamagen.load(out, "GPT-tiny", grid=4).eval()), logits(model))


def test_export_safetensors_with_config_json_from_a_registry_name(cache, tiny_preset, tmp_path):
    model = tiny_gpt(seed=3)
    put(cache, LLAMAGEN, "c2i_L_384.pt", official_bytes(model.state_dict(), tmp_path))
    out = tmp_path / "export" / "model.safetensors"
    assert main(["export", "llamagen-L-384", "--format", "safetensors", "--out", str(out)]) == 0
    config = json.loads((out.parent / "config.json").read_text())
    assert config == {"family": "llamagen", **model.config.to_dict()}
    exported = llamagen.load(out).eval()  # the file carries its own config
    assert exported.config == model.config
    assert torch.equal(logits(exported), logits(model))


def test_export_a_gft_release_by_name(cache, monkeypatch, tmp_path):
    """A GFT release is a LlamaGen model with a beta embedding: export reads it by name (the
    exporters were keyed by registry family, and "gft" had none: a KeyError)."""
    monkeypatch.setitem(llamagen.PRESETS, "GPT-tiny", TINY)
    entry = hub.REGISTRY["gft-llamagen-L-384"]
    monkeypatch.setitem(
        hub.REGISTRY, entry.name, dataclasses.replace(entry, preset="GPT-tiny", grid=4)
    )
    torch.manual_seed(0)
    model = llamagen.build("GPT-tiny", grid=4, beta_embedding=True)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    put(cache, entry.repo, entry.file, official_bytes(model.state_dict(), tmp_path))
    out = tmp_path / "export" / "gft.safetensors"
    assert main(["export", "gft-llamagen-L-384", "--format", "safetensors", "--out", str(out)]) == 0
    exported = llamagen.load(out).eval()
    assert exported.config.beta_embedding and exported.accepts_beta
    tokens = torch.randint(0, model.vocab_size, (2, model.seq_len))
    labels = torch.tensor([0, 3])
    with torch.no_grad():
        assert torch.equal(exported.logits(labels, tokens, beta=0.7),
                           model.eval().logits(labels, tokens, beta=0.7))
    official = tmp_path / "export" / "gft.pt"
    assert main(["export", "gft-llamagen-L-384", "--format", "official", "--out",
                 str(official)]) == 0
    assert "t_embedder.mlp.0.weight" in torch.load(official, weights_only=True)["model"]


def test_eval_takes_its_feature_network_as_an_hf_uri(cache, tmp_path):
    from ccalign.eval.classifier import ClassifierConfig, FashionClassifier, save_classifier

    torch.manual_seed(0)
    classifier = FashionClassifier(ClassifierConfig(channels=(4, 8), feature_dim=16)).eval()
    path = save_classifier(classifier, tmp_path / "clf.safetensors")
    put(cache, "someone/fmnist-classifier", "clf.safetensors", path.read_bytes())
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "samples.npz", rng.integers(0, 256, (12, 28, 28), dtype=np.uint8))
    np.savez(tmp_path / "ref.npz", rng.integers(0, 256, (16, 28, 28), dtype=np.uint8))
    results = []
    for weights in (str(path), "hf://someone/fmnist-classifier/clf.safetensors"):
        out = tmp_path / f"metrics{len(results)}.json"
        assert main(["eval", "--samples", str(tmp_path / "samples.npz"), "--ref",
                     str(tmp_path / "ref.npz"), "--features", "fmnist", "--classifier", weights,
                     "--device", "cpu", "--is-splits", "2", "--out", str(out),
                     "--no-progress"]) == 0
        results.append(json.loads(out.read_text()))
    assert results[0] == results[1]


def test_a_typo_of_a_registry_name_suggests_the_nearest_names(tmp_path, capsys):
    """It read as a missing file ("checkpoint not found"), or a dry run planned the default
    preset for it."""
    assert main(["sample", "llamagen-L-38", "--out", str(tmp_path / "s")]) == 1
    err = capsys.readouterr().err
    assert "'llamagen-L-38' is neither a file nor a registry name" in err
    assert "did you mean llamagen-L-384" in err
    assert "`ccalign models` lists them" in err
    assert main(["finetune", "--init", "cca-llamagen-XL-348", "--dry-run"]) == 1
    assert "did you mean cca-llamagen-XL-384" in capsys.readouterr().err
    assert main(["sample", "foo", "--out", str(tmp_path / "s")]) == 1  # nothing close: not found
    assert "checkpoint not found: foo" in capsys.readouterr().err
