"""Sampling any next-token model with a static KV cache: prefill the condition, one token a step.

The model offers ``setup_kv_cache(batch, dtype, device)``, ``clear_kv_cache()``,
``prefill(conditions) -> logits`` (B, V) of the first token and ``decode(tokens, position) ->
logits`` of the next (LlamaGen does; so can a family of your own); optionally
``condition_kind`` (default: class labels) and ``prefix_len``, the positions the condition fills
(default 1: a class token; LlamaGen T2I: its 120 caption tokens). A model whose conditions vary
in length (Janus' prompts) also offers ``prefix_len_for(conditions)``, the slots a batch needs,
and takes ``setup_kv_cache(..., prefix_len=)``; its ``prefix_len`` is then the cache's room, the
same for every batch the cache holds, so the captured steps stay valid. On CPU the decode step runs
eagerly. On CUDA the weights are bf16 and each decode step (one per row count) is captured once
in a CUDA graph, optionally after ``torch.compile`` fuses it; the capture (and compile) time is
recorded in ``Sampler.setup_seconds``. Guidance-free sampling runs only the B conditional rows.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from ccalign.conditions import CaptionBatch, ClassLabels, ConditionKind
from ccalign.models.family import SamplingOption
from ccalign.models.filtering import check_sampling_args, filter_logits, sample_categorical
from ccalign.models.generation import (
    FiniteCheck,
    autocast_to,
    check_generator,
    eval_mode,
    resolve_device,
)
from ccalign.models.guidance import (
    GuidanceScale,
    guidance_scales,
    last_guided_token,
    mix_guidance,
)
from ccalign.settings import number

#: decode-step shapes (rows, cache size) that one process's compiled Samplers may meet: each is
#: a recompile of the one decode function, and past dynamo's default limit (8) the rest would
#: run eagerly, with one log warning
COMPILED_SHAPES = 64

#: ``ccalign sample`` flags of every family this sampler draws from
SAMPLING_OPTIONS = (
    SamplingOption(
        ("--temperature",), dict(type=number(float, ge=0, le=100), default=1.0, help="0 ~ greedy"),
        "temperature", True,
    ),
    SamplingOption(
        ("--cfg-interval",),
        dict(type=number(int, ge=-1, le=10**6), default=-1, help="guide tokens <= this + 1 only"),
        "cfg_interval", True,
    ),
    SamplingOption(("--compile",), dict(action="store_true",
                                        help="torch.compile the decode step")),
    SamplingOption(("--no-cuda-graph",), dict(action="store_true",
                                              help="run the decode step eagerly")),
)


def sampler_options(args) -> dict:
    """The Sampler's own options from SAMPLING_OPTIONS' flags."""
    return {"compile": args.compile, "cuda_graph": False if args.no_cuda_graph else None}


class _DecodeStep:
    """Feeds ``rows`` tokens at one position; eager, or replaying a captured CUDA graph.

    Inputs live in static tensors (``tokens``, ``position``) so the graph can read them.
    """

    def __init__(
        self,
        forward: Callable[[Tensor, Tensor], Tensor],
        rows: int,
        scratch_position: int,
        device: torch.device,
        use_graph: bool,
    ):
        self.tokens = torch.zeros(rows, dtype=torch.long, device=device)
        # the warm-up and capture write the cache at a position sampling never reads
        self.position = torch.full((1,), scratch_position, dtype=torch.long, device=device)
        self._forward = forward
        self._graph: torch.cuda.CUDAGraph | None = None
        self._logits: Tensor | None = None
        if use_graph:
            self._capture(device)

    def warm_up(self) -> None:
        """One call at the scratch position (triggers a pending torch.compile)."""
        self._forward(self.tokens, self.position)

    def _capture(self, device: torch.device) -> None:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(3):  # warm-up: compiles, picks kernels, allocates workspaces
                self.warm_up()
        torch.cuda.current_stream(device).wait_stream(side)
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph):
            self._logits = self._forward(self.tokens, self.position)

    def __call__(self, tokens: Tensor, position: int) -> Tensor:
        """Logits (rows, V) for the tokens after ``tokens``, which sit at ``position``.

        With a graph the result is a static buffer, overwritten by the next call.
        """
        batch = tokens.shape[0]
        self.tokens[:batch].copy_(tokens)
        if self.tokens.shape[0] > batch:  # the unconditional half sees the same tokens
            self.tokens[batch:].copy_(tokens)
        self.position.fill_(position)
        if self._graph is None:
            return self._forward(self.tokens, self.position)
        self._graph.replay()
        return self._logits


class Sampler:
    """Draws token sequences from a next-token model; reuse one Sampler for many batches.

    ``device`` defaults to the model's; ``dtype`` to bf16 on CUDA and the model's dtype elsewhere.
    When the model is not already on that device in that dtype, the Sampler keeps a converted
    copy (``inplace=True`` converts the model itself, saving the memory; floating buffers such
    as the rotary table stay float32). ``cuda_graph`` (default: on for CUDA) captures each
    decode step; ``compile`` runs it through ``torch.compile`` first (slower start, fused
    kernels); ``eager=True`` turns both off (one-off calls, batches of changing size).
    ``autocast`` (a dtype) runs the forward under autocast over the ``dtype`` weights.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        cuda_graph: bool | None = None,
        compile: bool = False,
        inplace: bool = False,
        eager: bool = False,
        autocast: torch.dtype | None = None,
    ):
        ref = next(model.parameters())
        self.device = resolve_device(device or ref.device)
        on_cuda = self.device.type == "cuda"
        self.dtype = dtype or (torch.bfloat16 if on_cuda else ref.dtype)
        if cuda_graph and not on_cuda:
            raise ValueError("cuda_graph=True needs a CUDA device; use cuda_graph=None on CPU")
        if eager and (cuda_graph or compile):
            raise ValueError("eager=True runs the decode step as it is: drop cuda_graph/compile")
        self.cuda_graph = (on_cuda and not eager) if cuda_graph is None else cuda_graph
        self.compile = compile
        if compile:
            _allow_recompiles(COMPILED_SHAPES)
        self.autocast = autocast
        self.model = _model_for_sampling(model, self.device, self.dtype, inplace)
        self.setup_seconds = 0.0
        self._cache_rows = self._cache_room = 0
        self._steps: dict[int, _DecodeStep] = {}
        self._token = object()  # marks the model's cache as this Sampler's

    @property
    def seq_len(self) -> int:
        return self.model.seq_len

    def generate(
        self,
        conditions: Tensor | Sequence[int] | CaptionBatch,
        *,
        cfg_scale: GuidanceScale = 1.0,
        cfg_interval: int = -1,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
        gft_beta: float | None = None,
        gft_numerics: str = "training",
    ) -> Tensor:
        """Sample one image's tokens per condition (class labels, or captions for a
        caption-conditioned model): (B, N) int64 on the sampler's device.

        Guidance mixes uncond + (cond - uncond) * scale on raw logits, then temperature, top-k,
        top-p and a categorical draw. ``cfg_scale`` (a number, one per token, or a function of
        the token index) must be finite and >= 0: 1.0 is guidance-free, > 1 guides, 0 samples the
        unconditional (null-class) model and (0, 1) interpolates between the two; unlike
        LlamaGen's sampler, which ignores every scale <= 1. Rows with the null class run only
        while a scale != 1.0 still lies ahead, so guidance-free sampling runs just the B
        conditional rows.

        ``gft_beta`` (models trained with GFT only): the beta input of the class token, 1 / s for
        a CFG-like scale s (the released GFT models: 0.66 for L, 0.7 for 3B), in one pass per
        token; 1.0 is the plain conditional model. Null-class rows get beta 1, as in training;
        ``gft_numerics="released"`` computes beta as GFT's released sampler does instead.
        """
        check_sampling_args(temperature, top_k, top_p)
        check_gft_beta(gft_beta, self.model)
        conditions = self._check_conditions(conditions)
        check_generator(generator, self.device)
        scales = guidance_scales(cfg_scale, self.seq_len, cfg_interval)
        # the leanest per-op path; no cast cache: a captured graph may outlive it
        with torch.inference_mode(), autocast_to(self.device.type, self.autocast,
                                                 cache_enabled=False):
            tokens = self._sample(conditions, scales, temperature, top_k, top_p, generator,
                                  (gft_beta, gft_numerics))
        return tokens.clone()  # a normal tensor: usable later in autograd (e.g. scoring)

    def _sample(self, conditions, scales, temperature, top_k, top_p, generator, beta) -> Tensor:
        batch, n = self.kind.size(conditions), self.seq_len
        last_guided = last_guided_token(scales)
        self._ensure_cache(2 * batch if last_guided >= 0 else batch, conditions)
        out = torch.empty(batch, n, dtype=torch.long, device=self.device)
        finite = FiniteCheck(self.device)

        def pick(logits: Tensor, t: int) -> Tensor:
            cond = logits[:batch]
            if scales[t] != 1.0:
                cond = mix_guidance(cond, logits[batch : 2 * batch], scales[t])
            finite.add(cond)
            return sample_categorical(filter_logits(cond, temperature, top_k, top_p), generator)

        with eval_mode(self.model):
            rows = self._with_null_rows(conditions, last_guided >= 0)
            if beta[0] is None:  # models without GFT take the conditions alone
                logits = self.model.prefill(rows)
            else:
                logits = self.model.prefill(rows, *beta)
            prefix = self.prefix_len
            for t in range(n):
                out[:, t] = pick(logits, t)
                if t + 1 < n:
                    rows = 2 * batch if t + 1 <= last_guided else batch
                    logits = self._step(rows)(out[:, t], prefix + t)
        finite.check(f"largest scale {max(scales):g}")
        return out

    def release(self) -> None:
        """Free the KV cache and captured graphs (the next generate allocates them again)."""
        if getattr(self.model, "kv_cache_owner", None) is self._token:
            self.model.clear_kv_cache()
        self._steps.clear()
        self._cache_rows = self._cache_room = 0

    @property
    def kind(self) -> ConditionKind:
        """The model's condition kind (class labels unless the model says otherwise)."""
        return getattr(self.model, "condition_kind", None) or ClassLabels(self.model.num_classes)

    @property
    def prefix_len(self) -> int:
        """Positions before the first image token's input (1: the class token)."""
        return getattr(self.model, "prefix_len", 1)

    def _with_null_rows(self, conditions, guided: bool):
        """The conditions, followed for CFG by their unconditional rows."""
        if not guided:
            return conditions
        return self.kind.cat([conditions, self.kind.null_like(conditions)])

    def _check_conditions(self, conditions):
        """Class labels checked and as a tensor on the device; other kinds moved there."""
        if not isinstance(self.kind, ClassLabels):
            if self.kind.size(conditions) == 0:
                raise ValueError("no conditions given: pass at least one")
            return self.kind.to(conditions, self.device)
        labels = torch.as_tensor(conditions, dtype=torch.long).to(self.device).reshape(-1)
        if labels.numel() == 0:
            raise ValueError("no labels given: pass at least one class index")
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high > self.model.null_class:
            raise ValueError(
                f"class labels must lie in [0, {self.model.num_classes - 1}] (or "
                f"{self.model.null_class} for the null class); got values in [{low}, {high}]"
            )
        return labels

    def _ensure_cache(self, rows: int, conditions) -> None:
        """A cache for at least ``rows`` rows; for a model whose conditions vary in length
        (``prefix_len_for``: Janus' prompts), with room for these conditions too. A model holds
        one cache: if another Sampler over the same model set up its own since, this one sets
        up again rather than replaying steps over a cache of other sizes."""
        if getattr(self.model, "kv_cache_owner", None) is not self._token:
            self._steps.clear()
            self._cache_rows = self._cache_room = 0
        measure = getattr(self.model, "prefix_len_for", None)
        needed = 0 if measure is None else measure(conditions)
        if rows <= self._cache_rows and needed <= self._cache_room:
            return
        self._steps.clear()  # graphs captured over the old cache are stale; free both first
        self.model.clear_kv_cache()
        rows, room = max(rows, self._cache_rows), max(needed, self._cache_room)
        options = {} if measure is None else {"prefix_len": room}
        self.model.setup_kv_cache(rows, dtype=self.dtype, device=self.device, **options)
        self.model.kv_cache_owner = self._token
        self._cache_rows, self._cache_room = rows, room

    def _step(self, rows: int) -> _DecodeStep:
        step = self._steps.get(rows)
        if step is None:
            start = time.perf_counter()
            step = self._build_step(rows)
            self.setup_seconds += time.perf_counter() - start
            self._steps[rows] = step
        return step

    def _build_step(self, rows: int) -> _DecodeStep:
        forward = self.model.decode
        if self.compile:
            forward = torch.compile(forward, dynamic=False)
        with eval_mode(self.model):
            scratch = self.prefix_len + self.seq_len - 1  # a cache slot sampling never writes
            step = _DecodeStep(forward, rows, scratch, self.device, self.cuda_graph)
            if self.compile and not self.cuda_graph:
                step.warm_up()  # so the compile time is counted in setup_seconds
        if self.cuda_graph:
            torch.cuda.synchronize(self.device)
        return step


