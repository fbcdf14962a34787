"""Scale-by-scale sampling from a VAR model with a KV cache, guided or guidance-free.

Scale si's logits come from one forward of all its pn^2 positions; its codes are drawn at once,
added to f_hat through the quantiser, and f_hat area-downsampled to the next side is the next
scale's input. Guidance follows ccalign's convention (as for LlamaGen): a scale s mixes
uncond + s (cond - uncond), 1 is guidance-free, and the unconditional (null-class) rows run only
when some scale guides, so guidance-free sampling runs B rows where VAR's sampler runs 2B.

VAR's own ``cfg`` number c is a linear ramp over the scales: at scale si of S its sampler uses
(1 + t) cond - t uncond with t = c si / (S - 1), i.e. the ccalign scale 1 + c si / (S - 1), rising
from 1 (guidance-free) at the first scale to 1 + c at the last. Pass ``official_cfg=c`` to
sample exactly so (the paper's VAR settings: c = 1.5 with top_k 900, top_p 0.96);
``official_cfg=0`` is guidance-free. ``cfg_scale`` takes a ccalign scale per scale instead.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from contextlib import nullcontext

import torch
from torch import Tensor

from ccalign.models.generation import (
    FiniteCheck,
    autocast_to,
    check_generator,
    eval_mode,
    resolve_device,
)
from ccalign.models.guidance import GuidanceScale, check_scale, guidance_scales
from ccalign.models.var.model import VAR
from ccalign.multiscale import MultiScaleQuantizer
from ccalign.tokenizers.var_vq import VarVQ

#: the most bytes of a chunk's largest activation (the MLP's hidden layer) when the CPU runs
#: the rows through the blocks chunk by chunk (1024 positions at VAR-d16 in float32). Well under
#: glibc's largest mmap threshold (32 MiB), a chunk's temporaries reuse freed heap memory instead
#: of fresh pages that the kernel must fault in and zero, and they stay in the caches: VAR-d16
#: with CFG at batch 16 takes ~4.5x fewer page faults and runs ~10 % faster, giving the same
#: f_hat bit for bit as VAR's own sampler (BENCHMARKS.md).
CPU_CHUNK_BYTES = 16 * 2**20


def cpu_chunk_tokens(model: VAR) -> int:
    """Positions per chunk of rows on the CPU: the MLP's hidden layer in ``CPU_CHUNK_BYTES``."""
    itemsize = model.head.weight.element_size()
    return max(1, CPU_CHUNK_BYTES // (model.config.ffn_hidden * itemsize))


def official_cfg_scales(cfg: float, num_scales: int) -> list[float]:
    """ccalign's scale at each of ``num_scales`` scales for VAR's ``cfg``: 1 + cfg si / (S - 1)."""
    return [1.0 + t for t in _official_ramp(cfg, num_scales)]


def _official_ramp(cfg: float, num_scales: int) -> list[float]:
    """VAR's t of each scale, computed as its sampler does: cfg * (si / (S - 1))."""
    return [cfg * (si / (num_scales - 1)) for si in range(num_scales)]


def guidance_weights(
    cfg_scale: GuidanceScale, official_cfg: float | None, num_scales: int
) -> list[float]:
    """t of each scale (logits = (1 + t) cond - t uncond; t = 0 is guidance-free)."""
    if official_cfg is None:
        return [s - 1.0 for s in guidance_scales(cfg_scale, num_scales)]
    if not (isinstance(cfg_scale, int | float) and cfg_scale == 1.0):
        raise ValueError(
            "give either cfg_scale (ccalign's scale) or official_cfg (VAR's), not both"
        )
    ramp = _official_ramp(float(official_cfg), num_scales)
    for si, t in enumerate(ramp):
        check_scale(1.0 + t, f" at scale {si} (official_cfg {official_cfg} gives 1 + t)")
    return ramp


def check_filter_args(top_k: int, top_p: float) -> None:
    """Raise a ValueError naming a top-k / top-p setting outside its range."""
    if top_k < 0 or not 0 < top_p <= 1:
        raise ValueError(
            f"need top_k >= 0 (0 disables) and 0 < top_p <= 1 (1 disables); got {top_k}, {top_p}"
        )


def var_filter(logits: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """VAR's top-k then top-p on logits (..., V), out of place.

    Top-k keeps logits >= the k-th largest (ties kept). Top-p sorts ascending and drops every
    token whose cumulative mass is <= 1 - top_p, never the most likely one: the kept tokens
    carry the top mass. ``top_p`` 1 disables it (VAR writes 0 for off).
    """
    check_filter_args(top_k, top_p)
    out = logits.float()
    if top_k > 0:
        kth = out.topk(min(top_k, out.shape[-1]), dim=-1, sorted=False).values.amin(-1, True)
        out = out.masked_fill(out < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = out.sort(dim=-1, descending=False)
        drop = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
        drop[..., -1:] = False
        out = out.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return out


def _draw(logits: Tensor, generator: torch.Generator | None) -> Tensor:
    """One multinomial draw per position of logits (B, l, V) -> (B, l), as VAR draws."""
    b, n, v = logits.shape
    probs = logits.softmax(dim=-1).view(-1, v)
    return torch.multinomial(probs, 1, replacement=True, generator=generator).view(b, n)


def _draw_scale(
    logits: Tensor,
    quantizer: MultiScaleQuantizer,
    ratio: float,
    more_smooth: bool,
    generator: torch.Generator | None,
) -> tuple[Tensor, Tensor]:
    """A scale's codes (B, l) from filtered logits (B, l, V), and the code vectors (B, l, C)
    that enter f_hat: the drawn codes' own, or with ``more_smooth`` VAR's Gumbel-softmax mixture
    at temperature max(0.27 (1 - 0.95 ratio), 0.005) of logits x (1 + ratio), ratio = si/(S-1)."""
    idx = _draw(logits, generator)
    book = quantizer.embedding.weight.float()
    if not more_smooth:
        return idx, book[idx]
    tau = max(0.27 * (1 - ratio * 0.95), 0.005)
    return idx, _gumbel_softmax(logits * (1 + ratio), tau, generator) @ book


def _gumbel_softmax(logits: Tensor, tau: float, generator: torch.Generator | None) -> Tensor:
    """softmax((logits + Gumbel noise) / tau), the noise drawn from ``generator``."""
    noise = -torch.empty_like(logits).exponential_(generator=generator).log()
    return ((logits + noise) / tau).softmax(dim=-1)


@torch.no_grad()
def generate(
    model: VAR,
    labels: Tensor | Sequence[int],
    *,
    cfg_scale: GuidanceScale = 1.0,
    official_cfg: float | None = None,
    top_k: int = 0,
    top_p: float = 1.0,
    more_smooth: bool = False,
    generator: torch.Generator | None = None,
    double_batch: bool = False,
    return_fhat: bool = False,
    exact_inputs: bool = False,
    chunk_tokens: int | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Sample every scale's codes for each label: (B, L) int64 (and f_hat when asked).

    ``cfg_scale``: ccalign's scale (a number, one per scale, or a function of the scale index);
    ``official_cfg``: VAR's cfg number instead (see the module doc). ``more_smooth`` feeds
    f_hat with Gumbel-softmax mixtures of code vectors (VAR's visualisation option, not for
    FID): the returned codes are still the drawn ones, and images should then be decoded from
    the returned f_hat. ``double_batch`` runs the unconditional rows even without guidance, as
    VAR's sampler does (for speed comparisons only). Runs on the model's device and dtype; the
    quantiser steps run in float32. ``exact_inputs``: the class embedding, the draws and every
    scale's input (quantiser steps, word embedding) run outside any autocast, as the
    teacher-forced forward builds them, so only the blocks take an enclosing autocast.
    ``chunk_tokens``: positions per chunk of rows in the blocks (``VAR.forward_scale``); None:
    :func:`cpu_chunk_tokens` on the CPU, whole batches on other devices; 0: whole batches.
    """
    cfg = model.config
    labels = _check_labels(model, labels)
    check_generator(generator, labels.device)
    check_filter_args(top_k, top_p)
    weights = guidance_weights(cfg_scale, official_cfg, len(cfg.patch_nums))
    guided = double_batch or any(t != 0.0 for t in weights)
    batch = labels.shape[0]
    rows = torch.cat([labels, torch.full_like(labels, model.null_class)]) if guided else labels
    quantizer, last = model.quantizer, len(cfg.patch_nums) - 1
    model.setup_kv_cache(rows.shape[0], device=labels.device)
    device_type = labels.device.type
    if chunk_tokens is None:
        chunk_tokens = cpu_chunk_tokens(model) if device_type == "cpu" else 0

    def inputs():  # the steps the teacher-forced forward runs outside autocast
        return autocast_to(device_type, None) if exact_inputs else nullcontext()

    try:
        with eval_mode(model):
            with inputs():
                cond = model.class_emb(rows)
            mods = model.modulations(cond)
            with inputs():
                x = model.first_scale_input(cond)
            f_hat = torch.zeros(batch, cfg.vae_dim, quantizer.side, quantizer.side,
                                device=labels.device)
            codes, finite = [], FiniteCheck(labels.device)
            for si, pn in enumerate(cfg.patch_nums):
                logits = model.forward_scale(si, x, mods, chunk_tokens)
                if guided:
                    t = weights[si]
                    logits = (1 + t) * logits[:batch] - t * logits[batch:]
                finite.add(logits).check(f"t {weights[si]:g} at scale {si}")  # before the draw
                with inputs():
                    logits = var_filter(logits, top_k, top_p)
                    idx, vectors = _draw_scale(logits, quantizer, si / last, more_smooth,
                                               generator)
                    codes.append(idx)
                    h = vectors.transpose(1, 2).reshape(batch, cfg.vae_dim, pn, pn)
                    f_hat = f_hat + quantizer.upsampled(si, h)
                    if si < last:
                        x = model.scale_input(si + 1, quantizer.next_scale_input(si, f_hat))
                        x = x.repeat(2, 1, 1) if guided else x
    finally:
        model.clear_kv_cache()
    tokens = torch.cat(codes, dim=1)
    return (tokens, f_hat) if return_fhat else tokens


def _check_labels(model: VAR, labels: Tensor | Sequence[int]) -> Tensor:
    device = model.head.weight.device
    labels = torch.as_tensor(labels, dtype=torch.long).to(device).reshape(-1)
    if labels.numel() == 0:
        raise ValueError("no labels given: pass at least one class index")
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high > model.null_class:
        raise ValueError(
            f"class labels must lie in [0, {model.num_classes - 1}] (or {model.null_class} for "
            f"the null class); got values in [{low}, {high}]"
        )
    return labels


class VarSampler:
    """``generate(labels, generator=..., **settings)`` for sharded runs and DDO's negatives, as
    ``Sampler`` offers for next-token models: the model on ``device`` in ``dtype`` (default
    bf16 on CUDA), its quantiser kept in float32. ``inplace=True`` converts the model itself
    (saves memory). VAR's sampler is always eager (``eager`` is accepted for the common
    interface). With ``retokenize`` (a VQVAE), each sample is decoded to 8-bit pixels and
    re-encoded (:func:`retokenize`), as NVlabs/DDO's VAR code trains on images it saved.
    ``autocast`` (a dtype) runs the blocks under autocast; ``autocast_scope`` "blocks" (the
    default) keeps the scale inputs and the re-encoding in float32, as the teacher-forced
    forward that scores DDO's negatives does, "all" autocasts everything, as the official VAR
    samplers run theirs (float16 over float32 weights; ``ccalign sample``)."""

    def __init__(
        self,
        model: VAR,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        inplace: bool = False,
        eager: bool = False,
        retokenize: VarVQ | None = None,
        autocast: torch.dtype | None = None,
        autocast_scope: str = "blocks",
    ):
        ref = model.head.weight
        self.device = resolve_device(device or ref.device)
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else ref.dtype)
        if ref.device != self.device or ref.dtype != self.dtype:
            model = model if inplace else copy.deepcopy(model)
            quantizer = {k: v.float() for k, v in model.quantizer.state_dict().items()}
            model.to(device=self.device, dtype=self.dtype)
            model.quantizer.float().load_state_dict(quantizer)
            model.requires_grad_(False)  # its own copy (or converted on request): frozen
        self.model = model  # the caller's model as it is: generate runs without gradients
        self.vae = None if retokenize is None else retokenize.to(self.device, torch.float32)
        if autocast_scope not in ("blocks", "all"):
            raise ValueError(f"autocast_scope {autocast_scope!r}: 'blocks' or 'all'")
        self.autocast, self.autocast_scope = autocast, autocast_scope

    @property
    def seq_len(self) -> int:
        return self.model.seq_len

    def generate(
        self, labels: Tensor | Sequence[int], *, temperature: float = 1.0, **settings
    ) -> Tensor:
        """(B, L) codes; ``settings`` as :func:`generate` takes them (VAR has no temperature).

        Runs outside any autocast (a trainer's, for DDO's online negatives) but its own.
        """
        if temperature != 1.0:
            raise ValueError(
                f"temperature {temperature}: VAR's sampler has no temperature (top-k and top-p "
                "only): leave it at 1 (method.negatives_temperature for DDO's negatives)"
            )
        labels = torch.as_tensor(labels).to(self.device)
        exact = self.autocast_scope == "blocks"
        with autocast_to(self.device.type, self.autocast):
            if self.vae is None:
                return generate(self.model, labels, exact_inputs=exact, **settings)
            _, f_hat = generate(self.model, labels, return_fhat=True, exact_inputs=exact,
                                **settings)
            with autocast_to(self.device.type, None) if exact else nullcontext():
                return retokenize(self.vae, f_hat)

    def release(self) -> None:
        """Nothing to free: ``generate`` drops its KV cache after every batch."""


#: images decoded and re-encoded at once by :func:`retokenize` (a constant: part of the result)
RETOKENIZE_ROWS = 32


@torch.no_grad()
def retokenize(vae: VarVQ, f_hat: Tensor) -> Tensor:
    """Codes (B, L) of the 8-bit images that ``f_hat`` decodes to.

    As DDO's VAR_sample.py saves its samples: decode, (x + 1) / 2 * 255 cast to uint8 (which
    truncates, as numpy's astype does); read back as VAR's data pipeline reads images
    (2 p / 255 - 1, no resize: they already have the VQVAE's size); then encode. Runs in
    fixed chunks of ``RETOKENIZE_ROWS`` rows (256 px images at full batch would need tens of GiB).
    """
    codes = []
    for part in f_hat.split(RETOKENIZE_ROWS):
        images = vae.decode_fhat(part.to(vae.device, torch.float32))
        pixels = images.add(1).mul(0.5).mul(255).to(torch.uint8)
        codes.append(vae.encode(pixels.float().div(255).mul(2).sub(1)))
    return torch.cat(codes)
