"""Training configuration: plain dataclasses read from TOML or YAML, with dotted overrides.

A config file has the sections ``[model]``, ``[data]``, ``[method]``, ``[optim]``, ``[train]``
and ``[checkpoint]``; every key is optional and unknown keys are errors (a typo must not be
silently ignored). ``--set optim.lr=1e-4`` style overrides are parsed as TOML values.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ccalign.settings import MAX_SEED, build_table, check_fields, ranged

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

SCHEDULES = ("constant", "linear", "cosine")
PRECISIONS = ("auto", "bf16", "fp32")
WEIGHT_DTYPES = ("fp32", "bf16", "fp64")
REFERENCE_DTYPES = ("auto", "fp32", "bf16", "fp64")
OPTIMIZERS = ("adamw", "adamw8bit")
PARALLEL = ("ddp", "fsdp")
DATA_VIEWS = ("center", "flip", "var-crop")
DROPOUT_MODES = ("both", "none", "policy-only")
CHECKPOINT_FORMATS = ("auto", "full", "sharded")
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
#: keys that no longer exist, and what to write instead
_RENAMED = {
    ("method", "reference_dropout"): 'method.dropout = "both" (policy and reference in train '
    'mode, the official recipe) or "none" (dropout off in both)',
}


@dataclass
class ModelSection:
    """Which model to train: a preset (``GPT-L``, ``VAR-d16``) or ``custom`` with ``arch`` sizes.

    ``family`` names the model family when nothing else tells it (a fresh custom model of a
    family other than LlamaGen); ``grid`` and ``vae`` are options of one family each.
    """

    name: str = "GPT-L"
    family: str | None = None  # None: from the registry entry, the init file or the preset
    # LlamaGen only: tokens per side (VAR's scales come with its preset)
    grid: int = ranged(24, ge=1, le=1024)
    init: str | None = None  # pretrained checkpoint (finetune); None builds a fresh model
    arch: dict = field(default_factory=dict)  # config overrides (dim, dropouts, drop_path, ...)
    # also write the final model in the official layout: LlamaGen's {"model": sd} final.pt,
    # VAR's raw state_dict final.pth
    save_official: bool = False
    # VAR only: the multi-scale VQVAE (file, registry name such as var-vae, or hf://) whose
    # quantiser builds the teacher-forcing input; needed for official VAR files and fresh
    # models; ccalign VAR files carry its quantiser, registry VAR names default to their VQVAE
    vae: str | None = None

    def family_options(self) -> dict:
        """The family options this section sets (``grid``, ``vae``), defaults left out."""
        default = ModelSection()
        return {
            key: getattr(self, key)
            for key in _FAMILY_OPTIONS
            if getattr(self, key) != getattr(default, key)
        }


#: [model] keys that one family reads and the others refuse
_FAMILY_OPTIONS = ("grid", "vae")


@dataclass
class DataSection:
    """The training data: pre-extracted codes, or images encoded on the fly by ``tokenizer``."""

    path: str | None = None  # codes; with tokenizer: an image folder or fashion-mnist:<split>
    # text-to-image models: caption features (ccalign encode-captions), one per image of path
    captions: str | None = None
    # and shorter captions of the same images (same layout), taken by a share of the items each
    # epoch, as LlamaGen's T2I training takes its short-caption features for 30% of them
    short_captions: str | None = None
    short_share: float = ranged(0.3, ge=0, le=1)
    tokenizer: str | None = None  # tokenizer file or "fmnist-vq"; None: path holds codes
    # with tokenizer: "center" crop, "flip" (a random mirror per item) or "var-crop" (VAR's view:
    # short side to 1.125x the size, a random crop each epoch)
    views: str = "center"
    # with tokenizer: crop size (None: the tokenizer's own)
    image_size: int | None = ranged(None, ge=1, le=16384)
    seed: int = ranged(0, ge=0, le=MAX_SEED)  # data order and view choice
    num_workers: int = ranged(0, ge=0, le=1024)
    validate: bool = True  # check labels / tokens / length against the model before training


@dataclass
class LoraSection:
    """LoRA adapters on the policy (``[method.lora]``, through peft); off by default.

    The reference is then the policy with its adapters switched off: no second copy of the
    weights, and the optimizer holds only the adapters' state.
    """

    enabled: bool = False
    rank: int = ranged(16, ge=1, le=65536)
    alpha: float = ranged(16.0, gt=0, le=1e6)  # adapter output scaled by alpha / rank
    # dropout on the adapters' input (policy in train mode only)
    dropout: float = ranged(0.0, ge=0, lt=1)
    # linear layers to adapt; empty: the model family's defaults (LlamaGen: wqkv, wo, w1, w2,
    # w3; VAR: proj, fc1, fc2 and the AdaLN projections)
    target_modules: list[str] = field(default_factory=list)


@dataclass
class MethodSection:
    """The objective: an alignment loss against a frozen reference, plain MLE, or GFT."""

    name: str = "cca"
    beta: float = ranged(0.02, gt=0, le=1e4)
    lam: float = ranged(300.0, ge=0, le=1e9)
    # alignment: rows whose labels become the null class
    uncond_ratio: float = ranged(0.1, ge=0, le=1)
    # mle, gft: rows whose label becomes the null class
    class_dropout: float = ranged(0.1, ge=0, le=1)
    # Dropout of policy and reference, kept consistent so D = log p_theta - log p_ref starts at 0:
    # "both": both in train mode with their own masks (the official --keep_dropout recipe; D is
    # noisy but unbiased); "none": dropout off in both (D = 0 exactly at the start);
    # "policy-only": policy with dropout against an exact reference, which biases D by the
    # dropout gap (as if lambda were multiplied by exp(-beta * gap)): only on explicit request.
    dropout: str = "both"
    lora: LoraSection = field(default_factory=LoraSection)
    # DDO (Direct Discriminative Optimization): negatives are samples of the reference model.
    # beta and uncond_ratio above apply too; lam does not.
    # weight of the reference's samples (conditional rows)
    alpha: float = ranged(50.0, ge=0, le=1e9)
    # rounds this run trains; each fine-tunes from and against the one before
    rounds: int = ranged(1, ge=1, le=1000)
    # index of the first of them: keys its negatives and its data order
    round: int = ranged(1, ge=1, le=1_000_000)
    # "file" (default): before training, sample every negative the round will use into
    # <out>/negatives.safetensors, in large batches with the sampler in inference mode,
    # resumable and shared by all processes; "online": sample each micro-batch's negatives
    # inside the training step (small batches). Both draw from the same distribution, at the
    # precision the loss scores them with (reference dtype, trainer autocast); the file is the
    # cheaper.
    negatives: str = "file"
    # rows per sampling call (file mode), part of the random key
    negatives_batch: int = ranged(256, ge=1, le=2**20)
    # 1, top-k 0, top-p 1: exact samples of the reference (VAR's sampler has no temperature)
    negatives_temperature: float = ranged(1.0, gt=0, le=100)
    negatives_top_k: int = ranged(0, ge=0, le=2**24)
    negatives_top_p: float = ranged(1.0, gt=0, le=1)
    # VAR only: decode each sample (its f_hat) to 8-bit pixels with the VQVAE (model.vae) and
    # re-encode them, as NVlabs/DDO's VAR code makes its negatives from saved images
    negatives_retokenize: bool = False


@dataclass
class OptimSection:
    """AdamW with LlamaGen's parameter groups, clipping, schedule and optional EMA."""

    lr: float = ranged(1e-5, gt=0, le=1)
    betas: tuple[float, float] = ranged((0.9, 0.95), ge=0, lt=1)
    eps: float = ranged(1e-8, gt=0, le=1)
    weight_decay: float = ranged(0.05, ge=0, le=100)
    grad_clip: float = ranged(1.0, ge=0, le=1e6)  # 0 disables clipping (the norm is still logged)
    schedule: str = "constant"
    warmup_steps: int = ranged(0, ge=0, le=10**9)
    warmup_ratio: float = ranged(0.0, ge=0, le=1)  # used when warmup_steps is 0
    # final lr of linear / cosine decay, as a fraction of lr
    min_lr_ratio: float = ranged(0.0, ge=0, le=1)
    # lr at the start of warmup, as a fraction of lr (VAR: 0.005)
    warmup_start_ratio: float = ranged(0.0, ge=0, le=1)
    # share of the post-warmup steps at the peak before decay (VAR: 0.05)
    hold_ratio: float = ranged(0.0, ge=0, lt=1)
    # weight decay at the last step, reached by a half cosine from weight_decay (VAR's twde);
    # None: constant weight_decay
    final_weight_decay: float | None = ranged(None, ge=0, le=100)
    ema_decay: float = ranged(0.0, ge=0, lt=1)  # 0 disables EMA
    # adamw: torch's AdamW (float32 weights) or ccalign's compensated bf16 AdamW (bf16 weights),
    # float32 moments either way; adamw8bit: torchao's AdamW8bit (pip install torchao)
    optimizer: str = "adamw"


