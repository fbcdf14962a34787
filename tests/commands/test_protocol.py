"""`ccalign sample NAME --protocol`: a release's published protocol applied to the flags left
unset, explicit flags overriding it, both recorded in run.json; on tiny models standing in for
the releases (offline)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ccalign.cli import main
from ccalign.models.var.sampler import VarSampler
from support.releases import tiny_llamagen_release, tiny_t2i_release, tiny_var_release

QUIET = ["--device", "cpu", "--quiet", "--no-png"]


def run_json(folder) -> dict:
    return json.loads((folder / "run.json").read_text())


def tokens(folder) -> np.ndarray:
    return np.load(folder / "tokens.npz")["tokens"]


def test_llamagen_paper_protocol_is_the_flags_spelled_out(cache, monkeypatch, tmp_path):
    tiny_llamagen_release("cca-llamagen-L-384", cache, monkeypatch, tmp_path)
    out = tmp_path / "paper"
    assert main(["sample", "cca-llamagen-L-384", "--protocol", "paper", "--num-samples", "6",
                 "--batch-size", "3", "--out", str(out), *QUIET]) == 0
    spelled = tmp_path / "spelled"
    assert main(["sample", "cca-llamagen-L-384", "--labels", "random", "--num-samples", "6",
                 "--cfg-scale", "1", "--top-k", "0", "--top-p", "1", "--weights-dtype",
                 "bfloat16", "--resize", "256", "--uint8", "round", "--batch-size", "3",
                 "--out", str(spelled), *QUIET]) == 0
    np.testing.assert_array_equal(tokens(out), tokens(spelled))
    images = np.load(out / "samples.npz")["arr_0"]
    assert images.shape == (6, 256, 256, 3)
    np.testing.assert_array_equal(images, np.load(spelled / "samples.npz")["arr_0"])
    record = run_json(out)["protocol"]
    assert record["name"] == "paper" and record["release"] == "cca-llamagen-L-384"
    assert record["values"]["published"] == {"fid": 3.43}
    assert record["overrides"] == {"num_samples": {"protocol": 50000, "given": 6}}
    labels = np.load(out / "tokens.npz")["labels"]
    assert len(set(labels.tolist())) > 1  # random labels, not class 0 six times


def test_an_explicit_flag_overrides_the_protocol_and_is_recorded(cache, monkeypatch, tmp_path):
    tiny_llamagen_release("llamagen-L-384", cache, monkeypatch, tmp_path)
    out = tmp_path / "s"
    assert main(["sample", "llamagen-L-384", "--protocol", "paper", "--classes", "1,2",
                 "--top-k", "0", "--top-p", "0.9", "--cfg-scale", "2", "--out", str(out),
                 *QUIET]) == 0
    manifest = run_json(out)
    assert manifest["sampling"]["cfg_scale"] == 2.0 and manifest["sampling"]["top_p"] == 0.9
    assert manifest["resize"] == 256 and manifest["numerics"] == {"tf32": "on"}
    assert manifest["protocol"]["overrides"] == {
        "labels": {"protocol": "random", "given": "--classes / --per-class"},
        "top_p": {"protocol": 1.0, "given": 0.9},
        "num_samples": {"protocol": 50000, "given": "--classes / --per-class"},
    }


def test_var_protocols_autocast_float16_floor_and_the_ramp(cache, monkeypatch, tmp_path):
    tiny_var_release("var-d16", cache, monkeypatch, tmp_path)
    seen = []
    original = VarSampler.generate

    def spy(self, labels, **settings):  # the dtype the head's products run in
        handle = self.model.head.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
        try:
            return original(self, labels, **settings)
        finally:
            handle.remove()

    monkeypatch.setattr(VarSampler, "generate", spy)
    out = tmp_path / "paper"
    assert main(["sample", "var-d16", "--protocol", "paper", "--num-samples", "4",
                 "--out", str(out), *QUIET]) == 0
    assert seen and set(seen) == {torch.float16}
    manifest = run_json(out)
    assert manifest["sampling"] == {"cfg_scale": 1.0, "top_k": 900, "top_p": 0.96,
                                    "official_cfg": 1.5}
    assert manifest["uint8"] == "floor" and manifest["numerics"]["autocast"] == "float16"
    assert run_json(out)["protocol"]["values"]["official_cfg"] == 1.5
    spelled = tmp_path / "spelled"
    assert main(["sample", "var-d16", "--num-samples", "4", "--var-cfg", "1.5", "--top-k", "900",
                 "--top-p", "0.96", "--weights-dtype", "float32", "--autocast", "float16",
                 "--uint8", "floor", "--out", str(spelled), *QUIET]) == 0
    np.testing.assert_array_equal(tokens(out), tokens(spelled))
    np.testing.assert_array_equal(np.load(out / "samples.npz")["arr_0"],
                                  np.load(spelled / "samples.npz")["arr_0"])
    guided = tmp_path / "guided"  # --cfg-scale replaces VAR's own guidance
    assert main(["sample", "var-d16", "--protocol", "paper", "--num-samples", "4",
                 "--cfg-scale", "2", "--out", str(guided), *QUIET]) == 0
    manifest = run_json(guided)
    assert "official_cfg" not in manifest["sampling"] and manifest["sampling"]["cfg_scale"] == 2
    assert manifest["protocol"]["overrides"]["var_cfg"] == {"protocol": 1.5,
                                                            "given": "--cfg-scale"}


def test_floor_and_round_differ_as_the_official_samplers_do():
    from ccalign.sample.images import to_uint8

    x = torch.tensor([-1.0, -0.999, 0.0, 0.5, 0.999, 1.0, 1.5]).view(1, 1, 1, -1)
    assert to_uint8(x, "round").flatten().tolist() == [0, 0, 128, 191, 255, 255, 255]
    assert to_uint8(x, "floor").flatten().tolist() == [0, 0, 127, 191, 254, 255, 255]


def test_protocols_belong_to_registry_names(tmp_path, capsys):
    assert main(["sample", str(tmp_path / "mine.pt"), "--protocol", "paper", "--out",
                 str(tmp_path / "s")]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "is not a registry name; protocols belong to the releases" in err


@pytest.mark.parametrize("name", ["cca-var-d16", "llamagen-B-256"])
def test_protocol_names_a_release_lacks_are_refused(name, tmp_path, capsys):
    assert main(["sample", name, "--protocol", "released-sampler", "--out",
                 str(tmp_path / "s")]) == 1
    assert f"{name} has no sampling protocol 'released-sampler'; it has paper" in \
        capsys.readouterr().err


def test_classes_with_a_count_record_the_count_and_autocast_float32_is_refused(
        cache, monkeypatch, tmp_path, capsys):
    tiny_llamagen_release("llamagen-L-384", cache, monkeypatch, tmp_path)
    out = tmp_path / "s"
    assert main(["sample", "llamagen-L-384", "--protocol", "paper", "--classes", "1,2",
                 "--num-samples", "4", "--out", str(out), *QUIET]) == 0
    overrides = run_json(out)["protocol"]["overrides"]
    assert overrides["num_samples"] == {"protocol": 50000, "given": 4}
    assert "labels" not in overrides  # random labels over the given classes, as the protocol
    assert main(["sample", "llamagen-L-384", "--autocast", "float32", "--classes", "1",
                 "--out", str(tmp_path / "x"), *QUIET]) == 2
    assert "invalid choice: 'float32'" in capsys.readouterr().err


def test_t2i_paper_protocol_is_sample_t2i_py(cache, monkeypatch, tmp_path):
    from ccalign.data.captions import write_caption_file

    tiny_t2i_release("llamagen-t2i-XL-256", cache, monkeypatch, tmp_path)
    mask = torch.zeros(3, 120, dtype=torch.bool)
    mask[:, -5:] = True
    features = torch.randn(3, 120, 2048) * mask[..., None]
    captions = write_caption_file(tmp_path / "c.safetensors", features, mask)
    out = tmp_path / "s"
    assert main(["sample", "llamagen-t2i-XL-256", "--protocol", "paper", "--caption-features",
                 str(captions), "--out", str(out), *QUIET]) == 0
    manifest = run_json(out)
    assert manifest["sampling"] == {"cfg_scale": 7.5, "top_k": 1000, "top_p": 1.0,
                                    "temperature": 1.0, "cfg_interval": -1}
    assert manifest["protocol"]["overrides"] == {} and manifest["numerics"] == {"tf32": "on"}
    assert tokens(out).shape == (3, 16)
