"""The memory plan of a training run, computed before anything is allocated.

``plan_memory`` counts, for the policy on one GPU: weights, gradients and optimizer state exactly
from the parameters (a model built on the meta device, LoRA adapters included), the frozen
reference copy when the method holds one, the activations autograd saves for one micro-batch (the
model family's estimate, with or without per-block activation checkpointing, for the rows the
method sends through the policy), a workspace for the largest transient and the largest
micro-batch that fits a given GPU memory. ``saved_activation_bytes`` measures the activations on
a real (small) model, which is how each family's estimate is tested.
"""

from __future__ import annotations

import gc
import os
import re
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ccalign import hub
from ccalign.errors import UserError
from ccalign.models import families
from ccalign.models.family import Activations, Dtypes

if TYPE_CHECKING:
    from ccalign.train.config import TrainConfig

GIB = 2**30
#: share of the GPU kept free for the CUDA context, cuBLAS workspaces and allocator fragmentation
HEADROOM = 0.08
OPTIMIZERS = ("adamw", "adamw8bit")
_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float64: "fp64"}
__all__ = ["Activations", "Dtypes", "MemoryPlan", "Workload", "plan_memory", "plan_from_config"]


@dataclass(frozen=True)
class Workload:
    """What a method sends through the model per item, and LoRA's adapters, for the plan."""

    policy_rows: float = 2.0  # sequences with gradient (CCA: true and mismatched label)
    nograd_rows: float = 2.0  # sequences through a forward without gradient
    reference_copy: bool = True  # a frozen copy of the policy's weights
    held_hidden: bool = False  # the no-gradient pass's hidden states live through backward (GFT)
    lora_rank: int = 0  # LoRA adapters' rank (0: none; then only they train)
    lora_dropout: bool = False


@dataclass
class MemoryPlan:
    """Bytes per item for one process training ``micro_batch`` images at a time."""

    model: str
    parameters: int
    micro_batch: int
    rows: int  # sequences through the policy with gradient per micro-batch (2 per image: CCA)
    seq_len: int
    weights: int
    gradients: int
    optimizer: int
    reference: int
    autocast_copies: int  # bf16 copies of float32 matrix weights held by autocast in forward
    activations: int  # saved for backward (the held hidden states of GFT and LoRA's included)
    activations_other: int  # the same micro-batch with activation checkpointing flipped
    workspace: int
    activation_checkpointing: bool
    optimizer_name: str
    weights_dtype: str
    reference_dtype: str
    trainable: int = 0  # parameters that train (all, the unfrozen ones, or LoRA's adapters)
    device_type: str = "cuda"
    gpu_memory: int | None = None
    max_micro_batch: int | None = None

    @property
    def total(self) -> int:
        return (
            self.weights
            + self.gradients
            + self.optimizer
            + self.reference
            + self.autocast_copies
            + self.activations
            + self.workspace
        )

    def to_dict(self) -> dict:
        return {**asdict(self), "total": self.total}

    def table(self) -> str:
        """The plan as lines of text (GiB), ready to print."""
        ac = "on" if self.activation_checkpointing else "off"
        trains = (
            "" if self.trainable == self.parameters else f" ({self.trainable:,} trainable)"
        )
        lines = [
            f"memory plan: {self.model}, {self.parameters:,} parameters{trains}, micro-batch "
            f"{self.micro_batch} ({self.rows} sequences x {self.seq_len} positions), weights "
            f"{self.weights_dtype}, reference {self.reference_dtype}, {self.optimizer_name}, "
            f"activation checkpointing {ac}",
            _line("weights", self.weights),
            _line("gradients", self.gradients),
            _line("optimizer state", self.optimizer),
            _line("reference", self.reference),
        ]
        if self.device_type != "cuda":
            lines.insert(1, f"  (planned for {self.device_type}: pass --device cuda for a GPU run)")
        if self.autocast_copies:
            lines.append(_line("autocast bf16 weight copies", self.autocast_copies))
        other = "off" if self.activation_checkpointing else "on"
        lines += [
            _line(f"activations (checkpointing {ac})", self.activations),
            _line(f"  (with checkpointing {other}: {self.activations_other / GIB:.2f} GiB)", None),
            _line("workspace (largest transient)", self.workspace),
            _line("total", self.total),
        ]
        if self.gpu_memory is not None:
            fits = "none fits" if not self.max_micro_batch else str(self.max_micro_batch)
            lines.append(
                f"GPU memory {self.gpu_memory / GIB:.1f} GiB ({HEADROOM:.0%} kept free): largest "
                f"micro-batch that fits: {fits}"
            )
        return "\n".join(lines)


