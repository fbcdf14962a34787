"""Demo outputs: grids place each class on its own row; the table and JSON carry every run."""

import json

import numpy as np

from ccalign.demo.report import class_grid, metrics_table, plot_tradeoff, write_metrics


def test_class_grid_puts_each_class_on_its_row():
    images = np.stack([np.full((4, 4), 10 * k, dtype=np.uint8) for k in range(6)])
    labels = np.array([2, 0, 2, 1, 0, 1])  # images k have value 10 k
    grid = class_grid(images, labels, per_row=2, pad=1)
    assert grid.shape == (3 * 5 + 1, 2 * 5 + 1)
    for row, members in enumerate([[1, 4], [3, 5], [0, 2]]):  # classes 0, 1, 2 in order
        for col, k in enumerate(members):
            y, x = 1 + row * 5, 1 + col * 5
            assert np.all(grid[y : y + 4, x : x + 4] == 10 * k)
    assert np.all(grid[0] == 255)  # padding stays white


def test_metrics_json_table_and_plot(tmp_path):
    runs = [
        dict(
            name="base",
            model="base",
            cfg_scale=1.0,
            fid=40.0,
            accuracy=0.7,
            precision=0.5,
            recall=0.6,
            inception_score=5.0,
            images_per_s=300.0,
            family="CFG",
        ),
        dict(
            name="base-cfg3",
            model="base",
            cfg_scale=3.0,
            fid=20.0,
            accuracy=0.9,
            precision=0.7,
            recall=0.4,
            inception_score=7.0,
            images_per_s=120.0,
            family="CFG",
            sweep_value=3.0,
            sweep_label="s=3",
        ),
    ]
    write_metrics(runs, tmp_path / "metrics.json", {"seed": 0})
    data = json.loads((tmp_path / "metrics.json").read_text())
    assert data["runs"][1]["cfg_scale"] == 3.0 and data["meta"] == {"seed": 0}
    table = metrics_table(runs).splitlines()
    assert len(table) == 4 and "CFG 3" in table[3] and "| 20.00 |" in table[3]
    plot_tradeoff(runs, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"


def run(cnn: float, mlp: float) -> dict:
    return {"accuracy": cnn, "accuracy_mlp": mlp}


def test_accuracy_claims_hold_under_both_classifiers_or_are_not_made():
    from ccalign.demo.report import accuracy_claim

    base, target = run(0.80, 0.85), run(0.94, 0.96)
    agree = accuracy_claim("CCA", base, run(0.91, 0.94), target, "CFG 2")
    assert agree == "Of the accuracy gap to CFG 2 CCA closes 79% (CNN) and 82% (MLP)."
    split = accuracy_claim("CCA", base, run(0.91, 0.90), target, "CFG 2")
    assert split.endswith("the classifiers disagree on whether it closes most of it; only 45% "
                          "is claimed.")
    sign = accuracy_claim("CCA", base, run(0.91, 0.84), target, "CFG 2")
    assert "disagree on whether it gains accuracy at all, so no accuracy gain is claimed" in sign
    blind = accuracy_claim("CCA", base, run(0.91, 0.90), run(0.94, 0.84), "CFG 2")
    assert blind.endswith("the other classifier sees no gap, so no accuracy gain is claimed.")
    beyond = accuracy_claim("CCA", base, run(0.95, 0.97), target, "CFG 2")
    assert beyond.endswith("(beyond that setting's accuracy).")
