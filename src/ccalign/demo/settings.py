"""What the demo does, as one frozen record: the bundle, sample counts, each method's recipe."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ccalign.demo import bundles, recipes
from ccalign.models import families
from ccalign.train import methods


def supported_methods(bundle: bundles.DemoBundle) -> list[str]:
    """The demo's recipes whose method the bundle's model family can train."""
    family = families.get(bundle.family)
    return [name for name in recipes.RECIPES if methods.get(name).refusal(family) is None]


@dataclass(frozen=True)
class DemoSettings:
    """Everything the demo does; ``quick()`` shrinks it to a smoke run of about a minute.

    ``for_family`` applies a bundle's tuned settings (``ccalign.demo.bundles``) under the
    caller's changes; ``base_model`` defaults to the bundle's base model. How each recipe
    setting was chosen (and on which samples) is in docs/results.md.
    """

    out: Path = Path("runs/demo")
    family: str = "llamagen"
    base_model: Path | None = None
    seed: int = 0
    train_images: int = 10000  # training images encoded for fine-tuning (150 x 64 use 9600)
    reference_images: int = 10000  # test images the samples are compared with
    samples: int = 10000  # per headline row (base, base + CFG, CCA): FID spread <= 1
    curve_samples: int = 2000  # per other row (CFG scales, CCA + CFG, sweeps)
    batch_size: int = 1000  # sampling batch, the same for every setting (fair images/s)
    cfg_scales: tuple[float, ...] = (1.5, 2.0, 3.0)
    cca_cfg_scale: float = 1.5  # CCA + CFG
    beta: float = 0.5
    lam: float = 30.0
    dropout: str = "none"  # off in policy and reference: D = 0 exactly at step 1
    lr: float = 1e-4
    steps: int = 150
    pairs_per_step: int = 64
    # --methods: which guidance-free fine-tunes to run and compare (recipes.py: matched budget)
    methods: tuple[str, ...] = ("cca",)
    gft_lr: float = 1e-4
    gft_scale: float = 1.0  # GFT's guidance-free row samples at beta = 1 / gft_scale
    gft_curve_scales: tuple[float, ...] = (1.25, 1.5, 2.0)  # GFT's own curve (curve_samples)
    ddo_alpha: float = 50.0
    ddo_beta: float = 0.5
    ddo_lr: float = 1e-5
    ddo_rounds: int = 3  # the step budget split over the rounds
    ddo_uncond_ratio: float = 0.5
    sweep: bool = False
    sweep_lams: tuple[float, ...] = (1.0, 3.0, 10.0)
    sweep_cfg_scales: tuple[float, ...] = (1.25, 4.0, 5.0)
    grid_columns: int = 10
    progress: bool = True

    def __post_init__(self):
        known = bundles.bundle(self.family)
        usable = supported_methods(known)
        unsupported = set(self.methods) - set(usable)
        if unsupported:
            raise ValueError(
                f"the {known.title} demo fine-tunes with {', '.join(usable)}, not "
                f"{', '.join(sorted(unsupported))}"
            )
        if self.base_model is None:
            object.__setattr__(self, "base_model", known.base_model)

    @classmethod
    def for_family(cls, family: str = "llamagen", *, quick: bool = False, **changes):
        """Settings for the bundle ``family``: its tuned values, then ``quick``'s, then
        ``changes``."""
        tuned = bundles.bundle(family).settings
        return cls(**{**tuned, **(QUICK if quick else {}), "family": family, **changes})

    @classmethod
    def quick(cls, **changes) -> DemoSettings:
        return cls.for_family(changes.pop("family", "llamagen"), quick=True, **changes)

    @property
    def bundle(self) -> bundles.DemoBundle:
        return bundles.bundle(self.family)

    @property
    def rows_per_step(self) -> int:
        """Sequence rows through the policy with gradient per step, the same for every method."""
        return 2 * self.pairs_per_step


#: ``DemoSettings.quick``: a smoke run of about a minute
QUICK = dict(
    train_images=512,
    reference_images=500,
    samples=100,
    curve_samples=100,
    batch_size=100,
    cfg_scales=(2.0,),
    steps=4,
    pairs_per_step=16,
    sweep_lams=(3.0,),
    sweep_cfg_scales=(4.0,),
    gft_curve_scales=(3.0,),
    ddo_rounds=2,
)
