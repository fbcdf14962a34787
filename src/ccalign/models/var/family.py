"""VAR as a model family: its files (with the derived official keys), how a spec builds or loads
it together with its VQVAE, its sampler, memory estimate and sampling options. The network itself
is ``model.py``."""

from __future__ import annotations

import argparse

import torch
from torch import Tensor, nn

from ccalign import hub
from ccalign.io import PathLike, atomic_torch_save, read_tensor_file
from ccalign.models.family import (
    LOGIT_CHUNK,
    RNG_STATE,
    Activations,
    BaseFamily,
    Dtypes,
    ModelSpec,
    OwnGuidance,
    SamplingOption,
    keep_float64,
    local_file,
    official_keys,
    spec_release,
    unrecorded_architecture,
)
from ccalign.models.var.model import (
    PRESETS,
    VAR,
    VARConfig,
    block_causal_mask,
    build,
    is_official_key,
    quantizer_of,
    scale_levels,
)
from ccalign.models.var.sampler import VarSampler, check_filter_args
from ccalign.multiscale import MultiScaleQuantizer
from ccalign.settings import build_table, number
from ccalign.weights import CheckpointMismatchError, check_state_dict, extract_state_dict

#: a key every official VAR file holds and no LlamaGen file does
VAR_MARKER = "lvl_1L"
_NEEDS_VAE = (
    "the multi-scale VQVAE whose quantiser builds VAR's teacher-forcing input: give --tokenizer "
    "with its VQVAE (vae_ch160v4096z32.pth or the registry name var-vae; --vae for export, "
    "model.vae in a config)"
)