def _allow_recompiles(shapes: int) -> None:
    """Let dynamo compile the decode step for up to ``shapes`` shapes (a process-wide limit)."""
    config = torch._dynamo.config
    name = recompile_limit_name()
    setattr(config, name, max(getattr(config, name), shapes))


def recompile_limit_name() -> str:
    """dynamo's option for it: ``recompile_limit`` since torch 2.7, ``cache_size_limit`` before."""
    return "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else (
        "cache_size_limit")


def check_gft_beta(beta: float | None, model: nn.Module | None = None) -> None:
    """A GFT beta must lie in (0, 1] and needs a model that takes one (``accepts_beta``)."""
    if beta is None:
        return
    if not 0.0 < beta <= 1.0:
        raise ValueError(
            f"GFT beta {beta}: must lie in (0, 1]; it is 1 / s for a CFG-like scale s >= 1 "
            "(e.g. 0.66 for s = 1.5), and 1.0 samples the plain conditional model"
        )
    if model is not None and not getattr(model, "accepts_beta", False):
        raise ValueError(
            "a GFT beta was given but the model has no beta embedding (not trained with GFT): "
            "leave the beta out, or use a GFT checkpoint (one with t_embedder weights)"
        )


def _model_for_sampling(
    model: nn.Module, device: torch.device, dtype: torch.dtype, inplace: bool
) -> nn.Module:
    """The model itself when it already sits on ``device`` in ``dtype``, else a converted one
    whose floating buffers (the rotary table) stay float32."""
    params = list(model.parameters())
    if all(p.device == device and p.dtype == dtype for p in params):
        return model
    model.clear_kv_cache()
    kept = {
        name: buffer.to(device=device, dtype=torch.float32)
        for name, buffer in model.named_buffers()
        if buffer.is_floating_point()
    }
    converted = model if inplace else copy.deepcopy(model)
    converted.to(device=device, dtype=dtype)
    for name, buffer in kept.items():
        owner, _, attr = name.rpartition(".")
        setattr(converted.get_submodule(owner), attr, buffer)
    return converted.requires_grad_(False)
