"""Released checkpoints by name, and one resolver from a name, an ``hf://`` URI or a path to a file.

A registry name (``llamagen-L-384``, ``cca-llamagen-L-384``, ``llamagen-vq16``, ...) or a URI
``hf://owner/repo[@revision]/path/in/repo`` is fetched through huggingface_hub, so its cache
(HF_HUB_CACHE / HF_HOME), HF_HUB_OFFLINE and revisions apply; a name takes ``@revision`` too
(``llamagen-L-384@<commit>``). Any other string is a local path and is returned unchanged (an
existing file wins over a registry name of the same spelling).

Repos and file names are those the projects publish in their READMEs (FoundationVision/LlamaGen,
its T2I models at peizesun/llamagen_t2i, thu-ml/CCA, FoundationVision/VAR, NVlabs/DDO,
thu-ml/GFT); none was read from the Hub itself.
Each release names its model family and kind; the family loads it (``ccalign.models.families``).
Each model release also carries the sampling protocol its published numbers were measured with
(``Release.protocols``), read from the official sampling scripts (docs/protocols.md cites every
fact by file and line).
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ccalign.errors import UserError

HF_SCHEME = "hf://"
_URI = re.compile(r"^hf://(?P<repo>[^/@]+/[^/@]+)(?:@(?P<rev>refs/pr/\d+|[^/]+))?/(?P<file>.+)$")


@dataclass(frozen=True)
class Release:
    """One public checkpoint: where it lives on the Hub and what it holds.

    ``family`` is the model family as ``ccalign.models.families`` names it ("llamagen", "var"),
    for its tokenizers too; ``options`` are config fields of the model beyond its preset (a GFT
    release is a LlamaGen model with ``beta_embedding``).
    """

    name: str
    family: str
    kind: str  # "model" or "tokenizer"
    title: str  # what it is, in messages ("LlamaGen GPT", "VAR multi-scale VQVAE")
    repo: str
    file: str
    preset: str | None = None  # GPT-L, VQ-16, VAR-d16, ...
    grid: int | None = None  # tokens per side (VAR: of the last scale); None for a tokenizer
    tokenizer: str | None = None  # registry name of the tokenizer its tokens belong to
    options: Mapping[str, Any] = field(default_factory=dict)
    #: protocol name ("paper", "released-sampler") -> how the published numbers were sampled
    protocols: Mapping[str, SamplingProtocol] = field(default_factory=dict)

    @property
    def uri(self) -> str:
        return f"{HF_SCHEME}{self.repo}/{self.file}"

    @property
    def protocol(self) -> SamplingProtocol | None:
        """The paper's protocol (None for tokenizers)."""
        return self.protocols.get(PAPER)

    def find_protocol(self, name: str) -> SamplingProtocol:
        """The protocol ``name`` of this release, or a one-line error listing those it has."""
        if name in self.protocols:
            return self.protocols[name]
        have = ", ".join(self.protocols) or "none (it is not a model)"
        raise UserError(f"{self.name} has no sampling protocol {name!r}; it has {have}")


PAPER = "paper"
#: the ``labels`` of a text-to-image protocol: the user's captions, not drawn classes
CAPTIONS = "captions"
RELEASED_SAMPLER = "released-sampler"
PROTOCOL_NAMES = (PAPER, RELEASED_SAMPLER)