class VARFamily(BaseFamily):
    """VAR's next-scale transformers (d16 .. d36), each with a frozen copy of its VQVAE's
    quantiser."""

    name = "var"
    title = "VAR"
    model_class = VAR
    config_class = VARConfig
    presets = PRESETS
    official_suffix = ".pth"
    options = ("vae",)
    capabilities = frozenset({"retokenize"})
    # VAR applies mat_qkv and the head by weight (F.linear), which adapters cannot wrap
    lora_targets = ("proj", "fc1", "fc2", "ada_lin.1")
    lora_excluded = ("head", "mat_qkv")
    lacks = {"beta_embedding": "GFT needs a beta embedding, which ccalign's VAR does not have"}
    own_guidance = OwnGuidance("official_cfg", "VAR ramp cfg", "varcfg")
    sampling_options = (
        SamplingOption(
            ("--var-cfg",),
            dict(type=number(float, ge=0, le=1000),
                 help="VAR models: VAR's own cfg number c instead of --cfg-scale, a ramp over "
                 "the scales from 1 (guidance-free) to 1 + c, as VAR's sampler (the paper's VAR "
                 "setting: 1.5 with --top-k 900 --top-p 0.96); 0 = guidance-free"),
            "official_cfg",
        ),
    )

    # ---- files ----
    def recognizes(self, path: PathLike) -> bool:
        return self.config_from_file(path) is not None or VAR_MARKER in official_keys(path)

    def save_official(self, model: nn.Module, path: PathLike) -> None:
        """VAR's raw state_dict (no quantiser copy, with the derived keys), as released."""
        atomic_torch_save(official_state_dict(model), path)

    # ---- specs ----
    def config_for(self, spec: ModelSpec) -> VARConfig:
        """A ccalign file's recorded config, else the registry's or the spec's preset; ``arch``
        overrides fields either way."""
        path = local_file(spec.init)
        recorded = self.config_from_file(path) if path is not None else None
        if recorded is not None:
            return self.make_config({**recorded.to_dict(), **spec.arch})
        name = self._preset(spec)
        if name not in PRESETS and name != "custom":
            what = f"{spec.init} is an official VAR file" if spec.init else "a fresh VAR model"
            raise ValueError(
                f"{what}: set model.name to its preset (--model on the command line), one of "
                f"{sorted(PRESETS)} (var_d16.pth -> VAR-d16), or 'custom' with model.arch"
            )
        fields = {**PRESETS.get(name, {}), **spec.arch}
        missing = {"depth", "dim", "n_head"} - fields.keys()
        if missing:
            raise ValueError(f"a custom VAR model needs {sorted(missing)} in model.arch")
        return self.make_config(fields)

    def build(self, spec: ModelSpec, *, codec=None) -> VAR:
        """A fresh VAR whose quantiser is the VQVAE's (``codec``, or ``spec.options["vae"]``)."""
        vae = codec if codec is not None else self._vae(spec, self.config_for(spec))
        if vae is None:
            raise ValueError(f"a fresh {self._preset(spec)} needs {_NEEDS_VAE}")
        return build(self._preset(spec), vae=vae, **spec.arch)

    def load(self, spec: ModelSpec, *, codec=None) -> VAR:
        """The VAR of ``spec.init`` with its quantiser: a ccalign file carries both; an official
        file (or a registry name) needs its preset and the VQVAE (registry names default to
        theirs)."""
        path = hub.resolve(spec.init, kind="model")
        recorded = self.config_from_file(path)
        if recorded is not None:
            vae = codec if codec is not None else self._vae(spec, recorded)
            return load(path, vae=vae, **spec.arch)
        name = self._preset(spec)
        config = self.config_for(spec)  # refuses a missing preset
        vae = codec if codec is not None else self._vae(spec, config)
        if vae is None:
            raise ValueError(f"{spec.init} is an official VAR file: it needs {_NEEDS_VAE}")
        return load(path, name, vae=vae, **spec.arch)

    def _preset(self, spec: ModelSpec) -> str | None:
        release = spec_release(spec)
        return release.preset if release is not None else spec.preset

    def _vae(self, spec: ModelSpec, config: VARConfig):
        """The VQVAE ``spec.options["vae"]`` names (a registry VAR defaults to its own), loaded
        at the model's scales; None when neither says."""
        source = self.vae_source(spec)
        return None if source is None else self.load_tokenizer(source, config)

    def vae_source(self, spec: ModelSpec) -> str | None:
        """Where the VQVAE comes from: ``spec.options["vae"]``, else a registry VAR's own."""
        release = spec_release(spec)
        return spec.options.get("vae") or (release.tokenizer if release is not None else None)

    # ---- tokens and sampling ----
    def load_tokenizer(self, source: PathLike, config: VARConfig):
        """VAR's VQVAE at ``source`` (file, alias, registry name, hf://), read at the model's
        scales (official VQVAE files do not record them)."""
        from ccalign.tokenizers import var_vq
        from ccalign.tokenizers.files import resolve_file

        return var_vq.load(resolve_file(source), patch_nums=config.patch_nums)

    def load_with_tokenizer(self, spec: ModelSpec, tokenizer: PathLike | None) -> tuple:
        """The VQVAE first: an official file takes its quantiser from it."""
        codec = None if tokenizer is None else self.load_tokenizer(tokenizer, self.config_for(spec))
        return self.load(spec, codec=codec), codec

    def token_grid(self, model: nn.Module) -> int:
        return model.quantizer.side

    def sampler(self, model: nn.Module, **options) -> VarSampler:
        return VarSampler(model, **options)

    def sampler_options(self, args: argparse.Namespace) -> dict:
        """``ccalign sample`` autocasts the whole sampler, as the official VAR samplers do."""
        return {"autocast_scope": "all"}

    def check_sampling(self, model: nn.Module | None, settings: dict) -> None:
        temperature = settings.get("temperature", 1.0)
        if temperature != 1.0:
            raise ValueError(
                f"temperature = {temperature}: VAR's sampler has no temperature (top-k and top-p "
                "only): leave it at 1"
            )
        check_filter_args(settings["top_k"], settings["top_p"])

    def codec_for(self, spec: ModelSpec, purpose: str):
        """VAR's VQVAE (encoder and decoder), from ``model.vae`` or a registry VAR's own."""
        source = self.vae_source(spec)
        if source is None:
            raise ValueError(
                f"{purpose} needs the VQVAE (encoder and decoder) that decodes the samples and "
                "re-encodes them: set model.vae (vae_ch160v4096z32.pth or the registry name "
                "var-vae)"
            )
        return self.load_tokenizer(source, self.config_for(spec))

    # ---- memory ----
    def activations(
        self, model: nn.Module, rows: int, dtypes: Dtypes, checkpointing: bool
    ) -> Activations:
        """Saved tensors of one teacher-forced VAR forward of ``rows`` sequences, and the
        workspace.

        VAR runs its blocks in the compute dtype (c bytes: 2 under autocast or with bf16
        weights, else the weights'), residual stream included. Per token and block (D dim, H
        heads): 23 D-wide tensors (LayerNorm inputs and outputs, AdaLN-modulated inputs, qkv,
        the unit q and k and the scaled q, attention output and its reshaped copy, the gated
        branches, the 4D GELU input and output), two float32 LayerNorm statistics pairs
        c-sized, and per head the float32 log-sum-exp and four c-sized norms of q and k; per
        row and block the AdaLN projection (6D), its SiLU input and the two (1 + scale) tensors
        (9D), and a c-sized stochastic-depth mask per branch when the block's drop-path rate is
        > 0. Outside the blocks: the head's float32 hidden states (input, normalised,
        modulated: 12 bytes x D per token, + float32 statistics and the int64 token), the
        teacher-forcing input (vae_dim wide, weight dtype), the class embedding and its copies,
        the block-causal mask (L x L, c bytes, shared by all rows) and the levels, and the
        generator state of each checkpointed logit chunk. With checkpointing a block keeps its
        input (c) and a generator state. Fitted exactly (to the byte) against
        ``saved_activation_bytes`` on small models (tests/models/test_var_memory.py).
        """
        cfg = model.config
        dim, heads, seq, depth = cfg.dim, cfg.n_head, cfg.seq_len, cfg.depth
        r = dtypes.weight_bytes
        c = 2 if dtypes.autocast or r == 2 else r
        tokens = rows * seq
        dropping = sum(block.drop_path.p > 0 for block in model.blocks) if model.training else 0
        block = (
            tokens * (23 * c * dim + (4 + 4 * c) * heads + 4 * c) + 9 * c * rows * dim + c * heads
        )
        blocks = (tokens * c * dim + RNG_STATE) * depth if checkpointing else block * depth
        blocks += 0 if checkpointing else 2 * c * rows * dropping
        chunk = min(LOGIT_CHUNK, tokens)
        cond = r + (c if c != r else 0) + 2 * c  # class embedding, its compute copy, the head's
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
        reference = tokens * c * (4 * ffn + 3 * dim)  # the reference's forward, block by block
        return Activations(blocks + outside, max(logits, block_transient + recompute, reference))


