"""Bring your own model: a GRU image generator as a ccalign model family, in this one file.

The family is registered through the public interface (``ccalign.models.families.register``);
from then on the library holds it as it holds LlamaGen and VAR: ``run_training`` pretrains it by
maximum likelihood and fine-tunes it with CCA, the memory plan sizes its run, the shared
KV-cache sampler draws from it guidance-free and with CFG, and ``ccalign export`` writes it. The
data are the demo's: Fashion-MNIST encoded by the bundled small VQ into 7x7 codes, scored by the
bundled classifier.

    python examples/own_family.py                  # about 80 s on 2 CPU cores
    python examples/own_family.py --quick          # a smoke run (the test runs this)
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ccalign import tokenizers
from ccalign.cli import main as ccalign
from ccalign.data import fashion_mnist
from ccalign.data.codes import write_flat_codes
from ccalign.eval import conditional_accuracy, fid_from_features, load_classifier_extractor
from ccalign.models import families
from ccalign.models.family import Activations, BaseFamily, Dtypes
from ccalign.models.next_token import Sampler
from ccalign.sample import generate
from ccalign.train import TrainConfig, run_training
from ccalign.train.memory import plan_from_config


# ---- the model: p(token t | tokens < t, class), a GRU over the 49 codes of an image ----
@dataclass(frozen=True)
class GRUConfig:
    vocab_size: int = 512  # the bundled VQ's codebook
    num_classes: int = 10
    grid: int = 7  # codes per side: 49 tokens per image
    dim: int = 192
    depth: int = 2

    def to_dict(self) -> dict:
        return asdict(self)


class GRUBlock(nn.Module):
    """A GRU layer with a pre-norm and a residual connection."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.gru = nn.GRU(dim, dim, batch_first=True)

    def forward(self, x: Tensor, h: Tensor | None = None) -> tuple[Tensor, Tensor]:
        out, h = self.gru(self.norm(x), h)
        return x + out, h


class GRUGenerator(nn.Module):
    """The class embedding is the first input (the null class is the extra last row, for CFG);
    the output at position t predicts token t. ``forward`` is the sequence log-likelihood, what
    every ccalign method differentiates."""

    def __init__(self, config: GRUConfig):
        super().__init__()
        self.config = config
        self.class_emb = nn.Embedding(config.num_classes + 1, config.dim)
        self.tok_emb = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(GRUBlock(config.dim) for _ in range(config.depth))
        self.norm = nn.LayerNorm(config.dim)
        self.head = nn.Linear(config.dim, config.vocab_size)
        self._hidden: list[Tensor | None] | None = None  # the sampler's cache

    seq_len = property(lambda self: self.config.grid**2)
    vocab_size = property(lambda self: self.config.vocab_size)
    num_classes = property(lambda self: self.config.num_classes)
    null_class = property(lambda self: self.config.num_classes)

    def forward(self, labels: Tensor, tokens: Tensor) -> Tensor:
        """(B,) sum over t of log p(tokens[:, t] | tokens[:, :t], labels)."""
        x = torch.cat([self.class_emb(labels)[:, None], self.tok_emb(tokens[:, :-1])], dim=1)
        for layer in self.layers:
            x, _ = layer(x)
        logp = self.head(self.norm(x)).float().log_softmax(-1)
        return logp.gather(-1, tokens[..., None]).squeeze(-1).sum(1)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ---- what the shared next-token sampler calls: the cache is each layer's hidden state ----
    def setup_kv_cache(self, batch: int, dtype=None, device=None) -> None:
        self._hidden = [None] * len(self.layers)

    def clear_kv_cache(self) -> None:
        self._hidden = None

    def prefill(self, labels: Tensor) -> Tensor:
        """Logits (B, V) of the first token; starts each row's state afresh."""
        self._hidden = [None] * len(self.layers)
        return self._step(self.class_emb(labels))

    def decode(self, tokens: Tensor, position: Tensor) -> Tensor:
        """Logits (B, V) of the token after ``tokens``; a batch may keep fewer rows than the
        step before (CFG's unconditional rows stop once no guided token is left)."""
        return self._step(self.tok_emb(tokens))

    def _step(self, x: Tensor) -> Tensor:
        x, rows = x[:, None], x.shape[0]
        for i, layer in enumerate(self.layers):
            h = self._hidden[i]
            x, self._hidden[i] = layer(x, None if h is None else h[:, :rows].contiguous())
        return self.head(self.norm(x[:, -1])).float()


