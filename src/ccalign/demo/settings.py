"""What the demo does, as one frozen record: the bundle, sample counts, each method's recipe."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ccalign.demo import bundles, recipes
from ccalign.models import families
from ccalign.settings import MAX_SEED, check_fields, ranged
from ccalign.train import methods


def supported_methods(bundle: bundles.DemoBundle) -> list[str]:
    """The demo's recipes whose method the bundle's model family can train."""
    family = families.get(bundle.family)
    return [name for name in recipes.RECIPES if methods.get(name).refusal(family) is None]


#: the two evaluation splits, each with its half of the 10k Fashion-MNIST test images
SPLITS = ("report", "tune")
SPLIT_IMAGES = 5000
#: added to the seed for the tuning split's samples (far from any seed a report uses)
TUNE_SEED_OFFSET = 1_000_003


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
    seed: int = ranged(0, ge=0, le=MAX_SEED)
    # training images encoded for fine-tuning (150 x 64 use 9600)
    train_images: int = ranged(10000, ge=1, le=60000)
    # test images the samples are compared with: the first of the split's half of the test set
    reference_images: int = ranged(5000, ge=2, le=SPLIT_IMAGES)
    # "report": the first half of the test images and the run's seed, what reports show;
    # "tune": the other half and other sampling seeds, where recipes are chosen
    split: str = "report"
    # per headline row (base, base + CFG, CCA): FID spread <= 1
    samples: int = ranged(10000, ge=2, le=1_000_000)
    # per other row (CFG scales, CCA + CFG, sweeps)
    curve_samples: int = ranged(2000, ge=2, le=1_000_000)
    # sampling batch, the same for every setting (fair images/s)
    batch_size: int = ranged(1000, ge=1, le=100_000)
    cfg_scales: tuple[float, ...] = ranged((1.5, 2.0, 3.0), ge=0, le=1000)
    cca_cfg_scale: float = ranged(1.5, ge=0, le=1000)  # CCA + CFG
    # the base model under the family's own guidance number too (VAR's cfg ramp), if it has one
    own_cfg_scales: tuple[float, ...] = ranged((), ge=0, le=1000)
    beta: float = ranged(0.5, gt=0, le=1e4)
    lam: float = ranged(30.0, ge=0, le=1e9)
    dropout: str = "none"  # off in policy and reference: D = 0 exactly at step 1
    lr: float = ranged(1e-4, gt=0, le=1)
    steps: int = ranged(150, ge=1, le=1_000_000)
    pairs_per_step: int = ranged(64, ge=2, le=100_000)
    # --methods: which guidance-free fine-tunes to run and compare (recipes.py: matched budget)
    methods: tuple[str, ...] = ("cca",)
    gft_lr: float = ranged(1e-4, gt=0, le=1)
    # GFT's guidance-free row samples at beta = 1 / gft_scale (beta in (0, 1])
    gft_scale: float = ranged(1.0, ge=1, le=1000)
    # GFT's own curve (curve_samples)
    gft_curve_scales: tuple[float, ...] = ranged((1.25, 1.5, 2.0), ge=1, le=1000)
    ddo_alpha: float = ranged(50.0, ge=0, le=1e9)
    ddo_beta: float = ranged(0.5, gt=0, le=1e4)
    ddo_lr: float = ranged(1e-5, gt=0, le=1)
    ddo_rounds: int = ranged(3, ge=1, le=1000)  # the step budget split over the rounds
    ddo_uncond_ratio: float = ranged(0.5, ge=0, lt=1)
    sweep: bool = False
    sweep_lams: tuple[float, ...] = ranged((1.0, 3.0, 10.0), ge=0, le=1e9)
    sweep_cfg_scales: tuple[float, ...] = ranged((1.25, 4.0, 5.0), ge=0, le=1000)
    grid_columns: int = ranged(10, ge=1, le=1000)
    progress: bool = True

    def __post_init__(self):
        check_fields(self)
        if self.split not in SPLITS:
            raise ValueError(f"split {self.split!r}: choose one of {', '.join(SPLITS)}")
        known = bundles.bundle(self.family)
        usable = supported_methods(known)
        unsupported = set(self.methods) - set(usable)
        if unsupported:
            raise ValueError(
                f"the {known.title} demo fine-tunes with {', '.join(usable)}, not "
                f"{', '.join(sorted(unsupported))}"
            )
        for method in self.methods:
            recipes.get(method).check(self)
        if self.own_cfg_scales and families.get(known.family).own_guidance is None:
            raise ValueError(
                f"own_cfg_scales: {known.title} models have no guidance of their own besides "
                "the CFG scale; leave it empty"
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
    def reference_slice(self) -> slice:
        """The test images of the split: the first half for reports, the second for tuning."""
        start = SPLITS.index(self.split) * SPLIT_IMAGES
        return slice(start, start + self.reference_images)

    @property
    def sample_seed(self) -> int:
        """The samplers' seed: the run's own for reports, a disjoint stream for tuning."""
        return self.seed + SPLITS.index(self.split) * TUNE_SEED_OFFSET

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