@dataclass
class TrainSection:
    """Batch geometry, length, precision and logging."""

    global_batch: int = ranged(256, ge=1, le=2**24)
    # per process; accumulation = global / (micro * world)
    micro_batch: int = ranged(8, ge=1, le=2**20)
    steps: int = ranged(0, ge=0, le=10**9)  # 0: derived from epochs
    epochs: float = ranged(1.0, gt=0, le=1e6)
    precision: str = "auto"  # auto: bf16 autocast on CUDA, float32 on CPU
    activation_checkpointing: bool = False  # recompute each block in backward: less memory
    # fp32, or bf16: the policy's weights (and gradients) in bf16, float32 optimizer moments and
    # a bf16 remainder per weight so that small updates are not rounded away (see
    # ccalign.train.precision); the memory plan: `ccalign finetune --dry-run`. fp64: every
    # weight, sum and moment in float64 (with train.precision = "fp32"), for comparing two ways
    # of computing the same run exactly on any CPU (tests), not for speed
    weights_dtype: str = "fp32"
    reference_dtype: str = "auto"  # the frozen reference's weights; auto: as weights_dtype
    parallel: str = "ddp"  # with several processes: ddp (replicas) or fsdp (sharded states)
    device: str = "auto"
    seed: int = ranged(0, ge=0, le=MAX_SEED)
    log_every: int = ranged(1, ge=1, le=10**9)
    progress: bool = True


