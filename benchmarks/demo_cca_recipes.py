"""Score CCA recipes of the demo on guidance-free samples (the VAR demo's tuning, docs/results.md).

Each recipe is a JSON object of DemoSettings changes (``{"beta": 0.005, "lam": 10}``; ``"cfg"``
samples with that CFG scale; ``"steps": 0`` scores the base model). Every recipe fine-tunes from
the family's bundled base model on the codes a demo run cached, then samples ``--samples``
balanced labels (seed 0) and prints one JSON line: FID, accuracy, precision, recall.

    python benchmarks/demo_cca_recipes.py --family var \
        --codes runs/demo_var/codes_var_train10000.safetensors \
        '{"steps": 0}' '{"steps": 0, "cfg": 2}' '{"beta": 0.005, "lam": 10}'
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ccalign.data import fashion_mnist
from ccalign.demo import bundles, recipes
from ccalign.demo.settings import DemoSettings
from ccalign.demo.tasks import balanced_labels, decode_images, score
from ccalign.eval import load_classifier_extractor, manifold_radii
from ccalign.models import families
from ccalign.tokenizers import load as load_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipes", nargs="+", help="JSON objects of DemoSettings changes")
    parser.add_argument("--family", default="var", choices=sorted(bundles.BUNDLES))
    parser.add_argument("--codes", type=Path, required=True, help="a demo run's cached codes")
    parser.add_argument("--out", type=Path, default=Path("runs/cca_recipes"))
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    extractor = load_classifier_extractor(progress=False)
    test_images, _ = fashion_mnist.load("test")
    reference = extractor.extract(test_images).features
    radii = manifold_radii(reference, k=3)
    bundle = bundles.bundle(args.family)
    tokenizer = load_tokenizer(bundle.tokenizer).eval()
    for text in args.recipes:
        changes = json.loads(text)
        cfg_scale = float(changes.pop("cfg", 1.0))
        settings = DemoSettings.for_family(args.family, progress=False, **changes)
        started = time.perf_counter()
        if settings.steps == 0:
            model = bundle.load_model(settings.base_model)
        else:
            config = recipes.cca_config(settings, {"path": str(args.codes)}, args.out,
                                        settings.lam)
            recipes.train_timed(config, print)
            model = families.load_file(Path(config.checkpoint.out) / "final.safetensors").eval()
        seconds = time.perf_counter() - started
        tokens = sample(families.of(model).sampler(model), args.samples, cfg_scale)
        labels = balanced_labels(args.samples)
        images = decode_images(tokenizer, tokens)
        metrics = score(images, labels, reference, radii, extractor, args.samples)
        keep = ("fid", "accuracy", "precision", "recall")
        row = {k: round(metrics[k], 3) for k in keep}
        print(json.dumps({"recipe": text, **row, "finetune_s": round(seconds)}), flush=True)


def sample(sampler, count: int, cfg_scale: float, batch: int = 1000) -> torch.Tensor:
    """``count`` samples over balanced labels, seed 0, in batches."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.from_numpy(balanced_labels(count))
    return torch.cat(
        [
            sampler.generate(labels[i : i + batch], cfg_scale=cfg_scale, generator=generator)
            for i in range(0, count, batch)
        ]
    )


if __name__ == "__main__":
    main()