@dataclass(frozen=True)
class SamplingProtocol:
    """How a release's published numbers were sampled and measured, as the official script does.

    Guidance is in ccalign's convention (``cfg_scale`` 1.0 = guidance-free); ``official_cfg`` is
    the official script's own number where its convention differs (VAR: cfg 0 is guidance-free,
    cfg c ramps ccalign's scale from 1 to 1 + c over the scales, and ``cfg_scale`` then holds
    the last scale's). ``settings`` are the family's own ``generate`` settings that the protocol
    fixes (VAR's ramp: ``official_cfg``; GFT: ``gft_beta``). ``uint8``: how the official script
    turns decoded images into 8 bits ("round": LlamaGen's 127.5 x + 128; "floor": VAR's 255 (x +
    1) / 2 truncated). ``published``: metric -> value, as ``published_in`` prints them.
    """

    # "random": uniform draws (LlamaGen's samplers); "balanced": 50 per class; "captions": the
    # user's captions (text-to-image: the protocol fixes how they are sampled, not which)
    labels: str
    num_samples: int
    cfg_scale: float
    source: str  # the official sampling script, with the lines each setting is read from
    published: Mapping[str, float]
    published_in: str
    official_cfg: float | None = None
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    temperature: float = 1.0
    weights_dtype: str = "bfloat16"
    autocast_dtype: str | None = None
    tf32: bool = True
    image_size: int = 256
    resize: int | None = None
    uint8: str = "round"
    settings: Mapping[str, Any] = field(default_factory=dict)
    note: str = ""

    @property
    def takes_captions(self) -> bool:
        """Whether its conditions are the user's captions (text-to-image): the protocol fixes
        how they are sampled, not which or how many."""
        return self.labels == CAPTIONS

    def to_dict(self) -> dict[str, Any]:
        """Every field, JSON-ready (``ccalign models --json``, run.json)."""
        return {
            **{key: getattr(self, key) for key in self.__dataclass_fields__},
            "published": dict(self.published),
            "settings": dict(self.settings),
        }

    def short(self) -> str:
        """A few words for the ``ccalign models`` table."""
        guidance = (f"cfg {self.cfg_scale:g}" if self.official_cfg is None
                    else f"cfg {self.cfg_scale:g} ({self.official_cfg:g} official)")
        filters = [f"top-k {self.top_k}"] * bool(self.top_k) + [f"top-p {self.top_p:g}"] * (
            self.top_p < 1)
        extra = [f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}"
                 for k, v in self.settings.items() if k != "official_cfg"]
        size = f"{self.image_size}->{self.resize}" if self.resize else str(self.image_size)
        fid = self.published.get("fid")
        count = f"{self.num_samples // 1000}k " if self.num_samples else ""
        return ", ".join([
            f"{count}{self.labels}", guidance, *filters, *extra, size,
            _dtypes_words(self.weights_dtype, self.autocast_dtype),
            *([f"FID {fid:g}"] if fid is not None else []),
        ])


def _dtypes_words(weights: str, autocast: str | None) -> str:
    short = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
    return short[weights] + (f"+{short[autocast]} autocast" if autocast else "")


_LLAMAGEN_SAMPLER = (
    "FoundationVision/LlamaGen@ce98ec41 autoregressive/sample/sample_c2i_ddp.py: labels randint "
    ":130, 50000 :182, bf16 weights :63-71,168, top-k 0 / top-p 1 / T 1 :184-186, TF32 :4-5, "
    "bicubic resize :141-142, uint8 :143; cfg per model GETTING_STARTED.md:45-53"
)
_LLAMAGEN_CFG = {"B": 2.0, "L": 2.0, "XL": 1.75, "XXL": 1.75, "3B": 1.65}
#: (size, px) -> (FID, README line)
_LLAMAGEN_FID = {("B", 256): (5.46, 55), ("B", 384): (6.09, 56), ("L", 256): (3.80, 57),
                 ("L", 384): (3.07, 58), ("XL", 384): (2.62, 59), ("XXL", 384): (2.34, 60),
                 ("3B", 384): (2.18, 61)}


def _llamagen_protocol(size: str, px: int) -> SamplingProtocol:
    """The base model's FID protocol: its README table, GETTING_STARTED's command of its size."""
    fid, line = _LLAMAGEN_FID[size, px]
    return SamplingProtocol(
        "random", 50_000, _LLAMAGEN_CFG[size], _LLAMAGEN_SAMPLER, {"fid": fid},
        f"FoundationVision/LlamaGen README.md:{line} (AR models, FID 256x256)", image_size=px,
        resize=256 if px != 256 else None,
        note="" if px == 384 else "the repo has no command for the 256-px checkpoints: the cfg "
        "of the 384-px command of the same size",
    )


_CCA_LLAMAGEN_FID = {"B": (7.04, 65), "L": (3.43, 66), "XL": (3.10, 67), "XXL": (3.12, 68),
                     "3B": (2.69, 69)}


def _cca_llamagen_protocol(size: str, px: int) -> SamplingProtocol:
    fid, line = _CCA_LLAMAGEN_FID[size]
    return SamplingProtocol(
        "random", 50_000, 1.0,
        "thu-ml/CCA@7d5a0730 LlamaGen_sample_ddp.py: labels randint :140, bf16 weights "
        ":68,76,178, top-k 0 / top-p 1 / T 1 :194-196, TF32 :9-10, 384 -> 256 bicubic :151-152; "
        "--cfg-scale=1.0 README.md:144",
        {"fid": fid}, f"thu-ml/CCA README.md:{line} (FID w/o CFG)", image_size=px, resize=256,
    )