@dataclass
class CheckpointSection:
    """Where the run writes and how often it saves resumable state."""

    out: str = "runs/ccalign"
    every: int = ranged(500, ge=1, le=10**9)
    keep: int = ranged(3, ge=1, le=10**6)
    # "full": one file, whole states gathered on rank 0; "sharded": a folder, each process
    # writes its own shard (torch.distributed.checkpoint); "auto": sharded under FSDP, else full
    format: str = "auto"


@dataclass
class TrainConfig:
    """The whole run; ``to_dict`` is what checkpoints record."""

    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    method: MethodSection = field(default_factory=MethodSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> TrainConfig:
        """Build from nested dicts, rejecting unknown sections and keys by name."""
        sections = {f.name: f.type for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - set(sections))
        if unknown:
            raise ValueError(f"unknown config section(s) {unknown}; valid: {sorted(sections)}")
        built = {name: _build_section(name, raw.get(name, {})) for name in sections}
        config = cls(**built)
        config.validate()
        return config

    def validate(self) -> None:
        """Reject values that cannot work, naming the key and the valid choices or range."""
        from ccalign.train import methods

        check_fields(self)  # every number finite and in its declared range

        method = methods.get(self.method.name)
        _choice("optim.schedule", self.optim.schedule, SCHEDULES)
        _choice("train.precision", self.train.precision, PRECISIONS)
        _choice("train.parallel", self.train.parallel, PARALLEL)
        _choice("method.dropout", self.method.dropout, DROPOUT_MODES)
        _choice("checkpoint.format", self.checkpoint.format, CHECKPOINT_FORMATS)
        _choice("train.weights_dtype", self.train.weights_dtype, WEIGHT_DTYPES)
        _choice("train.reference_dtype", self.train.reference_dtype, REFERENCE_DTYPES)
        if self.train.weights_dtype == "fp64" and self.train.precision != "fp32":
            raise ValueError(
                'train.weights_dtype = "fp64" computes in float64: set train.precision = "fp32" '
                "(no bf16 autocast)"
            )
        _choice("optim.optimizer", self.optim.optimizer, OPTIMIZERS)
        if not _DEVICE.match(self.train.device):
            raise ValueError(
                f"train.device = {self.train.device!r} is not a device ccalign trains on; use "
                "auto, cpu, cuda, cuda:N or mps"
            )
        _validate_data(self.data)
        _validate_lora(self)
        method.validate(self)


_SECTION_TYPES = {
    "model": ModelSection,
    "data": DataSection,
    "method": MethodSection,
    "optim": OptimSection,
    "train": TrainSection,
    "checkpoint": CheckpointSection,
}


def _build_section(name: str, values: Any) -> Any:
    if not isinstance(values, dict):
        raise ValueError(f"config section [{name}] must be a table, got {values!r}")
    for key in values:
        if (name, key) in _RENAMED:
            raise ValueError(f"{name}.{key} was replaced: write {_RENAMED[name, key]}")
    return build_table(name, values, _SECTION_TYPES[name])


def _validate_data(data: DataSection) -> None:
    """Image-only keys need a tokenizer: code files carry their own views and size."""
    _choice("data.views", data.views, DATA_VIEWS)
    if data.tokenizer is None and (data.views != "center" or data.image_size is not None):
        raise ValueError(
            "data.views and data.image_size apply to images encoded on the fly: set "
            "data.tokenizer (--tokenizer), or leave them out when data.path holds codes"
        )


def _validate_lora(config: TrainConfig) -> None:
    """LoRA's sizes, and the options it does not combine with (EMA, FSDP)."""
    lora = config.method.lora
    if not lora.enabled:
        return
    if config.optim.ema_decay > 0:
        raise ValueError(
            "optim.ema_decay > 0 with method.lora is not supported (the average would copy the "
            "whole model): set optim.ema_decay = 0 or method.lora.enabled = false"
        )
    if config.train.parallel == "fsdp":
        raise ValueError(
            'method.lora with train.parallel = "fsdp" is not supported yet: use "ddp" (with '
            "LoRA each process holds the frozen weights once and only the adapters' optimizer "
            "state)"
        )
    if config.checkpoint.format == "sharded":
        raise ValueError(
            'method.lora with checkpoint.format = "sharded" is not supported: LoRA checkpoints '
            'hold only the adapters, which are small; use "auto" or "full"'
        )


#: keys a resumed run may change (each change is recorded): where files are, how it runs,
#: logs and checkpoints, and how long it trains (which also stretches a decaying lr schedule)
RESUMABLE_CHANGES = frozenset(
    {
        "model.init",  # the weights themselves are checked by fingerprint
        "model.vae",  # a moved VQVAE file: its quantiser is part of the fingerprinted reference
        "model.save_official",
        "data.path",  # the data set's size is checked; a moved folder is fine
        "data.num_workers",
        "data.validate",
        "train.steps",
        "train.epochs",
        "train.activation_checkpointing",
        "train.device",
        "train.log_every",
        "train.progress",
        "checkpoint.out",
        "checkpoint.every",
        "checkpoint.keep",
        "checkpoint.format",  # resuming reads either kind
    }
)


def resumable_change(key: str, method: str) -> bool:
    """Whether a resumed run may change ``key``; the micro-batch only for methods that draw
    nothing within it (the alignment methods roll negatives in it, DDO keys its online
    negatives by it)."""
    if key == "train.micro_batch":
        from ccalign.train import methods

        return not methods.get(method).micro_batch_keyed
    return key in RESUMABLE_CHANGES


def check_same_recipe(where: Any, saved: dict, current: dict) -> dict[str, tuple[Any, Any]]:
    """Refuse a resume that would change what the run computes (naming each changed key);
    returns the harmless changes (paths, logging, length), which a resume records."""
    changes = config_changes(saved, current)
    method = current["method"]["name"]
    refused = {k: v for k, v in changes.items() if not resumable_change(k, method)}
    if refused:
        listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in refused.items())
        raise ValueError(
            f"cannot resume from {where} with a different recipe ({listed}); resume with the "
            "run's own settings (its config.json), or start over with --restart or a new --out"
        )
    return changes


