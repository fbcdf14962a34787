"""The model families the demo runs on Fashion-MNIST: per family its bundled tokenizer and base
model (with the commands that rebuild them), its sampler, the fine-tunes it supports and the
recipe settings tuned for it. Everything else in the demo is family-agnostic."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from ccalign.models import families
from ccalign.tokenizers.files import ASSETS


@dataclass(frozen=True)
class DemoFamily:
    """One family's bundled artefacts and defaults."""

    name: str  # "llamagen" or "var", as ccalign.models.families names it
    title: str  # for reports
    tokenizer: str  # bundled tokenizer alias
    base_model: Path  # bundled base model
    pretrain_config: str  # the config that rebuilds the base model (BENCHMARKS.md)
    methods: tuple[str, ...]  # the fine-tunes the family can train
    model_section: dict = field(default_factory=dict)  # [model] keys besides init
    settings: dict = field(default_factory=dict)  # DemoSettings fields tuned for the family

    def load_model(self, path: Path) -> nn.Module:
        """A model of this family in eval mode; a missing bundled file names its rebuild, a
        model of another family is refused."""
        if not Path(path).exists():
            raise FileNotFoundError(
                f"base model missing: {path}; rebuild the bundled one with `ccalign pretrain "
                f"--config {self.pretrain_config}` (the full commands are in BENCHMARKS.md)"
            )
        model = families.load_file(path)
        if families.family_of(model) != self.name:
            raise ValueError(
                f"{path} holds a {families.family_of(model)} model, but the {self.title} demo "
                f"needs a {self.name} one (pass --family {families.family_of(model)})"
            )
        return model.eval()


FAMILIES: dict[str, DemoFamily] = {
    "llamagen": DemoFamily(
        name="llamagen",
        title="LlamaGen",
        tokenizer="fmnist-vq",
        base_model=ASSETS / "fmnist_base.safetensors",
        pretrain_config="configs/fmnist_pretrain.toml",
        methods=("cca", "gft", "ddo"),
        model_section={"name": "custom", "grid": 7},
    ),
    "var": DemoFamily(
        name="var",
        title="VAR",
        tokenizer="fmnist-msvq",
        base_model=ASSETS / "fmnist_var_base.safetensors",
        pretrain_config="configs/fmnist_var_pretrain.toml",
        methods=("cca", "ddo"),  # GFT needs a beta embedding, which ccalign's VAR lacks
        model_section={"name": "custom"},
        # 88-token images: beta 0.5 (LlamaGen's 49 tokens) saturated the loss within 75 steps
        # (FID 69.6); FID fell with beta down to 0.005 (55.1 at accuracy 0.913 on 2000 samples;
        # beta 0.02: 60.1 / 0.943), lambda 3 / 100 and lr 5e-5 / 3e-4 did worse (BENCHMARKS.md).
        # 6000 samples per headline row keep the run under 10 minutes with the set-up.
        settings={"beta": 0.005, "lam": 10.0, "samples": 6000},
    ),
}


def family(name: str) -> DemoFamily:
    """The demo family ``name``; unknown names raise ValueError listing the known ones."""
    if name not in FAMILIES:
        raise ValueError(f"the demo runs on {sorted(FAMILIES)}, not {name!r}")
    return FAMILIES[name]


def sampler(model: nn.Module):
    """The family's sampler for ``model``: ``generate(labels, cfg_scale=, generator=)``."""
    if families.family_of(model) == "var":
        from ccalign.sample.var import VarSampler

        return VarSampler(model)
    from ccalign.sample import Sampler

    return Sampler(model)
