"""The text-to-image demo's task: captioned two-item scenes (``ccalign.data.scenes``).

Every setting samples the same captions, cycling through all 100 ordered class pairs (the ten
held out of training among them) and the four phrasings. A sample is judged per slot by both
bundled classifiers: its caption accuracy counts the samples whose two items are both the
captioned classes in the captioned places; held-out pairs are reported apart. Domain FID,
precision and recall compare each sample's pair of classifier features (left and right, joined)
with those of test-image scenes captioned the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ccalign.conditions import CaptionBatch
from ccalign.data import fashion_mnist, scenes
from ccalign.demo import report
from ccalign.demo.tasks import classifiers, decode_images, domain_metrics
from ccalign.eval import manifold_radii
from ccalign.tokenizers import load as load_tokenizer
from ccalign.tokenizers.slots import SlotTokenizer

if TYPE_CHECKING:
    from ccalign.demo.settings import DemoSettings

#: the reference scenes' items are drawn with the run's seed plus this (not the samples' seed)
REFERENCE_SEED_OFFSET = 7


@dataclass(frozen=True)
class ScenePrompts:
    """The scenes a run samples (their classes and phrasings) and their encoded captions."""

    scenes: scenes.Scenes
    captions: CaptionBatch


class SceneTask:
    """Two Fashion-MNIST items side by side, drawn from a caption."""

    prompt_words = (
        "captions cycling through all 100 ordered class pairs (10 held out of training) and 4 "
        "phrasings"
    )
    accuracy_words = "caption accuracy (both items right and in their places)"

    def __init__(self):
        self._encoder = None

    @property
    def encoder(self):
        """The bundled text encoder, loaded on first use."""
        if self._encoder is None:
            from ccalign.data.text_encoder import TextEncoder

            self._encoder = TextEncoder(scenes.TEXT_ENCODER_PATH, length=scenes.CAPTION_TOKENS)
        return self._encoder

    def tokenizer(self, name: str) -> SlotTokenizer:
        return SlotTokenizer(load_tokenizer(name).eval(), scenes.SLOTS)

    def training_data(self, tokenizer, settings: DemoSettings, out: Path) -> dict[str, str]:
        """``train_images`` training scenes (codes and caption features), written once."""
        return scenes.write_training_data(out, tokenizer, self.encoder, settings.train_images,
                                          settings.seed)

    def prompts(self, count: int, settings: DemoSettings) -> ScenePrompts:
        _, labels = fashion_mnist.load("test")
        planned = scenes.evaluation_scenes(labels, count, settings.seed)
        return ScenePrompts(planned, scenes.encode_captions(self.encoder, planned.captions()))

    def conditions(self, prompts: ScenePrompts, start: int, stop: int) -> CaptionBatch:
        c = prompts.captions
        return CaptionBatch(c.features[start:stop], c.mask[start:stop], c.null[start:stop])

    def decode(self, tokenizer: SlotTokenizer, tokens: torch.Tensor) -> np.ndarray:
        return decode_images(tokenizer, tokens, chunk=1000)

    def scorer(self, settings: DemoSettings) -> SceneScorer:
        return SceneScorer(settings)

    def grid(self, images: np.ndarray, prompts: ScenePrompts, columns: int) -> np.ndarray:
        return pair_grid(images, prompts.scenes)

    def reading(self, runs: list[dict], method: str) -> str:
        return " ".join(part for part in (strongest_cfg_reading(runs, method),
                                          held_out_reading(runs, method)) if part)


class SceneScorer:
    """Scenes against test-image scenes of the run's split, both slots through both
    classifiers."""

    def __init__(self, settings: DemoSettings):
        self.cnn, self.mlp = classifiers()
        images, labels = fashion_mnist.load("test")
        images, labels = images[settings.reference_slice], labels[settings.reference_slice]
        planned = scenes.evaluation_scenes(
            labels, settings.reference_images, settings.seed + REFERENCE_SEED_OFFSET
        )
        self.reference = self.features(planned.images(images))[0]
        self.radii = manifold_radii(self.reference, k=3)

    def features(self, images: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """The CNN features of both slots joined (N, 2D), and each slot's CNN logits."""
        slots = [self.cnn.extract(item) for item in scenes.slot_images(images)]
        return np.concatenate([s.features for s in slots], axis=1), [s.logits for s in slots]

    def score(self, images: np.ndarray, prompts: ScenePrompts, manifold_samples: int) -> dict:
        planned = prompts.scenes
        features, cnn_logits = self.features(images)
        mlp_logits = [self.mlp.extract(item).logits for item in scenes.slot_images(images)]
        metrics = domain_metrics(features, self.reference, self.radii, manifold_samples,
                                 np.concatenate(cnn_logits))
        held = planned.held_out()
        for suffix, logits in (("", cnn_logits), ("_mlp", mlp_logits)):
            right = both_right(logits, planned)
            metrics[f"accuracy{suffix}"] = float(right.mean())
            metrics[f"accuracy_seen{suffix}"] = float(right[~held].mean())
            metrics[f"accuracy_heldout{suffix}"] = float(right[held].mean()) if held.any() \
                else None
        metrics["item_accuracy"] = float(np.mean(
            [(lg.argmax(1) == cls).mean() for lg, cls in
             zip(cnn_logits, (planned.left_class, planned.right_class), strict=True)]
        ))
        return {**metrics, "num_samples": len(planned)}