def config_changes(saved: dict, current: dict) -> dict[str, tuple[Any, Any]]:
    """``{dotted key: (saved value, current value)}`` for every key that differs.

    A key the saved config lacks (written before the key existed) counts as its default.
    """
    old = {**_flatten(TrainConfig().to_dict()), **_flatten(saved)}
    new = _flatten(current)
    return {
        key: (old.get(key), new.get(key))
        for key in sorted(old.keys() | new.keys())
        if _comparable(old.get(key)) != _comparable(new.get(key))
    }


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and not prefix:  # sections; values that are tables stay whole
            flat.update(_flatten(value, f"{key}."))
        else:
            flat[prefix + key] = value
    return flat


def _comparable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{key} = {value!r} is not one of {list(choices)}")


def read_config_file(path: str | Path) -> dict:
    """Read a TOML (``.toml``) or YAML (``.yaml``/``.yml``) file into nested dicts."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"config file not found: {path}")
    if path.suffix == ".toml":
        with open(path, "rb") as f:
            try:
                return tomllib.load(f)
            except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
                raise ValueError(f"{path} is not valid TOML: {exc}") from None
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(path.read_text()) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            where = getattr(exc, "problem_mark", None)
            at = f" (line {where.line + 1}, column {where.column + 1})" if where else ""
            problem = getattr(exc, "problem", None) or exc
            raise ValueError(f"{path} is not valid YAML{at}: {problem}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a mapping of sections")
        return data
    raise ValueError(f"config file {path} must end in .toml, .yaml or .yml")


def apply_overrides(raw: dict, assignments: list[str]) -> dict:
    """Apply ``section.key=value`` strings (values parsed as TOML, else taken as strings)."""
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for assignment in assignments:
        key, sep, text = assignment.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) < 2 or not all(parts):
            raise ValueError(
                f"override {assignment!r} must look like section.key=value, e.g. optim.lr=1e-4"
            )
        target = raw
        for part in parts[:-1]:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ValueError(f"override {assignment!r}: {part} is not a table")
        target[parts[-1]] = parse_value(text.strip())
    return raw


def parse_value(text: str) -> Any:
    """A TOML literal (number, bool, string, array, inline table) or else the raw string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """The config from a file (or the defaults when ``path`` is None) plus overrides."""
    raw = read_config_file(path) if path is not None else {}
    return TrainConfig.from_dict(apply_overrides(raw, list(overrides)))
