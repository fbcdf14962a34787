"""Janus(-Pro) image generation over transformers' JanusForConditionalGeneration."""

from ccalign.models.janus.family import FAMILY, JanusFamily
from ccalign.models.janus.model import JanusImageConfig, JanusImageModel, unconditional_ids
from ccalign.models.janus.sampler import JanusSampler

__all__ = ["FAMILY", "JanusFamily", "JanusImageConfig", "JanusImageModel", "JanusSampler",
           "unconditional_ids"]