_GFT = {"L": (0.66, 2.52, 12, "LlamaGen/README.md:23"), "3B": (0.7, 2.21, 13, "sample.sh:1-5")}


def _gft_protocols(size: str, px: int) -> dict[str, SamplingProtocol]:
    """The GFT sampler's settings; "released-sampler" also takes its beta numerics (beta and its
    sinusoid in the weights' bf16, the same beta on CFG's null rows), unlike its training's."""
    beta, fid, line, command = _GFT[size]
    paper = SamplingProtocol(
        "random", 50_000, 1.0,
        f"thu-ml/GFT@9bf5ee45 LlamaGen/LlamaGen_sample_ddp.py: labels randint :140, bf16 weights "
        f":68,76,178, top-k 0 / top-p 1 / T 1 :194-196, TF32 :10-11, 384 -> 256 bicubic "
        f":151-152; --cfg-scale=1.0 --beta={beta:g} {command}",
        {"fid": fid}, f"thu-ml/GFT LlamaGen/README.md:{line} (FID w/o CFG)", image_size=px,
        resize=256, settings={"gft_beta": beta},
    )
    released = dataclasses.replace(
        paper, settings={"gft_beta": beta, "gft_numerics": "released"},
        note="beta and its sinusoid computed in bf16, beta also on CFG's null rows "
        "(GFT LlamaGen/autoregressive/models/gpt.py:286-291,409-413)",
    )
    return {PAPER: paper, RELEASED_SAMPLER: released}


def _llamagen(
    prefix: str, repo: str, pattern: str, sizes: list[tuple[str, int]], protocols,
    title: str = "LlamaGen GPT", **options: Any,
) -> list[Release]:
    """Releases of LlamaGen GPTs: one per (size letter, image size), file from ``pattern``;
    ``protocols(size, px)`` gives their sampling protocols."""
    def named(found):
        return found if isinstance(found, dict) else {PAPER: found}

    return [
        Release(f"{prefix}-{size}-{px}", "llamagen", "model", title, repo,
                pattern.format(size=size, px=px), f"GPT-{size}", px // 16, "llamagen-vq16",
                options, named(protocols(size, px)))
        for size, px in sizes
    ]


_VAR_SAMPLING = dict(top_k=900, top_p=0.96, weights_dtype="float32", autocast_dtype="float16",
                     uint8="floor")
_VAR_FID = {16: (3.55, 91), 20: (2.95, 92), 24: (2.33, 93), 30: (1.97, 94), 36: (2.63, 96)}


def _var_protocol(depth: int) -> SamplingProtocol:
    """VAR's README FID protocol: cfg 1.5 (its ramp), top-k 900 / top-p 0.96, 50 per class."""
    fid, line = _VAR_FID[depth]
    px = 512 if depth == 36 else 256
    return SamplingProtocol(
        "balanced", 50_000, 2.5,
        "FoundationVision/VAR@78b95394 README.md:155-156 (cfg=1.5, top_p=0.96, top_k=900, 50 "
        "per class), models/var.py:161,172-173 (the ramp); fp32 weights + fp16 autocast, TF32 "
        "as demo_sample.ipynb:42,84,93; uint8 as thu-ml/CCA VAR_sample.py:93-94",
        {"fid": fid}, f"FoundationVision/VAR README.md:{line} (VAR zoo, FID)", official_cfg=1.5,
        image_size=px, settings={"official_cfg": 1.5}, **_VAR_SAMPLING,
        note="no official FID script (README.md:159): the README's settings" + (
            "; cfg 1.5 is stated for d16-d30 only" if depth == 36 else ""),
    )


_CCA_VAR_FID = {16: (4.03, 53), 20: (3.02, 54), 24: (2.63, 55), 30: (2.54, 56)}


def _cca_var_protocol(depth: int) -> SamplingProtocol:
    fid, line = _CCA_VAR_FID[depth]
    return SamplingProtocol(
        "balanced", 50_000, 1.0,
        "thu-ml/CCA@7d5a0730 VAR_sample.py: 50 per class :83-86, permuted :109, top-k 900 / "
        "top-p 0.96 :59,92, fp32 weights + fp16 autocast :39-43,89-90, TF32 :69-72, uint8 "
        ":93-94; --cfg=0.0 README.md:140",
        {"fid": fid}, f"thu-ml/CCA README.md:{line} (FID w/o CFG)", official_cfg=0.0,
        **_VAR_SAMPLING,
    )