def both_right(logits: list[np.ndarray], planned: scenes.Scenes) -> np.ndarray:
    """bool (N,): both slots classified as their captioned classes."""
    left, right = (lg.argmax(axis=1) for lg in logits)
    return (left == planned.left_class) & (right == planned.right_class)


def pair_grid(images: np.ndarray, planned: scenes.Scenes, pad: int = 2) -> np.ndarray:
    """One sample per class pair: row = left class, column = right class; held-out pairs
    framed in grey."""
    h, w = images.shape[1:]
    n = scenes.CLASSES
    grid = np.full((n * (h + pad) + pad, n * (w + pad) + pad), 255, dtype=np.uint8)
    for a in range(n):
        for b in range(n):
            found = np.flatnonzero((planned.left_class == a) & (planned.right_class == b))
            if len(found) == 0:
                continue
            y, x = pad + a * (h + pad), pad + b * (w + pad)
            if (a, b) in scenes.HELD_OUT:
                grid[y - pad : y + h + pad, x - pad : x + w + pad] = 128
            grid[y : y + h, x : x + w] = images[found[0]]
    return grid


def base_cfg_runs(runs: list[dict]) -> list[dict]:
    """The base model's rows sampled with a CFG scale."""
    return [r for r in runs if r["model"] == "base" and r["cfg_scale"] != 1.0]


def strongest_cfg_reading(runs: list[dict], method: str) -> str:
    """The method against the base model's most accurate CFG setting: captions are where
    guidance pays here, so the accuracy claim is also made against the strongest guidance."""
    by_name = {r["name"]: r for r in runs}
    cfg = base_cfg_runs(runs)
    if not cfg or method not in by_name:
        return ""
    strongest = max(cfg, key=lambda r: r["accuracy"])
    what = f"the most accurate CFG setting (scale {strongest['cfg_scale']:g}, FID " \
           f"{strongest['fid']:.2f})"
    return report.accuracy_claim(method.upper(), by_name["base"], by_name[method], strongest,
                                 what)


def held_out_reading(runs: list[dict], method: str) -> str:
    """Caption accuracy on the held-out pairs beside the seen ones, for the base model, its
    best CFG setting by FID and the method, under both classifiers."""
    by_name = {r["name"]: r for r in runs}
    if "accuracy_heldout" not in by_name["base"] or method not in by_name:
        return ""
    cfg = base_cfg_runs(runs)
    shown = [("the base model", by_name["base"])]
    if cfg:
        best = min(cfg, key=lambda r: r["fid"])
        shown.append((f"CFG {best['cfg_scale']:g}", best))
    shown.append((method.upper(), by_name[method]))
    parts = [
        f"{label}: {r['accuracy_heldout']:.3f} / {r['accuracy_heldout_mlp']:.3f} on held-out "
        f"pairs vs {r['accuracy_seen']:.3f} / {r['accuracy_seen_mlp']:.3f} on seen ones"
        for label, r in shown
    ]
    return (
        "Composition (caption accuracy, CNN / MLP, on the 10 class pairs no training scene "
        "showed): " + "; ".join(parts) + "."
    )
