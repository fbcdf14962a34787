"""From a config's [model] and [data] sections to the model and its training data, checked.

The model family comes from ``ccalign.models.families.identify`` (the registry entry, the
file, the preset or ``model.family``); the family reads the section's words in its own way
(LlamaGen's grid, VAR's VQVAE), and the method adds what it needs (GFT's beta embedding) after
checking that the family has it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

from ccalign.data.codes import CodeDataset, open_codes, validate_codes
from ccalign.models import families
from ccalign.models.family import ModelSpec

if TYPE_CHECKING:
    from ccalign.train.config import ModelSection, TrainConfig
    from ccalign.train.methods import Method


def spec_from_section(section: ModelSection, method: Method | None = None) -> ModelSpec:
    """The family-neutral spec of a [model] section, with the method's model options."""
    arch = dict(section.arch) if method is None else {**method.model_options, **section.arch}
    return ModelSpec(
        init=section.init,
        preset=section.name,
        arch=arch,
        options=section.family_options(),
        family=section.family,
    )


def model_from_config(section: ModelSection, method: Method | None = None) -> nn.Module:
    """Load ``section.init`` (ccalign safetensors, any official layout, a registry name or an
    hf:// URI) or build a fresh model; ``arch`` overrides config fields either way.

    With ``method`` the family must have what the method requires (GFT: a beta embedding).
    """
    spec = spec_from_section(section, method)
    family = families.identify(spec)
    if method is not None:
        refusal = method.refusal(family)
        if refusal is not None:
            raise ValueError(refusal)
    return families.create(spec)


def with_captions(dataset: CodeDataset, data, model: nn.Module):
    """The data set with its captions for a caption-conditioned model (data.captions, and
    data.short_captions); the plain codes otherwise. A mismatch between the model's condition
    and the data is refused."""
    from ccalign.conditions import Captions
    from ccalign.data.captions import CaptionedCodes, CaptionFile, CaptionFolder

    kind = families.of(model).condition(model)
    if not isinstance(kind, Captions):
        for key in ("captions", "short_captions"):
            if getattr(data, key) is not None:
                raise ValueError(f"data.{key}: the model is class-conditional; remove it (the "
                                 "codes' labels are its conditions)")
        return dataset
    if data.captions is None:
        raise ValueError("a text-to-image model trains on captions: set data.captions to the "
                         "caption features of the images (ccalign encode-captions writes them)")

    def source(path: str, key: str):
        if not Path(path).is_dir():
            return CaptionFile(path, kind.length, kind.dim)
        entries = getattr(getattr(dataset, "source", None), "entries", None)
        if entries is None:  # LlamaGen's <list>/<line>.npy, for the images of its lists
            raise ValueError(
                f"{key} {path} is a folder of LlamaGen's .npy features: it pairs with "
                "LlamaGen's .jsonl lists as data.path (images encoded by data.tokenizer); for a "
                "code file give a caption file (ccalign encode-captions)"
            )
        return CaptionFolder(path, entries, kind.length, kind.dim)

    short = None if data.short_captions is None else source(data.short_captions,
                                                             "data.short_captions")
    return CaptionedCodes(dataset, source(data.captions, "data.captions"), short,
                          data.short_share, data.seed)


def open_training_data(config: TrainConfig, model: nn.Module) -> CodeDataset:
    """The code data set (or images encoded by ``data.tokenizer``), checked against the model.

    The check is skipped when ``data.validate`` is off.
    """
    data = config.data
    if data.path is None:
        what = "an image folder or fashion-mnist:train" if data.tokenizer else "codes"
        raise ValueError(f"no training data: set data.path in the config or pass --data ({what})")
    if data.tokenizer is not None:
        from ccalign.data.encoded import EncodedImages

        dataset = EncodedImages(
            data.path,
            data.tokenizer,
            views=data.views,
            seed=data.seed,
            image_size=data.image_size,
        )
        dataset.require_seq_len(model.seq_len)
    else:
        dataset = open_codes(data.path, seed=data.seed)
    dataset = with_captions(dataset, data, model)
    if data.validate:
        validate_codes(
            dataset,
            num_classes=model.num_classes,
            vocab_size=model.vocab_size,
            seq_len=model.seq_len,
        )
    return dataset
