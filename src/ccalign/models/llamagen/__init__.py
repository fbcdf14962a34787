"""LlamaGen's GPTs: class-conditional (c2i B .. 3B) and text-to-image (T2I), the networks, their
files and their family objects.

``model.py`` and ``t2i.py`` are the networks, read top to bottom; ``family.py`` and
``t2i_family.py`` what the generic layers ask of them (files, specs, tokenizer, sampler, memory
estimate). Sampling runs the shared next-token engine (``ccalign.models.next_token``).
"""

from ccalign.models.llamagen.family import FAMILY, config_from_file, load, save
from ccalign.models.llamagen.model import (
    PRESETS,
    LlamaGen,
    LlamaGenConfig,
    apply_rope,
    build,
    rope_2d_table,
    sinusoidal_features,
)
from ccalign.models.llamagen.t2i import LlamaGenT2I, LlamaGenT2IConfig
from ccalign.models.llamagen.t2i_family import FAMILY as T2I_FAMILY

__all__ = [
    "FAMILY",
    "PRESETS",
    "LlamaGen",
    "LlamaGenConfig",
    "LlamaGenT2I",
    "LlamaGenT2IConfig",
    "T2I_FAMILY",
    "apply_rope",
    "build",
    "config_from_file",
    "load",
    "rope_2d_table",
    "save",
    "sinusoidal_features",
]
