"""`ccalign demo --quick` end to end on the bundled artefacts and real Fashion-MNIST."""

import json

import pytest
import torch

from ccalign.cli import main
from ccalign.data import fashion_mnist
from ccalign.demo.bundles import BUNDLES
from ccalign.demo.pipeline import plan_settings
from ccalign.demo.settings import DemoSettings
from ccalign.models import families, llamagen

BASE_MODEL = BUNDLES["llamagen"].base_model  # the default demo's

REQUIRED = {"name", "model", "cfg_scale", "fid", "accuracy", "accuracy_mlp", "precision", "recall",
            "images_per_s"}


def test_plan_covers_base_cfg_cca_and_sweeps():
    names = [r["name"] for r in plan_settings(DemoSettings())]
    assert names == ["base", "base-cfg1.5", "base-cfg2", "base-cfg3", "cca", "cca+cfg"]
    swept = plan_settings(DemoSettings(sweep=True))
    assert {r["sweep_value"] for r in swept if r["family"] == "CCA, lambda sweep"} == {
        1.0,
        3.0,
        10.0,
        30.0,
    }
    assert len([r for r in swept if r["family"] == "base + CFG scale"]) == 7


@pytest.mark.slow
def test_quick_demo_runs_end_to_end(tmp_path):
    fashion_mnist.find_folder()  # the embedded data set must be installed (scripts/setup.sh)
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--no-progress", "--threads", "1"]) == 0
    doc = json.loads((out / "metrics.json").read_text())
    runs = {r["name"]: r for r in doc["runs"]}
    assert set(runs) == {"base", "base-cfg2", "cca", "cca+cfg"}
    for run in runs.values():
        assert REQUIRED <= run.keys()
        assert run["images_per_s"] > 0 and run["fid"] > 0 and 0 <= run["recall"] <= 1
        assert (out / "grids" / f"{run['name']}.png").read_bytes()[:4] == b"\x89PNG"
    assert runs["cca"]["model"] == "cca" and runs["base-cfg2"]["cfg_scale"] == 2.0
    assert runs["base"]["accuracy"] > 0.3  # the bundled base model is class-conditional
    report = (out / "report.md").read_text()
    assert "| base-cfg2 | base | CFG 2 |" in report and "## Reading" in report
    assert (out / "tradeoff.png").exists()
    (folder,) = out.glob("cca_*")
    tuned = llamagen.load(folder / "final.safetensors").state_dict()
    base = llamagen.load(BASE_MODEL).state_dict()
    assert any(not torch.equal(tuned[k], base[k]) for k in base)  # fine-tuning changed it


@pytest.mark.slow
def test_quick_var_demo_runs_end_to_end(tmp_path):
    from ccalign.models import var

    out = tmp_path / "demo_var"
    args = ["demo", "--family", "var", "--quick", "--out", str(out), "--no-progress"]
    assert main([*args, "--threads", "1"]) == 0
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["meta"]["family"] == "var"
    runs = {r["name"]: r for r in doc["runs"]}
    ramps = {"base-varcfg1", "base-varcfg1.5", "base-varcfg2"}  # VAR's own guidance
    assert set(runs) == {"base", "base-cfg2", "cca", "cca+cfg", *ramps}
    assert runs["base"]["accuracy"] > 0.3 and all(r["images_per_s"] > 0 for r in runs.values())
    report = (out / "report.md").read_text()
    assert report.startswith("# CCA on Fashion-MNIST (VAR)")
    assert "| base-varcfg1.5 | base | VAR ramp cfg 1.5 |" in report
    assert "Under the family's own guidance (VAR ramp cfg" in report
    (folder,) = out.glob("cca_*")
    tuned = var.load(folder / "final.safetensors").state_dict()
    base = var.load(BUNDLES["var"].base_model).state_dict()
    assert tuned.keys() == base.keys()
    assert any(not torch.equal(tuned[k], base[k]) for k in base)  # fine-tuning changed it
    assert all(torch.equal(tuned[k], base[k]) for k in base if k.startswith("quantizer."))


@pytest.mark.slow
def test_quick_t2i_demo_runs_end_to_end(tmp_path):
    out = tmp_path / "demo_t2i"
    args = ["demo", "--family", "t2i", "--quick", "--out", str(out), "--no-progress"]
    assert main([*args, "--threads", "1"]) == 0
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["meta"]["family"] == "t2i" and "caption accuracy" in doc["meta"]["accuracy_measure"]
    runs = {r["name"]: r for r in doc["runs"]}
    assert set(runs) == {"base", "base-cfg2", "cca", "cca+cfg"}
    for run in runs.values():
        assert REQUIRED <= run.keys() and run["accuracy_heldout_mlp"] is not None
        assert 0 <= run["accuracy_seen"] <= 1 and run["images_per_s"] > 0
    assert runs["base"]["item_accuracy"] > 0.25  # captioned items (chance: 0.1; 0.40 at 4000)
    report = (out / "report.md").read_text()
    assert report.startswith("# CCA on Fashion-MNIST (LlamaGen T2I)")
    assert "held-out acc CNN" in report and "Composition (caption accuracy" in report
    (folder,) = out.glob("cca_*")
    tuned = families.load_file(folder / "final.safetensors")
    assert families.of(tuned).name == "llamagen-t2i" and tuned.seq_len == 98