# ---- the family: what the generic layers ask of it ----
class GRUFamily(BaseFamily):
    """Files, specs and class labels come from BaseFamily (ccalign safetensors with the config
    as metadata, presets, strict loading); the family adds its sampler and memory estimate."""

    name = "gru-example"
    title = "GRU (examples/own_family.py)"
    model_class = GRUGenerator
    config_class = GRUConfig
    presets = {"gru-small": {"dim": 192, "depth": 2}}
    lora_targets = ("head",)

    def sampler(self, model: nn.Module, **options) -> Sampler:
        """The shared KV-cache engine: guidance-free runs B rows, CFG 2B."""
        return Sampler(model, **options)

    def activations(
        self, model: nn.Module, rows: int, dtypes: Dtypes, checkpointing: bool
    ) -> Activations:
        """A rough estimate for the memory plan: per token and layer the GRU keeps its input,
        norm, three gates and output (about 8 D-wide values); the head keeps its float32 logits
        and their log-softmax."""
        cfg, tokens, c = model.config, rows * model.seq_len, dtypes.compute_bytes
        per_layer = (c * cfg.dim if checkpointing else 8 * c * cfg.dim) * tokens
        logits = 8 * tokens * cfg.vocab_size
        return Activations(saved=cfg.depth * per_layer + logits, workspace=logits)


FAMILY = families.register(GRUFamily())


# ---- the run ----
def encode(tokenizer, count: int, out: Path) -> Path:
    """The first ``count`` Fashion-MNIST training images as 7x7 codes (a flat code file)."""
    path = out / f"codes_train{count}.safetensors"
    if not path.exists():
        images, labels = fashion_mnist.load("train")
        pixels = torch.from_numpy(images[:count]).float()[:, None] / 127.5 - 1
        with torch.inference_mode():
            codes = torch.cat([tokenizer.encode(part) for part in pixels.split(1000)])
        write_flat_codes(path, codes, labels[:count], vocab_size=512, grid=7)
    return path


def config(out: Path, codes: Path, method: dict, steps: int, lr: float, **model) -> TrainConfig:
    return TrainConfig.from_dict({
        "model": model,
        "data": {"path": str(codes)},
        "method": method,
        "optim": {"lr": lr, "schedule": "cosine", "warmup_ratio": 0.05, "grad_clip": 1.0},
        "train": {"global_batch": 128, "micro_batch": 128, "steps": steps, "device": "cpu",
                  "precision": "fp32", "progress": False},
        "checkpoint": {"out": str(out), "every": 1000, "keep": 1},
    })


def score(model: nn.Module, tokenizer, extractor, reference, count: int, cfg_scale: float) -> dict:
    """Accuracy (the bundled classifier) and domain FID of ``count`` balanced samples."""
    labels = np.arange(count) % 10
    started = time.perf_counter()
    tokens = generate(model, labels, cfg_scale=cfg_scale,
                      generator=torch.Generator().manual_seed(0))
    seconds = time.perf_counter() - started
    with torch.inference_mode():
        pixels = tokenizer.decode(tokens)[:, 0].clamp(-1, 1)
    images = ((pixels + 1) * 127.5).round().to(torch.uint8).numpy()
    features = extractor.extract(images)
    return {
        "accuracy": round(conditional_accuracy(features.logits, labels), 3),
        "fid": round(fid_from_features(reference.features, features.features), 2),
        "images_per_s": round(count / seconds),
    }


def run(out: Path, *, images: int, pretrain_steps: int, cca_steps: int, samples: int) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = tokenizers.load("fmnist-vq").eval()
    codes = encode(tokenizer, images, out)

    pretrain = config(out / "pretrain", codes, {"name": "mle", "class_dropout": 0.1},
                      pretrain_steps, 5e-3, family=FAMILY.name, name="gru-small")
    print(plan_from_config(pretrain).table().splitlines()[0])  # the memory plan knows it
    run_training(pretrain, resume=True)
    base = families.load_file(out / "pretrain" / "final.safetensors").eval()

    cca = config(out / "cca", codes, {"name": "cca", "beta": 0.5, "lam": 30.0,
                                      "dropout": "none"},
                 cca_steps, 1e-3, init=str(out / "pretrain" / "final.safetensors"))
    run_training(cca, resume=True)
    tuned = families.load_file(out / "cca" / "final.safetensors").eval()
    assert families.of(tuned) is FAMILY

    exported = out / "export" / "gru_cca.safetensors"
    assert ccalign(["export", str(out / "cca" / "final.safetensors"), "--format",
                    "safetensors", "--out", str(exported)]) == 0

    extractor = load_classifier_extractor(progress=False)
    test_images, _ = fashion_mnist.load("test")
    reference = extractor.extract(test_images[:2000])
    results = {
        "base, guidance-free": score(base, tokenizer, extractor, reference, samples, 1.0),
        "base, CFG 2": score(base, tokenizer, extractor, reference, samples, 2.0),
        "CCA, guidance-free": score(tuned, tokenizer, extractor, reference, samples, 1.0),
    }
    for name, row in results.items():
        print(f"{name:22} accuracy {row['accuracy']:.3f}  FID {row['fid']:6.2f}  "
              f"{row['images_per_s']} images/s")
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    return results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/own_family"))
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few seconds")
    parser.add_argument("--threads", type=int, default=None)
    return parser.parse_args(argv)


if __name__ == "__main__":
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = dict(images=512, pretrain_steps=4, cca_steps=2, samples=100) if args.quick else \
        dict(images=6000, pretrain_steps=200, cca_steps=50, samples=1000)
    run(args.out, **sizes)
