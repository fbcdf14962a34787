"""The text-to-image demo's judging: caption accuracy per slot under both classifiers (held-out
pairs apart), scene FID against test scenes, and the pair grid."""

from __future__ import annotations

import numpy as np
import pytest

from ccalign.data import fashion_mnist, scenes
from ccalign.demo.scene_task import SceneScorer, SceneTask, pair_grid
from ccalign.demo.settings import DemoSettings


@pytest.fixture(scope="module")
def judged():
    settings = DemoSettings.for_family("t2i", quick=True, reference_images=400, progress=False)
    task = SceneTask()
    prompts = task.prompts(400, settings)
    items, labels = fashion_mnist.load("test")
    # test items of the captioned classes from the half the reference does not use
    half = slice(5000, 10000)
    real = scenes.evaluation_scenes(labels[half], 400, seed=11)
    assert np.array_equal(real.left_class, prompts.scenes.left_class)
    return SceneScorer(settings), prompts, real.images(items[half])


def test_real_scenes_score_as_captioned_and_swapped_ones_do_not(judged):
    scorer, prompts, images = judged
    real = scorer.score(images, prompts, manifold_samples=400)
    assert real["accuracy"] > 0.75 and real["accuracy_mlp"] > 0.7  # both classifiers
    assert real["item_accuracy"] > 0.85
    assert real["accuracy_heldout"] is not None and real["accuracy_seen"] > 0.7
    assert real["num_samples"] == 400
    mirrored = scorer.score(images[..., ::-1].copy(), prompts, manifold_samples=400)
    assert mirrored["accuracy"] < 0.2  # items in each other's places (and mirrored)
    assert real["fid"] < mirrored["fid"] / 2
    both = np.concatenate([images[:, :, 28:], images[:, :, :28]], axis=2)
    assert scorer.score(both, prompts, manifold_samples=400)["accuracy"] < 0.2


def test_held_out_accuracy_counts_only_the_held_out_pairs(judged):
    scorer, prompts, images = judged
    held = prompts.scenes.held_out()
    blanked = images.copy()
    blanked[held] = 0  # every held-out sample wrong, the others untouched
    spoiled = scorer.score(blanked, prompts, manifold_samples=400)
    kept = scorer.score(images, prompts, manifold_samples=400)
    assert spoiled["accuracy_heldout"] < 0.15
    assert spoiled["accuracy_seen"] == kept["accuracy_seen"]
    assert spoiled["accuracy"] == pytest.approx(kept["accuracy_seen"] * (~held).mean()
                                                + spoiled["accuracy_heldout"] * held.mean())


def test_pair_grid_puts_left_class_by_row_and_right_class_by_column():
    _, labels = fashion_mnist.load("test")
    planned = scenes.evaluation_scenes(labels, 100, seed=0)
    images = (planned.left_class * 10 + planned.right_class).astype(np.uint8)[:, None, None]
    images = np.broadcast_to(images, (100, 28, 56))
    grid = pair_grid(images, planned, pad=2)
    assert grid.shape == (10 * 30 + 2, 10 * 58 + 2)
    for a, b in [(0, 0), (3, 7), (9, 4)]:
        assert grid[2 + a * 30 + 5, 2 + b * 58 + 5] == a * 10 + b
    a, b = next(iter(scenes.HELD_OUT))
    assert grid[2 + a * 30 - 1, 2 + b * 58 + 5] == 128  # framed
