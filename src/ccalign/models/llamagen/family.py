"""LlamaGen as a model family: its files, how a spec builds or loads it, its tokenizer, sampler,
memory estimate and sampling options. The network itself is ``model.py``."""

from __future__ import annotations

import argparse

from torch import nn

from ccalign import hub
from ccalign.io import PathLike, atomic_torch_save, read_tensor_file
from ccalign.models.family import (
    LOGIT_CHUNK,
    RNG_STATE,
    Activations,
    BaseFamily,
    Dtypes,
    ModelSpec,
    SamplingOption,
    keep_float64,
    local_file,
    official_keys,
    spec_release,
    unrecorded_architecture,
)
from ccalign.models.llamagen.model import PRESETS, LlamaGen, LlamaGenConfig, build
from ccalign.models.next_token import SAMPLING_OPTIONS, Sampler, sampler_options
from ccalign.settings import build_table, number
from ccalign.weights import extract_state_dict, load_weights

#: keys of the official files that the model does not hold (a precomputed rotary table)
IGNORED_KEYS = ("freqs_cis",)
#: keys every LlamaGen c2i file holds, whatever its container
MARKERS = ("cls_embedding.embedding_table.weight", "tok_embeddings.weight")
#: tokens per side when a spec gives none: 384 px with VQ-16, the released models' size
DEFAULT_GRID = 24