_DDO_FID = {16: (3.12, 60), 30: (1.79, 61)}


def _ddo_var_protocol(depth: int) -> SamplingProtocol:
    fid, line = _DDO_FID[depth]
    return SamplingProtocol(
        "balanced", 50_000, 1.0,
        "NVlabs/DDO@d7b366bd VAR_sample.py: 50 per class :100-107, permuted :138, no top-k / "
        "top-p without --trick :29,114-115, fp32 weights + fp16 autocast :51-61,108-109, TF32 "
        ":88-91, uint8 :119-120",
        {"fid": fid}, f"NVlabs/DDO README.md:{line} (FID w/o guidance)", official_cfg=1.0,
        **{**_VAR_SAMPLING, "top_k": 0, "top_p": 1.0},
        note="DDO's README calls its cfg 1.0 guidance-free (README.md:135-136), which VAR's "
        "formula makes a ramp to 2.0; its paper calls w = 0 guidance-free: sampled here "
        "guidance-free (check --var-cfg 1 too)",
    )


def _var(prefix: str, repo: str, pattern: str, depths: list[int], protocol) -> list[Release]:
    """Releases of 256-px VAR models (last scale 16x16), file from ``pattern``."""
    return [
        Release(f"{prefix}-d{depth}", "var", "model", "VAR", repo, pattern.format(depth=depth),
                f"VAR-d{depth}", 16, "var-vae", protocols={PAPER: protocol(depth)})
        for depth in depths
    ]


_LLAMAGEN_SIZES = [("B", 256), ("B", 384), ("L", 256), ("L", 384), ("XL", 384), ("XXL", 384),
                   ("3B", 384)]
_CCA_SIZES = [(size, 384) for size in ("B", "L", "XL", "XXL", "3B")]
_GFT_TITLE = "GFT LlamaGen GPT (beta embedding)"

_RELEASES: list[Release] = [
    # FoundationVision/LlamaGen README: c2i weights and the VQ tokenizers
    *_llamagen("llamagen", "FoundationVision/LlamaGen", "c2i_{size}_{px}.pt", _LLAMAGEN_SIZES,
               _llamagen_protocol),
    Release("llamagen-vq16", "llamagen", "tokenizer", "LlamaGen VQ tokenizer",
            "FoundationVision/LlamaGen", "vq_ds16_c2i.pt", "VQ-16"),
    Release("llamagen-vq8", "llamagen", "tokenizer", "LlamaGen VQ tokenizer",
            "FoundationVision/LlamaGen", "vq_ds8_c2i.pt", "VQ-8"),
    # thu-ml/CCA README: guidance-free CCA fine-tunes (5000 steps)
    *_llamagen("cca-llamagen", "ChenDRAG/CCA_LlamaGen",
               "CCA_LlamaGen_Guidance_Free/c2i_{size}_{px}_CCA_0005000.pt", _CCA_SIZES,
               _cca_llamagen_protocol),
    *_var("cca-var", "ChenDRAG/CCA_VAR", "CCA_VAR_Guidance_Free/VAR_d{depth}_CCA.pth",
          [16, 20, 24, 30], _cca_var_protocol),
    # FoundationVision/VAR README: the 256-px models, the 512-px d36 and the VQVAE (the README
    # trains d36 with shared AdaLN, "d36-s"; whether var_d36.pth is that model is unconfirmed)
    *_var("var", "FoundationVision/var", "var_d{depth}.pth", [16, 20, 24, 30], _var_protocol),
    Release("var-d36", "var", "model", "VAR", "FoundationVision/var", "var_d36.pth", "VAR-d36",
            32, "var-vae", protocols={PAPER: _var_protocol(36)}),
    Release("var-vae", "var", "tokenizer", "VAR multi-scale VQVAE", "FoundationVision/var",
            "vae_ch160v4096z32.pth"),
    # NVlabs/DDO README and VAR_sample.py: DDO fine-tunes of VAR
    *_var("ddo-var", "nvidia/DirectDiscriminativeOptimization", "var_d{depth}-ddo.pth",
          [16, 30], _ddo_var_protocol),
    # thu-ml/GFT LlamaGen/README: guidance-free training of LlamaGen (a beta embedding added)
    *_llamagen("gft-llamagen", "ChenDRAG/LLamaGen_GF", "LlamaGenL_GF_scratch.pt", [("L", 384)],
               _gft_protocols, _GFT_TITLE, beta_embedding=True),
    *_llamagen("gft-llamagen", "ChenDRAG/LLamaGen_GF", "LlamaGen3B_GF.pt", [("3B", 384)],
               _gft_protocols, _GFT_TITLE, beta_embedding=True),
]