FAMILY = VARFamily()


def derived_official_state(patch_nums: tuple[int, ...]) -> dict[str, Tensor]:
    """VAR's two official keys computed from the scales: lvl_1L and attn_bias_for_masking."""
    levels = scale_levels(patch_nums)
    return {"lvl_1L": levels, "attn_bias_for_masking": block_causal_mask(levels)}


def official_state_dict(model: VAR) -> dict[str, Tensor]:
    """The released raw state_dict layout (no quantiser copy, with the derived keys), CPU."""
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items() if is_official_key(k)}
    return {**sd, **derived_official_state(model.config.patch_nums)}


def config_from_file(path: PathLike) -> VARConfig | None:
    """The config a ccalign VAR safetensors file carries, or None for other files."""
    return FAMILY.config_from_file(path)


def save(model: VAR, path: PathLike, *, official: bool = False) -> None:
    """Write atomically: safetensors with the config as metadata (and the quantiser copy, so the
    file scores and samples on its own), or VAR's raw state_dict as released (``official``)."""
    FAMILY.save(model, path, official=official)


def load(path: PathLike, name: str | None = None, *, vae: nn.Module | None = None,
         **overrides) -> VAR:
    """Build the VAR a checkpoint file describes and load it strictly, with its quantiser.

    ccalign safetensors files carry their config and the quantiser copy (``vae``, if given, must
    hold the same quantiser). Official files (VAR's raw state_dict, e.g. var_d16.pth) need the
    preset ``name`` ("VAR-d16") and ``vae``: the VQVAE (a loaded ``VarVQ``, or its quantiser)
    whose quantiser builds the teacher-forcing input. Files are read weights-only; any key or
    shape mismatch is reported key by key. A file of float64 weights loads as float64.
    """
    config = config_from_file(path)
    sd = extract_state_dict(read_tensor_file(path))
    if config is not None:
        model = VAR(build_table("model.arch", {**config.to_dict(), **overrides}, VARConfig))
    else:
        if name is None or vae is None:
            raise unrecorded_architecture(
                path, "pass the preset name (e.g. 'VAR-d16' for var_d16.pth) and vae= the VQVAE "
                "it was trained with (vae_ch160v4096z32.pth)"
            )
        model = build(name, **overrides)
        quantizer = {f"quantizer.{k}": v for k, v in model.quantizer.state_dict().items()}
        sd = {**sd, **{k: v for k, v in quantizer.items() if k not in sd}}
    sd = _take_derived(sd, model.config, path, required=config is None)
    try:
        sd = check_state_dict(model, sd)
    except CheckpointMismatchError as exc:
        raise CheckpointMismatchError(
            f"{path}: {exc}\n  For VAR, build the depth the file was trained with "
            "(var_d16.pth -> 'VAR-d16', ...; VAR-d36 is the 512 px model)."
        ) from None
    keep_float64(model, sd).load_state_dict(sd, strict=True)
    if vae is not None:
        quantizer = quantizer_of(vae)
        if config is not None and not _same_quantizer(model.quantizer, quantizer):
            raise ValueError(
                f"{path} carries a different quantiser than the given vae: a fine-tuned VAR "
                "must be scored with the VQVAE it was trained with; drop vae= to use the file's"
            )
        model.set_quantizer(quantizer)
    return model


def _take_derived(sd: dict[str, Tensor], config: VARConfig, path, required: bool) -> dict:
    """``sd`` without VAR's derived keys, after checking them against the model's scales."""
    expected = derived_official_state(config.patch_nums)
    missing = [k for k in expected if k not in sd]
    if missing and required:
        raise CheckpointMismatchError(
            f"{path}: checkpoint does not fit VAR: missing key(s) {', '.join(missing)}, which "
            "every official VAR file holds; is this a VAR checkpoint?"
        )
    for key, value in expected.items():
        found = sd.get(key)
        if found is not None and not (
            found.shape == value.shape and torch.equal(found, value.to(found.dtype))
        ):
            raise CheckpointMismatchError(
                f"{path}: {key} (shape {tuple(sd[key].shape)}) is not VAR's for scales "
                f"{config.patch_nums} (shape {tuple(value.shape)}); build the model the file was "
                "trained with (VAR-d36 is the 512 px model)"
            )
    return {k: v for k, v in sd.items() if k not in expected}


def _same_quantizer(a: MultiScaleQuantizer, b: MultiScaleQuantizer) -> bool:
    sb = b.state_dict()
    return all(k in sb and torch.equal(v.cpu(), sb[k].cpu().to(v.dtype)) for k, v in
               a.state_dict().items())