def _line(label: str, value: int | None) -> str:
    if value is None:
        return f"  {label}"
    return f"  {label:<36}{value / GIB:>9.2f} GiB"


# ---- exact counts ----
def parameter_bytes(model: nn.Module, dtype: torch.dtype) -> int:
    """Bytes of the floating-point parameters stored in ``dtype``."""
    return sum(p.numel() * dtype.itemsize for p in model.parameters() if p.is_floating_point())


def optimizer_state_bytes(params: Iterable[Tensor], optimizer: str, weights: torch.dtype) -> int:
    """Bytes of the optimizer state on the parameters' device, as the trainer's optimizer keeps it.

    adamw, float32 (float64) weights: torch AdamW, two moments in the weights' dtype plus a
    float32 step per tensor.
    adamw, bf16 weights: ``CompensatedAdamW``, float32 moments and a bf16 remainder, its
    step a Python int. adamw8bit (torchao ``AdamW8bit``,
    block 256): tensors of at least 4096 values that divide into blocks get uint8 codes, a
    float32 scale per block and a 256-entry float32 map per moment; smaller ones keep moments in
    the parameter's dtype.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optim.optimizer = {optimizer!r} is not one of {list(OPTIMIZERS)}")
    total = 0
    for p in params:
        n = p.numel()
        if optimizer == "adamw8bit":
            quantized = n >= 4096 and n % 256 == 0
            total += 2 * (n + 4 * (n // 256) + 4 * 256) if quantized else 2 * n * weights.itemsize
        elif weights.itemsize >= 4:
            total += 2 * n * weights.itemsize + 4
        else:
            total += 8 * n + 2 * n
    return total


# ---- the plan ----
def plan_memory(
    model: nn.Module,
    *,
    micro_batch: int,
    dtypes: Dtypes,
    optimizer: str = "adamw",
    activation_checkpointing: bool = False,
    workload: Workload = Workload(),
    gpu_memory: int | None = None,
    name: str | None = None,
) -> MemoryPlan:
    """The plan for ``model`` (any device, meta included); see the module doc."""
    estimate = families.of(model).activations
    plan = _plan(model, estimate, micro_batch, dtypes, optimizer, activation_checkpointing,
                 workload)
    plan.model = name or plan.model
    if gpu_memory is not None:
        plan.gpu_memory = gpu_memory
        plan.max_micro_batch = largest_micro_batch(
            model, dtypes, optimizer, activation_checkpointing, workload, gpu_memory
        )
    return plan


def _plan(model, estimate, micro_batch, dtypes, optimizer, checkpointing, workload) -> MemoryPlan:
    trainable = [p for p in model.parameters() if p.requires_grad]
    rows = max(1, round(micro_batch * workload.policy_rows))
    nograd = round(micro_batch * workload.nograd_rows)
    acts = estimate(model, rows, dtypes, checkpointing)
    other = estimate(model, rows, dtypes, not checkpointing)
    extra = _extra_saved(model, rows, nograd, dtypes, workload)
    fp32_autocast = dtypes.autocast and dtypes.weights == torch.float32
    linear = sum(
        m.weight.numel() for m in model.modules()
        if isinstance(m, nn.Linear) and m.weight.requires_grad
    )
    copy = workload.reference_copy and not workload.lora_rank
    return MemoryPlan(
        model=type(model).__name__,
        parameters=sum(p.numel() for p in model.parameters()),
        micro_batch=micro_batch,
        rows=rows,
        seq_len=_positions(model),
        weights=parameter_bytes(model, dtypes.weights),
        gradients=sum(p.numel() * dtypes.weights.itemsize for p in trainable),
        optimizer=optimizer_state_bytes(trainable, optimizer, dtypes.weights),
        reference=parameter_bytes(model, dtypes.reference) if copy else 0,
        autocast_copies=2 * linear if fp32_autocast else 0,
        activations=acts.saved + extra,
        activations_other=other.saved + extra,
        workspace=acts.workspace,
        activation_checkpointing=checkpointing,
        optimizer_name=optimizer,
        weights_dtype=_NAMES[dtypes.weights],
        reference_dtype=_NAMES[dtypes.reference] if copy else "none (not held)",
        trainable=sum(p.numel() for p in trainable),
        device_type=dtypes.device_type,
    )


def _extra_saved(model, rows: int, nograd: int, dtypes: Dtypes, workload: Workload) -> int:
    """Saved bytes beyond the family's estimate: GFT's held hidden states (the no-gradient
    pass's, kept for the mixed logits) and LoRA's rank-wide products (and dropped inputs)."""
    extra = 0
    if workload.held_hidden:
        extra += nograd * model.seq_len * _width(model) * dtypes.weight_bytes
    if workload.lora_rank:
        c = dtypes.compute_bytes
        for module in _adapted_linears(model):
            per_token = workload.lora_rank * c
            if workload.lora_dropout:
                per_token += module.in_features * c + dtypes.mask_bytes(c) * module.in_features
            extra += rows * _positions(model) * per_token
    return extra


def _positions(model: nn.Module) -> int:
    """Sequence positions of a teacher-forced pass (a T2I model's caption included)."""
    return getattr(model, "positions", model.seq_len)


def _width(model: nn.Module) -> int:
    """Width of the final hidden states: the input width of the output head (the linear layer
    onto the vocabulary)."""
    heads = [m for m in model.modules()
             if isinstance(m, nn.Linear) and m.out_features == model.vocab_size]
    return heads[-1].in_features


def _adapted_linears(model: nn.Module) -> list[nn.Linear]:
    """The base layers that carry LoRA adapters (peft keeps them as ``base_layer``)."""
    return [
        m.base_layer for m in model.modules()
        if hasattr(m, "lora_A") and isinstance(getattr(m, "base_layer", None), nn.Linear)
    ]


def largest_micro_batch(
    model, dtypes, optimizer, checkpointing, workload: Workload, gpu_memory: int,
    limit: int = 4096,
) -> int:
    """The largest micro-batch whose plan fits ``gpu_memory`` less the headroom (0: none)."""
    usable = gpu_memory * (1 - HEADROOM)
    estimate = families.of(model).activations

    def fits(batch: int) -> bool:
        plan = _plan(model, estimate, batch, dtypes, optimizer, checkpointing, workload)
        return plan.total <= usable

    smallest = 2 if workload.policy_rows >= 2 and workload.reference_copy else 1
    if not fits(smallest):
        return 0
    low, high = smallest, limit
    while low < high:  # the total grows with the batch
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    return low


def _check_local_init(init: str | None) -> None:
    """A registry name with a typo would be planned as the default preset: refuse it. (A file
    not downloaded yet is planned from the config's preset: a plan needs no weights.)"""
    if init is None or hub.find(init) is not None or init.startswith(hub.HF_SCHEME):
        return
    if hub.resolve(init, kind="model").is_dir():  # resolve refuses a typo of a registry name
        raise FileNotFoundError(f"model.init {init} is a folder; give the checkpoint file itself")


def plan_from_config(config: TrainConfig, gpu_memory: int | None = None) -> MemoryPlan:
    """The plan of the run ``config`` describes, on one process (no FSDP sharding counted).

    The model is built on the meta device: nothing is allocated and no weights are read (a
    ccalign ``model.init`` file is opened for its recorded architecture only). The method says
    what goes through it (``Method.workload``); LoRA adapters are added as the trainer adds them.
    ``gpu_memory`` defaults to the first visible GPU's, when there is one.
    """
    from ccalign.train import lora, methods
    from ccalign.train.build import spec_from_section
    from ccalign.train.precision import WEIGHT_DTYPES, reference_dtype

    train, method = config.train, methods.get(config.method.name)
    spec = spec_from_section(config.model, method)
    _check_local_init(spec.init)
    family = families.identify(spec)
    families.check_options(family, spec)
    adapters = config.method.lora
    with torch.device("meta"):
        model = family.model_class(family.config_for(spec))
        if adapters.enabled:
            lora.add_adapters(model, adapters, seed=0)
    model.train(config.method.dropout != "none")
    on_cpu = train.device == "cpu" or (train.device == "auto" and not torch.cuda.is_available())
    autocast = train.precision == "bf16" or (train.precision == "auto" and not on_cpu)
    dtypes = Dtypes(
        weights=WEIGHT_DTYPES[train.weights_dtype],
        reference=reference_dtype(train),
        autocast=autocast,
        device_type="cpu" if on_cpu else "cuda",
    )
    if gpu_memory is None and torch.cuda.is_available():
        gpu_memory = torch.cuda.get_device_properties(0).total_memory
    return plan_memory(
        model,
        micro_batch=train.micro_batch,
        dtypes=dtypes,
        optimizer=config.optim.optimizer,
        activation_checkpointing=train.activation_checkpointing,
        workload=Workload(
            policy_rows=method.policy_rows(config.method),
            nograd_rows=method.nograd_rows(config.method),
            reference_copy=method.reference_copy,
            held_hidden=method.held_hidden,
            lora_rank=adapters.rank if adapters.enabled else 0,
            lora_dropout=adapters.enabled and adapters.dropout > 0,
        ),
        gpu_memory=gpu_memory,
        name=f"{config.model.name} {family.describe(model)}",
    )


#: how far a plan may exceed the free memory before a run is refused: the plan is an estimate
#: (allocator slack and the CPU's reclaimable caches go either way)
FIT_MARGIN = 1.25
#: set to 1 to train even when the plan says the run does not fit
SKIP_CHECK_ENV = "CCALIGN_SKIP_MEMORY_CHECK"


def check_fits(config: TrainConfig, processes_per_device: int = 1) -> None:
    """Refuse, before anything is allocated, a run whose memory plan exceeds the memory its
    device has free (on the CPU, ``processes_per_device`` runs share it), naming the plan
    and the fixes. Sharded (FSDP) runs are not checked: the plan counts one whole copy."""
    if os.environ.get(SKIP_CHECK_ENV) == "1" or config.train.parallel == "fsdp":
        return
    try:
        plan = plan_from_config(config)
    except (ValueError, OSError, UserError):
        return  # a model the plan cannot describe: building it reports why, with the file
    free = free_memory(plan.device_type)
    sharing = processes_per_device if plan.device_type == "cpu" else 1
    if free is None or plan.total * sharing <= free * FIT_MARGIN:
        return
    plan = plan_from_config(config, gpu_memory=free // sharing)  # with the micro-batch that fits
    fix = (
        f"lower train.micro_batch (at most {plan.max_micro_batch} fits)"
        if plan.max_micro_batch
        else "no micro-batch fits beside the weights and optimizer state: use LoRA "
        "(method.lora) or more memory"
    )
    raise ValueError(
        f"the run needs about {_size(plan.total * sharing)} of {plan.device_type} memory "
        f"(micro-batch {plan.micro_batch}; `--dry-run` prints the plan) but {_size(free)} is "
        f"free: {fix}, set train.activation_checkpointing = true or "
        f'train.weights_dtype = "bf16" ({SKIP_CHECK_ENV}=1 skips this check)'
    )


def _size(count: int) -> str:
    return f"{count / GIB:.1f} GiB" if count >= GIB else f"{count / 2**20:.1f} MiB"


def free_memory(device_type: str) -> int | None:
    """Bytes free for a new run: the current GPU's, or the CPU's available memory (Linux's
    MemAvailable); None where it cannot be known."""
    if device_type == "cuda":
        return torch.cuda.mem_get_info()[0] if torch.cuda.is_available() else None
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
    except OSError:
        return None
    available = fields.get("MemAvailable", "").split()
    return int(available[0]) * 1024 if available else None


def parse_memory(text: str) -> int:
    """'80GiB', '141GB', '80G', '81920MiB' -> bytes (G and GB read as GiB: GPUs are sold so)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT])(i?B)?\s*", text, re.IGNORECASE)
    if match is None:
        raise ValueError(f"--gpu-memory {text!r} is not a size; write e.g. 80GiB or 141GB")
    power = "KMGT".index(match.group(2).upper()) + 1
    return int(float(match.group(1)) * 1024**power)


# ---- measurement (the check of the estimates) ----
def saved_activation_bytes(forward: Callable[[], Tensor], keep_out: Iterable[Tensor]) -> int:
    """Bytes of the tensors that ``forward()``'s autograd graph holds for backward.

    Counts each storage once: those autograd saves (through a saved-tensor hook) and those
    Python objects keep alive (activation checkpointing keeps block inputs that way), minus the
    storages of ``keep_out`` (parameters, buffers, inputs) and of tensors alive before.
    """
    before = _live_tensors()
    excluded = {_storage_key(t) for t in [*before, *keep_out]}
    packed: list[Tensor] = []

    def pack(t: Tensor) -> Tensor:
        packed.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    alive = packed + [t for t in _live_tensors() if t is not out]
    storages = {_storage_key(t): t.untyped_storage().nbytes() for t in alive}
    del out
    return sum(n for key, n in storages.items() if key not in excluded)


def _live_tensors() -> list[Tensor]:
    """Every tensor with a real storage that Python can reach, looking at each object's type
    only (not through weak proxies), quietly: not the fake tensors that a torch.compile
    elsewhere in the process may leave."""
    with warnings.catch_warnings():  # deprecated torch attributes warn when inspected
        warnings.simplefilter("ignore", FutureWarning)
        return [o for o in gc.get_objects() if issubclass(type(o), Tensor) and _has_storage(o)]


def _has_storage(t: Tensor) -> bool:
    """False for fake, functional and meta tensors (no memory of their own)."""
    from torch._subclasses.fake_tensor import FakeTensor

    if isinstance(t, FakeTensor) or t.is_meta:
        return False
    try:
        t.untyped_storage().data_ptr()
    except RuntimeError:  # a functional tensor, or a fake one under another wrapper
        return False
    return True


def _storage_key(t: Tensor) -> int:
    return t.untyped_storage().data_ptr()