def _t2i_protocol(px: int) -> SamplingProtocol:
    """LlamaGen's T2I sampler (sample_t2i.py): no published metric, its sampling settings."""
    return SamplingProtocol(
        CAPTIONS, 0, 7.5,
        "FoundationVision/LlamaGen@ce98ec41 autoregressive/sample/sample_t2i.py: cfg 7.5 :150, "
        "top-k 1000 / top-p 1 / T 1 :152-154, bf16 :141, left-padded FLAN-T5-XL captions of 120 "
        "tokens :133-136,89-101, TF32 :2-3; README.md:98-100",
        {}, "none: the LlamaGen README reports no metric for its T2I models", top_k=1000,
        image_size=px, note="captions come from the user (--prompts or "
        "--caption-features); the protocol fixes how they are sampled",
    )


_RELEASES += [
    # FoundationVision/LlamaGen README.md:85-91: the T2I models (GPT-XL) and their VQ
    Release("llamagen-t2i-XL-256", "llamagen-t2i", "model", "LlamaGen T2I GPT",
            "peizesun/llamagen_t2i", "t2i_XL_stage1_256.pt", "GPT-XL", 16, "llamagen-vq16-t2i",
            protocols={PAPER: _t2i_protocol(256)}),
    Release("llamagen-t2i-XL-512", "llamagen-t2i", "model", "LlamaGen T2I GPT",
            "peizesun/llamagen_t2i", "t2i_XL_stage2_512.pt", "GPT-XL", 32, "llamagen-vq16-t2i",
            protocols={PAPER: _t2i_protocol(512)}),
    Release("llamagen-vq16-t2i", "llamagen-t2i", "tokenizer", "LlamaGen VQ tokenizer (T2I)",
            "peizesun/llamagen_t2i", "vq_ds16_t2i.pt", "VQ-16"),
]

def _janus_protocol() -> SamplingProtocol:
    """Janus-Pro's own sampler (deepseek-ai/Janus generation_inference.py)."""
    return SamplingProtocol(
        CAPTIONS, 0, 5.0,
        "deepseek-ai/Janus@1daa72f generation_inference.py: cfg_weight 5 :61, temperature 1 and "
        "no top-k :59,88, bf16 :36, 384 px from 576 codes :62-64, uint8 of clip((x + 1) / 2 x "
        "255) truncated :101; the prompt is the SFT template plus <begin_of_image> :46-51",
        {}, "none: Janus-Pro reports GenEval and DPG-Bench, not FID", weights_dtype="bfloat16",
        tf32=False, image_size=384, uint8="floor",
        note="transformers' generate also guides at 5 by default, but samples with top-k 50 "
        "when do_sample is on (its global default); the original has no top-k",
    )


_RELEASES += [
    # Janus-Pro in transformers' format (JanusForConditionalGeneration), the weights of
    # deepseek-ai/Janus-Pro-1B / -7B converted by the Hugging Face community
    Release("janus-pro-1B", "janus", "model", "Janus-Pro", "deepseek-community/Janus-Pro-1B",
            "config.json", "Janus-Pro-1B", 24, protocols={PAPER: _janus_protocol()}),
    Release("janus-pro-7B", "janus", "model", "Janus-Pro", "deepseek-community/Janus-Pro-7B",
            "config.json", "Janus-Pro-7B", 24, protocols={PAPER: _janus_protocol()}),
]

#: Every public checkpoint by name.
REGISTRY: dict[str, Release] = {release.name: release for release in _RELEASES}


def find(name_or_path: str | os.PathLike) -> Release | None:
    """The registry entry a name (optionally ``name@revision``) stands for; None for anything else.

    An existing local path is never a name.
    """
    name, _ = _split_revision(str(name_or_path))
    if name not in REGISTRY or Path(name_or_path).exists():
        return None
    return REGISTRY[name]


