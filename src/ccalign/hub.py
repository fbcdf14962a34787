"""Released checkpoints by name, and one resolver from a name, an ``hf://`` URI or a path to a file.

A registry name (``llamagen-L-384``, ``cca-llamagen-L-384``, ``llamagen-vq16``, ...) or a URI
``hf://owner/repo[@revision]/path/in/repo`` is fetched through huggingface_hub, so its cache
(HF_HUB_CACHE / HF_HOME), HF_HUB_OFFLINE and revisions apply; a name takes ``@revision`` too
(``llamagen-L-384@<commit>``). Any other string is a local path and is returned unchanged (an
existing file wins over a registry name of the same spelling).

Repos and file names are those the projects publish in their READMEs (FoundationVision/LlamaGen,
thu-ml/CCA, FoundationVision/VAR, NVlabs/DDO, thu-ml/GFT); none was read from the Hub itself.
Each release names its model family and kind; the family loads it (``ccalign.models.families``).
"""

from __future__ import annotations

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

    @property
    def uri(self) -> str:
        return f"{HF_SCHEME}{self.repo}/{self.file}"


def _llamagen(
    prefix: str, repo: str, pattern: str, sizes: list[tuple[str, int]], title: str = "LlamaGen GPT",
    **options: Any,
) -> list[Release]:
    """Releases of LlamaGen GPTs: one per (size letter, image size), file from ``pattern``."""
    return [
        Release(f"{prefix}-{size}-{px}", "llamagen", "model", title, repo,
                pattern.format(size=size, px=px), f"GPT-{size}", px // 16, "llamagen-vq16",
                options)
        for size, px in sizes
    ]


def _var(prefix: str, repo: str, pattern: str, depths: list[int]) -> list[Release]:
    """Releases of 256-px VAR models (last scale 16x16), file from ``pattern``."""
    return [
        Release(f"{prefix}-d{depth}", "var", "model", "VAR", repo, pattern.format(depth=depth),
                f"VAR-d{depth}", 16, "var-vae")
        for depth in depths
    ]


_LLAMAGEN_SIZES = [("B", 256), ("B", 384), ("L", 256), ("L", 384), ("XL", 384), ("XXL", 384),
                   ("3B", 384)]
_CCA_SIZES = [(size, 384) for size in ("B", "L", "XL", "XXL", "3B")]
_GFT = "GFT LlamaGen GPT (beta embedding)"

_RELEASES: list[Release] = [
    # FoundationVision/LlamaGen README: c2i weights and the VQ tokenizers
    *_llamagen("llamagen", "FoundationVision/LlamaGen", "c2i_{size}_{px}.pt", _LLAMAGEN_SIZES),
    Release("llamagen-vq16", "llamagen", "tokenizer", "LlamaGen VQ tokenizer",
            "FoundationVision/LlamaGen", "vq_ds16_c2i.pt", "VQ-16"),
    Release("llamagen-vq8", "llamagen", "tokenizer", "LlamaGen VQ tokenizer",
            "FoundationVision/LlamaGen", "vq_ds8_c2i.pt", "VQ-8"),
    # thu-ml/CCA README: guidance-free CCA fine-tunes (5000 steps)
    *_llamagen("cca-llamagen", "ChenDRAG/CCA_LlamaGen",
               "CCA_LlamaGen_Guidance_Free/c2i_{size}_{px}_CCA_0005000.pt", _CCA_SIZES),
    *_var("cca-var", "ChenDRAG/CCA_VAR", "CCA_VAR_Guidance_Free/VAR_d{depth}_CCA.pth",
          [16, 20, 24, 30]),
    # FoundationVision/VAR README: the 256-px models, the 512-px d36 and the VQVAE (the README
    # trains d36 with shared AdaLN, "d36-s"; whether var_d36.pth is that model is unconfirmed)
    *_var("var", "FoundationVision/var", "var_d{depth}.pth", [16, 20, 24, 30]),
    Release("var-d36", "var", "model", "VAR", "FoundationVision/var", "var_d36.pth", "VAR-d36",
            32, "var-vae"),
    Release("var-vae", "var", "tokenizer", "VAR multi-scale VQVAE", "FoundationVision/var",
            "vae_ch160v4096z32.pth"),
    # NVlabs/DDO README and VAR_sample.py: DDO fine-tunes of VAR
    *_var("ddo-var", "nvidia/DirectDiscriminativeOptimization", "var_d{depth}-ddo.pth",
          [16, 30]),
    # thu-ml/GFT LlamaGen/README: guidance-free training of LlamaGen (a beta embedding added)
    *_llamagen("gft-llamagen", "ChenDRAG/LLamaGen_GF", "LlamaGenL_GF_scratch.pt", [("L", 384)],
               _GFT, beta_embedding=True),
    *_llamagen("gft-llamagen", "ChenDRAG/LLamaGen_GF", "LlamaGen3B_GF.pt", [("3B", 384)], _GFT,
               beta_embedding=True),
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
