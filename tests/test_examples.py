"""examples/own_family.py: a family defined in one file goes through the whole library."""

import json
import subprocess
import sys

import pytest

from support import REPO


@pytest.mark.slow
def test_own_family_example_trains_samples_and_exports(tmp_path):
    """A fresh process runs the example (its quick sizes): registered, planned, pretrained,
    fine-tuned with CCA, sampled guidance-free and with CFG, exported, reloaded."""
    out = tmp_path / "own"
    done = subprocess.run(
        [sys.executable, str(REPO / "examples" / "own_family.py"), "--quick", "--out", str(out),
         "--threads", "1"],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "memory plan: gru-small (49 tokens)" in done.stdout
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"base, guidance-free", "base, CFG 2", "CCA, guidance-free"}
    assert all(0 <= row["accuracy"] <= 1 and row["fid"] > 0 for row in results.values())
    config = json.loads((out / "export" / "config.json").read_text())
    assert config["family"] == "gru-example" and config["grid"] == 7
    recorded = json.loads((out / "cca" / "config.json").read_text())
    assert recorded["method"]["name"] == "cca"
    assert recorded["model"]["init"].endswith("pretrain/final.safetensors")