def test_var_plan_adds_vars_own_ramp_guidance_and_samples_it_exactly():
    from ccalign.demo.pipeline import sample_interleaved
    from ccalign.models import var

    settings = DemoSettings.for_family("var", quick=True, samples=20, curve_samples=10,
                                       batch_size=10, progress=False)
    rows = [r for r in plan_settings(settings) if r["model"] == "base"]
    assert [r["name"] for r in rows] == [
        "base", "base-cfg2", "base-varcfg1", "base-varcfg1.5", "base-varcfg2"]
    ramp = rows[3]
    assert ramp["sampler_settings"] == {"official_cfg": 1.5} and ramp["cfg_scale"] == 1.0
    base = BUNDLES["var"].load_model(BUNDLES["var"].base_model)
    drawn = sample_interleaved([rows[0], ramp], {"base": base}, settings)
    labels, tokens, _ = drawn[ramp["name"]]
    generator = torch.Generator().manual_seed(settings.seed)
    expected = var.generate(base, torch.from_numpy(labels), official_cfg=1.5, generator=generator)
    assert torch.equal(tokens, expected)
    assert not torch.equal(tokens, drawn["base"][1][: len(tokens)])  # guidance changed them
    assert drawn["speed_ratio"]["rounds"] == 1  # the ramp row counts as guided
    with pytest.raises(ValueError, match="LlamaGen models have no guidance of their own"):
        DemoSettings(own_cfg_scales=(1.5,))


def test_family_settings_and_methods(tmp_path):

    var_settings = DemoSettings.for_family("var")
    assert var_settings.base_model == BUNDLES["var"].base_model
    assert DemoSettings().base_model == BASE_MODEL
    for key, value in BUNDLES["var"].settings.items():
        assert getattr(var_settings, key) == value
    assert DemoSettings.for_family("var", lam=7.0).lam == 7.0  # the caller's change wins
    with pytest.raises(ValueError, match="fine-tunes with cca, ddo, not gft"):
        DemoSettings(family="var", methods=("cca", "gft"))
    with pytest.raises(ValueError, match="not 'dit'"):
        DemoSettings(family="dit")
    with pytest.raises(ValueError, match="holds a llamagen model.*--family llamagen"):
        BUNDLES["var"].load_model(BASE_MODEL)
    assert isinstance(BUNDLES["llamagen"].load_model(BASE_MODEL), llamagen.LlamaGen)
    official = tmp_path / "gpt.pt"  # LlamaGen's official layout records no family
    torch.save({"model": llamagen.load(BASE_MODEL).state_dict()}, official)
    with pytest.raises(ValueError, match="does not record its architecture"):
        BUNDLES["llamagen"].load_model(official)


def test_bundled_files_fit_the_25_mb_budget():
    import subprocess

    from support import REPO as root
    if not (root / ".git").exists():
        pytest.skip("not a git checkout")
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, check=True)
    paths = [root / name for name in listed.stdout.decode().split("\0") if name]
    total = sum(path.stat().st_size for path in paths if path.is_file())
    assert total <= 25_000_000, f"the repository's files take {total / 1e6:.1f} MB"


def test_bootstrap_fid_spread_equals_exact_fids_of_the_same_resamples():
    import numpy as np

    from ccalign.demo.tasks import bootstrap_fid_std
    from ccalign.eval import fid_from_features

    rng = np.random.default_rng(3)
    reference = rng.normal(size=(400, 6))
    samples = rng.normal(size=(150, 6)) * 1.3 + 0.2
    draws = np.random.default_rng(0)  # the function's own resampling stream
    exact = [fid_from_features(reference, samples[draws.integers(0, 150, 150)]) for _ in range(5)]
    assert bootstrap_fid_std(reference, samples, rounds=5) == pytest.approx(np.std(exact), rel=1e-6)


def test_interleaved_sampling_equals_each_setting_alone_and_times_every_batch():
    from ccalign.demo.pipeline import sample_interleaved, speed_ratio
    from ccalign.sample import Sampler

    settings = DemoSettings.quick(samples=30, curve_samples=10, batch_size=10, progress=False)
    base = llamagen.load(BASE_MODEL).eval()
    rows = [r for r in plan_settings(settings) if r["model"] == "base"]
    drawn = sample_interleaved(rows, {"base": base}, settings)
    for row in rows:
        labels, tokens, speed = drawn[row["name"]]
        assert len(labels) == (30 if row["headline"] else 10) and speed > 0
        alone, generator = Sampler(base), torch.Generator().manual_seed(settings.seed)
        expected = torch.cat(
            [
                alone.generate(
                    torch.from_numpy(labels[i : i + 10]),
                    cfg_scale=row["cfg_scale"],
                    generator=generator,
                )
                for i in range(0, len(labels), 10)
            ]
        )
        assert torch.equal(tokens, expected), row["name"]
    assert drawn["speed_ratio"]["rounds"] == 1  # CFG (10 samples) ran in the first round only
    rounds = [{"free": [300.0, 100.0], "cfg": [100.0]}, {"free": [200.0], "cfg": [50.0, 150.0]}]
    ratio = speed_ratio([*rounds, {"free": [90.0], "cfg": []}])  # a round without CFG is skipped
    assert ratio == {"median": 2.0, "min": 2.0, "max": 2.0, "rounds": 2}


def test_the_tuning_split_evaluates_on_images_and_seeds_the_report_never_uses():
    report, tune = DemoSettings(), DemoSettings(split="tune")
    assert report.reference_slice == slice(0, 5000) and tune.reference_slice == slice(5000, 10000)
    assert report.sample_seed == 0 and tune.sample_seed != 0
    assert DemoSettings(split="tune", seed=3).sample_seed == tune.sample_seed + 3
    with pytest.raises(ValueError, match="split 'dev': choose one of report, tune"):
        DemoSettings(split="dev")
