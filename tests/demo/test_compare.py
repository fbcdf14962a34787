"""`ccalign demo --methods cca,gft,ddo`: rows per method, matched budgets, the comparison report."""

import json
from pathlib import Path

import pytest

from ccalign.cli import main
from ccalign.data import fashion_mnist
from ccalign.demo import recipes
from ccalign.demo.compare import cfg_fid_at
from ccalign.demo.pipeline import plan_settings
from ccalign.demo.settings import DemoSettings
from ccalign.models import llamagen


def test_methods_parse_in_canonical_order_and_reject_unknown_names():
    assert recipes.parse_methods("ddo, cca") == ("cca", "ddo")
    assert recipes.parse_methods("GFT") == ("gft",)
    for bad in ("cca,cfg", "", ","):
        with pytest.raises(ValueError, match="--methods"):
            recipes.parse_methods(bad)


def test_plan_rows_per_method():
    def names(methods):
        return [r["name"] for r in plan_settings(DemoSettings(methods=methods))]

    base = ["base", "base-cfg1.5", "base-cfg2", "base-cfg3"]
    assert names(("cca",)) == [*base, "cca", "cca+cfg"]  # the default demo is unchanged
    assert names(("gft",)) == [*base, "gft", "gft-s1.25", "gft-s1.5", "gft-s2"]
    assert names(("ddo",)) == [*base, "ddo", "ddo+cfg"]  # what DDO's null rows keep usable
    rows = {r["name"]: r for r in plan_settings(DemoSettings(methods=("cca", "gft", "ddo")))}
    for name in ("cca", "gft", "ddo"):
        assert rows[name]["model"] == name and rows[name]["cfg_scale"] == 1.0
        assert rows[name]["headline"]  # the full sample count
    assert rows["gft"]["gft_beta"] == 1.0 and rows["gft-s1.5"]["gft_beta"] == pytest.approx(1 / 1.5)
    assert rows["gft-s2"]["gft_beta"] == 0.5 and not rows["gft-s2"]["headline"]
    assert "gft_beta" not in rows["ddo"] and "gft_beta" not in rows["cca"]


def test_matched_budget_of_the_recipes(tmp_path):
    settings = DemoSettings(methods=("cca", "gft", "ddo"))
    codes = {"path": str(tmp_path / "codes.safetensors")}
    cca = recipes.cca_config(settings, codes, tmp_path, settings.lam)
    gft = recipes.gft_config(settings, codes, tmp_path)
    ddo = recipes.ddo_config(settings, codes, tmp_path)
    assert settings.rows_per_step == 128
    assert cca.train.global_batch == 64  # pairs: x 2 labels = 128 policy rows
    assert gft.train.global_batch == 128  # images: 128 conditional rows
    u = ddo.method.uncond_ratio
    assert ddo.train.global_batch * (2 - u) == pytest.approx(128, abs=1)  # data + negatives
    assert cca.train.steps == gft.train.steps == 150
    assert ddo.train.steps * ddo.method.rounds == 150 and ddo.method.rounds == 3
    assert ddo.method.dropout == "none" and ddo.method.negatives == "file"
    assert gft.model.init == cca.model.init == ddo.model.init == str(settings.base_model)


def test_run_folders_are_named_by_the_method_and_a_hash_of_the_config(tmp_path):
    codes = {"path": str(tmp_path / "codes.safetensors"),
             "captions": str(tmp_path / "captions.safetensors")}

    def folders(settings):
        return {
            method: recipes.get(method).variants(settings, codes, tmp_path)[0].config
            for method in ("cca", "gft", "ddo")
        }

    plain = {m: c.checkpoint.out for m, c in folders(DemoSettings()).items()}
    for method, out in plain.items():
        assert Path(out).parent == tmp_path and Path(out).name.startswith(f"{method}_")
    changed = {m: c.checkpoint.out for m, c in folders(DemoSettings(ddo_alpha=10.0)).items()}
    assert changed["ddo"] != plain["ddo"]
    assert changed["gft"] == plain["gft"] and changed["cca"] == plain["cca"]  # not theirs
    shorter = folders(DemoSettings(steps=10))
    assert all(shorter[m].checkpoint.out != plain[m] for m in plain)
    # the folder does not depend on where the demo writes, only on the recipe
    moved = {key: str(tmp_path / "x" / Path(path).name) for key, path in codes.items()}
    elsewhere = recipes.gft_config(DemoSettings(), moved, tmp_path)
    assert elsewhere.checkpoint.out == plain["gft"]


def test_cfg_curve_interpolation():
    curve = [dict(accuracy=0.8, fid=30.0), dict(accuracy=0.9, fid=40.0)]
    assert cfg_fid_at(0.85, curve) == pytest.approx(35.0)
    assert cfg_fid_at(0.95, curve) is None and cfg_fid_at(0.7, curve) is None


@pytest.mark.slow
def test_quick_comparison_runs_end_to_end(tmp_path):
    fashion_mnist.find_folder()  # the embedded data set must be installed (scripts/setup.sh)
    out = tmp_path / "demo"
    argv = ["demo", "--quick", "--methods", "cca,gft,ddo", "--out", str(out)]
    assert main([*argv, "--no-progress", "--threads", "1"]) == 0
    doc = json.loads((out / "metrics.json").read_text())
    runs, meta = {r["name"]: r for r in doc["runs"]}, doc["meta"]
    assert set(runs) == {"base", "base-cfg2", "cca", "cca+cfg", "gft", "gft-s3", "ddo",
                         "ddo+cfg"}
    for name in ("cca", "gft", "ddo"):
        assert runs[name]["model"] == name and runs[name]["cfg_scale"] == 1.0
        assert runs[name]["fid"] > 0 and runs[name]["images_per_s"] > 0
        assert meta[name]["finetune_seconds"] > 0
    quick = DemoSettings.quick()
    assert meta["methods"] == ["cca", "gft", "ddo"]
    assert meta["budget"] == {"steps": quick.steps, "rows_per_step": quick.rows_per_step}
    for name in ("cca", "gft"):
        assert meta[name]["steps"] == quick.steps
        assert meta[name]["rows_per_step"] == meta[name]["nograd_rows_per_step"] == 32
    ddo = meta["ddo"]
    assert ddo["steps"] == ddo["rounds"] * ddo["steps_per_round"] == quick.steps
    # the negatives actually drawn: every conditional row got one, about half the rows
    assert ddo["rows_per_step_measured"] == pytest.approx(32, rel=0.2)
    assert 0 < ddo["negatives"] < ddo["images_per_step"] * ddo["steps"]
    assert 0 <= ddo["negatives_seconds"] <= ddo["finetune_seconds"]
    (gft_folder,) = out.glob("gft_*")
    assert "t_embedder.mlp.0.weight" in llamagen.load(gft_folder / "final.safetensors").state_dict()
    report = (out / "report.md").read_text()
    assert "| DDO | alpha 50" in report and "## Reading" in report
    assert "| gft | gft | none |" in report
    assert (out / "tradeoff.png").read_bytes()[:4] == b"\x89PNG"


def test_accuracy_ranking_names_a_method_only_when_both_classifiers_agree():
    from ccalign.demo.compare import accuracy_ranking

    gft = {"model": "gft", "accuracy": 0.90, "accuracy_mlp": 0.93}
    ddo = {"model": "ddo", "accuracy": 0.92, "accuracy_mlp": 0.91}
    assert "the classifiers disagree, so no method is ranked first" in accuracy_ranking([gft, ddo])
    ddo["accuracy_mlp"] = 0.95
    assert accuracy_ranking([gft, ddo]).startswith("highest accuracy by both classifiers: DDO")
