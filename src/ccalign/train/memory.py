"""The memory plan of a training run, computed before anything is allocated.

``plan_memory`` counts, for the policy on one GPU: weights, gradients and optimizer state exactly
from the parameters (a model built on the meta device), the frozen reference, the activations
autograd saves for one micro-batch (an estimate from the model's config, with or without
per-block activation checkpointing), a workspace for the largest transient (a chunk of logits in
backward, one recomputed block, the reference's forward) and the largest micro-batch that fits a
given GPU memory.

Activation estimates are looked up by model class in ``ACTIVATION_ESTIMATES``: a model family
registers a function ``(model, rows, dtypes, checkpointing) -> Activations`` (LlamaGen's and
VAR's are here). ``saved_activation_bytes`` measures the same quantity on a real
(small) model, which is how the LlamaGen estimate is tested.
"""

from __future__ import annotations

import gc
import re
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ccalign.models.llamagen import LlamaGen
from ccalign.models.var import VAR

GIB = 2**30
#: share of the GPU kept free for the CUDA context, cuBLAS workspaces and allocator fragmentation
HEADROOM = 0.08
#: positions per chunk of the vocabulary projection (LlamaGen.forward's default)
LOGIT_CHUNK = 4096
#: bytes of the CPU generator state that each checkpointed call keeps to replay its dropout
RNG_STATE = 5056
OPTIMIZERS = ("adamw", "adamw8bit")
_BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}


@dataclass(frozen=True)
class Dtypes:
    """Storage of weights and reference, whether the forward runs in bf16, where masks live."""

    weights: torch.dtype = torch.float32
    reference: torch.dtype = torch.float32
    autocast: bool = True  # bf16 autocast of the matrix products
    device_type: str = "cuda"  # dropout masks: bool (1 byte) on CUDA, the tensor's dtype on CPU

    @property
    def compute_bytes(self) -> int:
        """Bytes per element of the matrix products' outputs."""
        return 2 if self.autocast or self.weights != torch.float32 else 4

    def mask_bytes(self, tensor_bytes: int) -> int:
        return 1 if self.device_type == "cuda" else tensor_bytes


@dataclass(frozen=True)
class Activations:
    """What one micro-batch adds: ``saved`` for backward, ``workspace`` for the peak transient."""

    saved: int
    workspace: int