def resolve(name_or_path: str | os.PathLike, *, kind: str | None = None) -> Path:
    """The local file for a path (returned unchanged), a registry name or an ``hf://`` URI.

    ``kind`` ("model" or "tokenizer") says what the caller will load: a registry name of the
    other kind is refused before any download.
    """
    text = str(name_or_path)
    if text.startswith(HF_SCHEME):
        repo, revision, file = parse_uri(text)
        return download(repo, file, revision)
    release = find(name_or_path)
    if release is None:
        _check_not_a_typo(text)
        return Path(name_or_path)
    if kind is not None:
        check_kind(release, kind)
    return download(release.repo, release.file, _split_revision(text)[1])


def _check_not_a_typo(text: str) -> None:
    """A missing file whose name is close to registry names is most likely a typo of one."""
    if os.sep in text or Path(text).exists():
        return
    close = difflib.get_close_matches(_split_revision(text)[0], list(REGISTRY), n=3, cutoff=0.75)
    if close:
        raise UserError(
            f"{text!r} is neither a file nor a registry name; did you mean "
            f"{' or '.join(close)}? (`ccalign models` lists them)"
        )


def parse_uri(uri: str) -> tuple[str, str | None, str]:
    """``hf://owner/repo[@revision]/path/in/repo`` -> (repo, revision or None, path in repo)."""
    match = _URI.match(uri)
    if match is None:
        raise ValueError(
            f"{uri!r} is not a Hub file URI; write hf://owner/repo/path/in/repo, with an optional "
            "@revision after the repo (hf://owner/repo@v1.0/file.pt)"
        )
    return match["repo"], match["rev"], match["file"]


def check_kind(release: Release, kind: str) -> None:
    """Refuse a release of the other kind ("model" / "tokenizer"), saying how to give it."""
    if release.kind != kind:
        option = "--tokenizer (data.tokenizer)" if release.kind == "tokenizer" else "the model"
        raise UserError(f"{release.name} is a {release.title}, not a {kind}; give it as {option}")


def download(repo: str, file: str, revision: str | None = None) -> Path:
    """``file`` of the Hub model repo ``repo`` from the cache, downloading it when allowed.

    Every failure becomes one line naming the file, the repo and how to get it.
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{file} of the Hub repo {repo}" + (f" at revision {revision}" if revision else "")
    try:
        with _quiet_retries():
            return Path(hf_hub_download(repo, file, revision=revision))
    except LocalEntryNotFoundError:
        raise UserError(_not_cached(repo, file, revision)) from None
    except GatedRepoError:
        raise UserError(
            f"{where}: the repo is gated; accept its terms on huggingface.co and log in "
            "(`hf auth login`)"
        ) from None
    except RepositoryNotFoundError:
        raise UserError(
            f"{where}: no such repo (or it is private: log in with `hf auth login`)"
        ) from None
    except RevisionNotFoundError:
        raise UserError(f"{where}: the repo has no revision {revision!r}") from None
    except EntryNotFoundError:
        raise UserError(f"{where}: the repo has no such file") from None
    except HFValidationError as exc:
        raise UserError(f"{where}: {_first_line(exc)}") from None
    except HfHubHTTPError as exc:
        raise UserError(f"{where} could not be downloaded: {_first_line(exc)}") from None


@contextmanager
def _quiet_retries() -> Iterator[None]:
    """Silence huggingface_hub's per-retry warnings: a failure ends in one line of our own."""
    logger = logging.getLogger("huggingface_hub")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _not_cached(repo: str, file: str, revision: str | None) -> str:
    """The one line for a file that is neither in the cache nor downloadable now."""
    from huggingface_hub import constants

    at = f" at revision {revision}" if revision else ""
    command = f"hf download {repo} {file}" + (f" --revision {revision}" if revision else "")
    if constants.HF_HUB_OFFLINE:
        why, retry = "HF_HUB_OFFLINE is set", "unset HF_HUB_OFFLINE where the Hub is reachable"
    else:
        why, retry = "the Hub cannot be reached", "check the network and rerun"
    return (
        f"{file} of the Hub repo {repo}{at} is not in the Hugging Face cache "
        f"{constants.HF_HUB_CACHE} and {why}: run `{command}` on a machine with network (into "
        f"this HF_HUB_CACHE), or {retry}, or give the downloaded file's path instead"
    )


def is_cached(release: Release) -> bool:
    """Whether the release's file is in the Hugging Face cache (at the revision ``main``)."""
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(release.repo, release.file), str)


def _split_revision(text: str) -> tuple[str, str | None]:
    name, at, revision = text.partition("@")
    return name, (revision or None) if at else None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