class LlamaGenFamily(BaseFamily):
    """LlamaGen's class-conditional GPTs (c2i B .. 3B), with GFT's optional beta embedding."""

    name = "llamagen"
    title = "LlamaGen"
    model_class = LlamaGen
    config_class = LlamaGenConfig
    presets = PRESETS
    default_preset = "GPT-L"  # of an official file given without --model
    official_suffix = ".pt"
    options = ("grid",)
    capabilities = frozenset({"beta_embedding"})
    lora_targets = ("wqkv", "wo", "w1", "w2", "w3")  # every attention and MLP linear
    lora_excluded = ("output",)  # the chunked log-likelihood applies its weight itself
    lacks = {
        "retokenize": "a LlamaGen reference's negatives are its own tokens (decoding and "
        "re-encoding them is NVlabs/DDO's VAR recipe)",
    }
    sampling_options = (
        SamplingOption(
            ("--grid",),
            dict(type=number(int, ge=1, le=1024),
                 help="tokens per side of an official checkpoint (24 at 384 px)"),
        ),
        SamplingOption(
            ("--gft-beta",),
            dict(type=number(float, gt=0, le=1),
                 help="GFT checkpoints only: the beta input, 1 / s for a CFG-like scale s (the "
                 "released GFT models: 0.66 for L, 0.7 for 3B), one pass per token; 1.0 = the "
                 "plain conditional"),
            "gft_beta",
        ),
        SamplingOption(
            ("--gft-numerics",),
            dict(choices=("training", "released"),
                 help="GFT checkpoints only: 'released' computes beta as GFT's released sampler "
                 "(beta and its sinusoid in the weights' bf16, the same beta on CFG's null rows); "
                 "default: as GFT trains (float32, null rows beta 1)"),
            "gft_numerics",
        ),
        *SAMPLING_OPTIONS,
    )

    # ---- files ----
    def recognizes(self, path: PathLike) -> bool:
        return self.config_from_file(path) is not None or all(
            key in official_keys(path) for key in MARKERS
        )

    def save_official(self, model: nn.Module, path: PathLike) -> None:
        """``{"model": state_dict}``, as LlamaGen's trainer writes (its samplers read it)."""
        atomic_torch_save({"model": {k: v.detach().cpu() for k, v in model.state_dict().items()}},
                          path)

    # ---- specs ----
    def config_for(self, spec: ModelSpec) -> LlamaGenConfig:
        """A ccalign file's recorded config, else the registry's or the spec's preset and grid;
        ``spec.arch`` overrides fields either way."""
        if "grid" in spec.arch:
            raise ValueError(
                "model.arch.grid: a LlamaGen grid is model.grid (--grid on the command line)"
            )
        path = local_file(spec.init)
        recorded = self.config_from_file(path) if path is not None else None
        if recorded is not None:
            return self.make_config({**recorded.to_dict(), **spec.arch})
        name, grid = self._preset_and_grid(spec)
        if grid is None:
            raise unrecorded_architecture(
                spec.init, "pass the preset name (e.g. 'GPT-L') and the grid (16 for 256 px, "
                "24 for 384 px)"
            )
        sizes = {**self.presets.get(name, {}), **_release_options(spec), **spec.arch}
        if name != "custom" and name not in self.presets:
            raise ValueError(
                f"unknown LlamaGen model {name!r}; choose one of {sorted(self.presets)} or "
                "'custom'"
            )
        missing = {"dim", "n_layer", "n_head"} - sizes.keys()
        if missing:
            raise ValueError(f"a custom LlamaGen model needs {sorted(missing)} in model.arch")
        return self.make_config({**sizes, "grid": grid})

    def load(self, spec: ModelSpec, *, codec=None) -> LlamaGen:
        """The model of ``spec.init``: a ccalign file carries its architecture, a registry name
        supplies it; other official files need the preset and the grid."""
        path = hub.resolve(spec.init, kind="model")
        if self.config_from_file(path) is not None:
            return load(path, **spec.arch)
        release = spec_release(spec)
        if release is not None:
            return load(path, release.preset, grid=release.grid,
                        **{**release.options, **spec.arch})
        name = None if spec.preset == "custom" else spec.preset
        return load(path, name, grid=spec.options.get("grid", DEFAULT_GRID), **spec.arch)

    def _preset_and_grid(self, spec: ModelSpec) -> tuple[str, int | None]:
        """The preset and grid: the registry's, else the spec's (a grid given as None on the
        command line stays None: an official file needs it said)."""
        release = spec_release(spec)
        if release is not None:
            return release.preset, release.grid
        return spec.preset or self.default_preset, spec.options.get("grid", DEFAULT_GRID)

    # ---- tokens and sampling ----
    def load_tokenizer(self, source: PathLike, config: LlamaGenConfig):
        """The tokenizer at ``source``, sized for ``config.grid`` (VQ-16 at grid 24: 384 px)."""
        from ccalign import tokenizers

        tokenizer = tokenizers.load(source)
        if tokenizer.grid != config.grid:  # convolutional VQs decode any grid
            downsample = tokenizer.image_size // tokenizer.grid
            tokenizer = tokenizers.load(source, image_size=config.grid * downsample)
        return tokenizer

    def token_grid(self, model: nn.Module) -> int:
        return model.config.grid

    def describe(self, model: nn.Module) -> str:
        return f"grid {model.config.grid}"

    def sampler(self, model: nn.Module, **options) -> Sampler:
        return Sampler(model, **options)

    def sampler_options(self, args: argparse.Namespace) -> dict:
        return sampler_options(args)

    def check_sampling(self, model: nn.Module | None, settings: dict) -> None:
        from ccalign.models.filtering import check_sampling_args
        from ccalign.models.next_token import check_gft_beta

        check_sampling_args(settings.get("temperature", 1.0), settings["top_k"], settings["top_p"])
        check_gft_beta(settings.get("gft_beta"), model)
        if "gft_numerics" in settings and settings.get("gft_beta") is None:
            raise ValueError("--gft-numerics: sets how GFT's beta is computed; give --gft-beta too")

    # ---- memory ----
    def activations(
        self, model: nn.Module, rows: int, dtypes: Dtypes, checkpointing: bool
    ) -> Activations:
        """Saved tensors of one teacher-forced forward of ``rows`` sequences, and the workspace.

        Per token and block (D dim, F FFN width, H heads; r residual bytes = weight bytes, c
        compute bytes): each RMSNorm keeps its float32 input, the normalised value (r), its
        output as the next product's input (c) and a float32 rsqrt; attention keeps q, k (c
        each), the whole qkv output (3c: v is a view of it), its output (c) and a float32
        log-sum-exp per head; the FFN keeps w1 x, w3 x, silu(w1 x) and their product (4 x F x
        c) and, under autocast of float32 weights, a second bf16 cast of its input; dropout
        keeps a mask per dropped tensor. Outside the blocks: labels and tokens, the
        token-dropout mask, the final norm, and the generator state of each checkpointed call
        (the logit chunks). With checkpointing a block keeps only its input (r) and one block
        is recomputed at a time.
        """
        cfg = model.config
        dim, ffn, heads, seq = cfg.dim, cfg.ffn_hidden, cfg.n_head, model.positions
        r, c = dtypes.weight_bytes, dtypes.compute_bytes
        dropout = model.training
        resid_mask = dtypes.mask_bytes(c) if dropout and cfg.resid_dropout > 0 else 0
        ffn_mask = dtypes.mask_bytes(c) if dropout and cfg.ffn_dropout > 0 else 0
        token_mask = dtypes.mask_bytes(r) if dropout and cfg.token_dropout > 0 else 0
        norm = (4 + r + c) * dim + 4
        ffn_input_cast = c * dim if r != c else 0  # autocast casts the FFN input for w1 and w3
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
        reference = tokens * c * (4 * ffn + 3 * dim)  # the reference's forward, block by block
        return Activations(saved, max(logits, block_transient + recompute, reference))


