"""LlamaGen's class-conditional GPT (c2i B .. 3B): the network, its files and its family object.

``model.py`` is the network, read top to bottom; ``family.py`` what the generic layers ask of it
(files, specs, tokenizer, sampler, memory estimate). Sampling runs the shared next-token engine
(``ccalign.models.next_token``).
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

__all__ = [
    "FAMILY",
    "PRESETS",
    "LlamaGen",
    "LlamaGenConfig",
    "apply_rope",
    "build",
    "config_from_file",
    "load",
    "rope_2d_table",
    "save",
    "sinusoidal_features",
]
