"""VAR (next-scale prediction, d16 .. d36): the network, its sampler, files and family object.

``model.py`` is the network, read top to bottom; ``sampler.py`` its scale-by-scale KV-cache
sampler (VAR's cfg ramp, top-k / top-p as VAR filters); ``family.py`` what the generic layers ask
of it (files with the derived official keys, specs with the VQVAE, memory estimate).
"""

from ccalign.models.var.family import (
    FAMILY,
    config_from_file,
    derived_official_state,
    load,
    official_state_dict,
    save,
)
from ccalign.models.var.model import PATCH_NUMS_256, PATCH_NUMS_512, PRESETS, VAR, VARConfig, build
from ccalign.models.var.sampler import VarSampler, generate

__all__ = [
    "FAMILY",
    "PATCH_NUMS_256",
    "PATCH_NUMS_512",
    "PRESETS",
    "VAR",
    "VARConfig",
    "VarSampler",
    "build",
    "config_from_file",
    "derived_official_state",
    "generate",
    "load",
    "official_state_dict",
    "save",
]