@dataclass
class MemoryPlan:
    """Bytes per item for one process training ``micro_batch`` images at a time."""

    model: str
    parameters: int
    micro_batch: int
    rows: int  # sequences through the policy per micro-batch (2 per image for alignment)
    seq_len: int
    weights: int
    gradients: int
    optimizer: int
    reference: int
    autocast_copies: int  # bf16 copies of float32 matrix weights held by autocast in forward
    activations: int
    activations_other: int  # the same micro-batch with activation checkpointing flipped
    workspace: int
    activation_checkpointing: bool
    optimizer_name: str
    weights_dtype: str
    reference_dtype: str
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
        lines = [
            f"memory plan: {self.model}, {self.parameters:,} parameters, micro-batch "
            f"{self.micro_batch} ({self.rows} sequences x {self.seq_len} tokens), weights "
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
    return sum(p.numel() * _BYTES[dtype] for p in model.parameters() if p.is_floating_point())


def optimizer_state_bytes(params: Iterable[Tensor], optimizer: str, weights: torch.dtype) -> int:
    """Bytes of the optimizer state on the parameters' device, as the trainer's optimizer keeps it.

    adamw, float32 weights: torch AdamW, float32 moments plus a float32 step per tensor.
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
            total += 2 * (n + 4 * (n // 256) + 4 * 256) if quantized else 2 * n * _BYTES[weights]
        elif weights == torch.float32:
            total += 8 * n + 4
        else:
            total += 8 * n + 2 * n
    return total


# ---- activations ----
def llamagen_activations(
    model: LlamaGen, rows: int, dtypes: Dtypes, checkpointing: bool
) -> Activations:
    """Saved tensors of one teacher-forced forward of ``rows`` sequences, and the workspace.

    Per token and block (D dim, F FFN width, H heads; r residual bytes = weight bytes, c compute
    bytes): each RMSNorm keeps its float32 input, the normalised value (r), its output as the
    next product's input (c) and a float32 rsqrt; attention keeps q, k (c each), the whole qkv
    output (3c: v is a view of it), its output (c) and a float32 log-sum-exp per head; the FFN
    keeps w1 x, w3 x, silu(w1 x) and their product (4 x F x c) and, under autocast of float32
    weights, a second bf16 cast of its input; dropout keeps a mask per dropped tensor. Outside
    the blocks: labels and tokens, the token-dropout mask, the final norm, and the generator
    state of each checkpointed call (the logit chunks). With checkpointing a block keeps only
    its input (r) and one block is recomputed at a time.
    """
    cfg = model.config
    dim, ffn, heads, seq = cfg.dim, cfg.ffn_hidden, cfg.n_head, cfg.seq_len
    r, c = _BYTES[dtypes.weights], dtypes.compute_bytes
    dropout = model.training
    resid_mask = dtypes.mask_bytes(c) if dropout and cfg.resid_dropout > 0 else 0
    ffn_mask = dtypes.mask_bytes(c) if dropout and cfg.ffn_dropout > 0 else 0
    token_mask = dtypes.mask_bytes(r) if dropout and cfg.token_dropout > 0 else 0
    norm = (4 + r + c) * dim + 4
    ffn_input_cast = c * dim if r != c else 0  # autocast casts the FFN input for w1 and for w3
    block = (
        2 * norm
        + 6 * c * dim
        + 4 * heads
        + (resid_mask + ffn_mask) * dim
        + 4 * c * ffn
        + ffn_input_cast
    )
    outside = token_mask * dim + (4 + 2 * r) * dim + 4 + 8  # + int64 token
    per_layer = r * dim if checkpointing else block
    tokens = rows * seq
    chunk = min(LOGIT_CHUNK, tokens)
    checkpoints = -(-tokens // chunk) + (cfg.n_layer if checkpointing else 0)
    saved = tokens * (cfg.n_layer * per_layer + outside) + 8 * rows + RNG_STATE * checkpoints
    logits = chunk * cfg.vocab_size * (2 * c + 12)  # recomputed chunk: products, fp32, grads
    block_transient = tokens * c * (3 * ffn + 3 * dim)  # gradients of a block's intermediates
    recompute = tokens * block if checkpointing else 0
    reference = tokens * c * (4 * ffn + 3 * dim)  # the reference's forward, one block at a time
    return Activations(saved, max(logits, block_transient + recompute, reference))


#: model class -> activation estimate; other families add theirs with ``register`` (VAR: below)
ACTIVATION_ESTIMATES: dict[type, Callable[..., Activations]] = {LlamaGen: llamagen_activations}


def register(model_class: type, estimate: Callable[..., Activations]) -> None:
    """Teach ``plan_memory`` the activations of another model family."""
    ACTIVATION_ESTIMATES[model_class] = estimate


def _estimate(model: nn.Module) -> Callable[..., Activations]:
    for cls, estimate in ACTIVATION_ESTIMATES.items():
        if isinstance(model, cls):
            return estimate
    raise ValueError(
        f"no activation estimate for {type(model).__name__}: register one with "
        "ccalign.train.memory.register(model_class, estimate)"
    )


# ---- the plan ----
def plan_memory(
    model: nn.Module,
    *,
    micro_batch: int,
    dtypes: Dtypes,
    optimizer: str = "adamw",
    activation_checkpointing: bool = False,
    alignment: bool = True,
    gpu_memory: int | None = None,
    name: str | None = None,
) -> MemoryPlan:
    """The plan for ``model`` (any device, meta included); see the module doc."""
    plan = _plan(model, micro_batch, dtypes, optimizer, activation_checkpointing, alignment)
    plan.model = name or plan.model
    if gpu_memory is not None:
        plan.gpu_memory = gpu_memory
        plan.max_micro_batch = largest_micro_batch(
            model, dtypes, optimizer, activation_checkpointing, alignment, gpu_memory
        )
    return plan


def _plan(model, micro_batch, dtypes, optimizer, checkpointing, alignment) -> MemoryPlan:
    trainable = [p for p in model.parameters() if p.requires_grad]
    rows = micro_batch * (2 if alignment else 1)
    estimate = _estimate(model)
    acts = estimate(model, rows, dtypes, checkpointing)
    other = estimate(model, rows, dtypes, not checkpointing)
    fp32_autocast = dtypes.autocast and dtypes.weights == torch.float32
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    return MemoryPlan(
        model=type(model).__name__,
        parameters=sum(p.numel() for p in model.parameters()),
        micro_batch=micro_batch,
        rows=rows,
        seq_len=model.seq_len,
        weights=parameter_bytes(model, dtypes.weights),
        gradients=sum(p.numel() * _BYTES[dtypes.weights] for p in trainable),
        optimizer=optimizer_state_bytes(trainable, optimizer, dtypes.weights),
        reference=parameter_bytes(model, dtypes.reference) if alignment else 0,
        autocast_copies=2 * linear if fp32_autocast else 0,
        activations=acts.saved,
        activations_other=other.saved,
        workspace=acts.workspace,
        activation_checkpointing=checkpointing,
        optimizer_name=optimizer,
        weights_dtype=_NAMES[dtypes.weights],
        reference_dtype=_NAMES[dtypes.reference],
        device_type=dtypes.device_type,
    )


_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16"}


def largest_micro_batch(
    model, dtypes, optimizer, checkpointing, alignment, gpu_memory: int, limit: int = 4096
) -> int:
    """The largest micro-batch whose plan fits ``gpu_memory`` less the headroom (0: none)."""
    usable = gpu_memory * (1 - HEADROOM)

    def fits(batch: int) -> bool:
        return _plan(model, batch, dtypes, optimizer, checkpointing, alignment).total <= usable

    smallest = 2 if alignment else 1
    if not fits(smallest):
        return 0
    low, high = smallest, limit
    while low < high:  # the total grows with the batch
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    return low


def plan_from_config(config, gpu_memory: int | None = None) -> MemoryPlan:
    """The plan of the run ``config`` describes, on one process (no FSDP sharding counted).

    The model is built on the meta device: nothing is allocated and no weights are read (a
    ccalign ``model.init`` file is opened for its recorded architecture only). ``gpu_memory``
    defaults to the first visible GPU's, when there is one.
    """
    from ccalign.train.precision import WEIGHT_DTYPES, reference_dtype

    train = config.train
    model = _meta_model(config.model)
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
        alignment=config.method.name != "mle",
        gpu_memory=gpu_memory,
        name=_plan_name(config.model.name, model),
    )


def _plan_name(name: str, model: nn.Module) -> str:
    """The plan's model label: the preset, with LlamaGen's grid or VAR's sequence length."""
    grid = getattr(model.config, "grid", None)
    return f"{name} grid {grid}" if grid is not None else f"{name} ({model.seq_len} tokens)"


def _meta_model(section) -> nn.Module:
    """The model ``section`` describes, on the meta device, without reading any weights."""
    from ccalign.train.run import config_family

    return META_MODELS[config_family(section)](section)


def _meta_llamagen(section) -> LlamaGen:
    from ccalign.models import llamagen

    recorded = None
    if section.init is not None and Path(section.init).is_file():
        recorded = llamagen.config_from_file(section.init)
    with torch.device("meta"):
        if recorded is not None:
            return LlamaGen(llamagen.LlamaGenConfig(**{**recorded.to_dict(), **section.arch}))
        return llamagen.build(section.name, grid=section.grid, **section.arch)


def _meta_var(section) -> VAR:
    """A ccalign VAR file's recorded config, else the registry's or the config's preset."""
    from ccalign import hub
    from ccalign.models import var

    recorded = None
    if section.init is not None and Path(section.init).is_file():
        recorded = var.config_from_file(section.init)
    release = hub.find(section.init) if section.init is not None else None
    name = release.preset if release is not None and release.preset else section.name
    with torch.device("meta"):
        if recorded is not None:
            return VAR(var.VARConfig(**{**recorded.to_dict(), **section.arch}))
        return var.build(name, **section.arch)


#: family -> the meta-device model of a config's model section
META_MODELS = {"llamagen": _meta_llamagen, "var": _meta_var}


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
    """Every tensor Python can reach (looking at each object's type only, quietly)."""
    with warnings.catch_warnings():  # deprecated torch attributes warn when inspected
        warnings.simplefilter("ignore", FutureWarning)
        return [o for o in gc.get_objects() if isinstance(o, Tensor)]


def _storage_key(t: Tensor) -> int:
    return t.untyped_storage().data_ptr()


# ---- VAR ----
def var_activations(model: VAR, rows: int, dtypes: Dtypes, checkpointing: bool) -> Activations:
    """Saved tensors of one teacher-forced VAR forward of ``rows`` sequences, and the workspace.

    VAR runs its blocks in the compute dtype (c bytes: 2 under autocast or with bf16 weights,
    else 4), residual stream included. Per token and block (D dim, H heads): 23 D-wide tensors
    (LayerNorm inputs and outputs, AdaLN-modulated inputs, qkv, the unit q and k and the scaled
    q, attention output and its reshaped copy, the gated branches, the 4D GELU input and
    output), two float32 LayerNorm statistics pairs c-sized, and per head the float32
    log-sum-exp and four c-sized norms of q and k; per row and block the AdaLN projection (6D),
    its SiLU input and the two (1 + scale) tensors (9D), and a c-sized stochastic-depth mask per
    branch when the block's drop-path rate is > 0. Outside the blocks: the head's float32
    hidden states (input, normalised, modulated: 12 bytes x D per token, + float32 statistics
    and the int64 token), the teacher-forcing input (vae_dim wide, weight dtype), the class
    embedding and its copies, the block-causal mask (L x L, c bytes, shared by all rows) and the
    levels, and the generator state of each checkpointed logit chunk. With checkpointing a block
    keeps its input (c) and a generator state. Fitted exactly (to the byte) against
    ``saved_activation_bytes`` on small models, see tests/test_var_train.py.
    """
    cfg = model.config
    dim, heads, seq, depth = cfg.dim, cfg.n_head, cfg.seq_len, cfg.depth
    r = _BYTES[dtypes.weights]
    c = 2 if dtypes.autocast or r == 2 else 4
    tokens = rows * seq
    dropping = sum(1 for block in model.blocks if block.drop_path.p > 0) if model.training else 0
    block = tokens * (23 * c * dim + (4 + 4 * c) * heads + 4 * c) + 9 * c * rows * dim + c * heads
    blocks = (tokens * c * dim + RNG_STATE) * depth if checkpointing else block * depth
    blocks += 0 if checkpointing else 2 * c * rows * dropping
    chunk = min(LOGIT_CHUNK, tokens)
    cond = r + (c if c != r else 0) + 2 * c  # class embedding, its compute-dtype copy, the head's
    outside = (
        tokens * (12 * dim + 16)
        + rows * (cond * dim + 8)
        + rows * (seq - cfg.first_len) * cfg.vae_dim * r
        + c * seq * seq
        + 8 * seq
        + RNG_STATE * -(-tokens // chunk)
    )
    ffn = cfg.ffn_hidden
    logits = chunk * cfg.vocab_size * (2 * c + 12)  # recomputed chunk: products, fp32, grads
    block_transient = tokens * c * (3 * ffn + 3 * dim)  # gradients of a block's intermediates
    recompute = block if checkpointing else 0
    reference = tokens * c * (4 * ffn + 3 * dim)  # the reference's forward, one block at a time
    return Activations(blocks + outside, max(logits, block_transient + recompute, reference))


register(VAR, var_activations)