FAMILY = LlamaGenFamily()


def config_from_file(path: PathLike) -> LlamaGenConfig | None:
    """The config a ccalign LlamaGen safetensors file carries, or None for other files."""
    return FAMILY.config_from_file(path)


def save(model: LlamaGen, path: PathLike, *, official: bool = False) -> None:
    """Write atomically: safetensors with the config as metadata, or ``{"model": sd}`` (.pt)."""
    FAMILY.save(model, path, official=official)


def load(path: PathLike, name: str | None = None, *, grid: int | None = None,
         **overrides) -> LlamaGen:
    """Build the model a checkpoint file describes and load it strictly.

    ccalign safetensors files carry their config. Official files (dict with "model"/"ema", raw
    state_dict, FSDP folder with consolidated.pth) need the preset ``name`` and the ``grid``
    (16 for 256 px, 24 for 384 px) that the file was trained with. The file is read first,
    weights-only: a damaged or unsafe one raises ValueError naming it before anything is built.
    A file with ``t_embedder`` keys (GFT) gets the beta embedding; ``beta_embedding=True`` on a
    file without them adds a fresh, zero-output one (to start GFT from a plain model). A file
    of float64 weights (an fp64 run's) loads as float64.
    """
    config = config_from_file(path)
    weights = extract_state_dict(read_tensor_file(path))
    in_file = any(key.startswith("t_embedder.") for key in weights)
    if config is not None:
        fields = {**config.to_dict(), **overrides}
        if grid is not None:
            fields["grid"] = grid
        model = LlamaGen(build_table("model.arch", fields, LlamaGenConfig))
    else:
        if name is None or grid is None:
            raise unrecorded_architecture(
                path, "pass the preset name (e.g. 'GPT-L') and the grid (16 for 256 px, 24 for "
                "384 px)"
            )
        model = build(name, grid=grid, **{"beta_embedding": in_file, **overrides})
    if overrides.get("beta_embedding") is True and not in_file:  # asked for on a plain model
        fresh = model.t_embedder.state_dict()
        weights.update({f"t_embedder.{key}": value for key, value in fresh.items()})
    return load_weights(keep_float64(model, weights), weights, ignore=IGNORED_KEYS)


def _release_options(spec: ModelSpec) -> dict:
    """Config fields the registry entry records (a GFT release: the beta embedding)."""
    release = spec_release(spec)
    return dict(release.options) if release is not None else {}
