"""Janus(-Pro) image generation over transformers' JanusForConditionalGeneration."""

from ccalign.models.janus.family import FAMILY, JanusFamily
from ccalign.models.janus.model import JanusImageConfig, JanusImageModel, unconditional_ids

__all__ = ["FAMILY", "JanusFamily", "JanusImageConfig", "JanusImageModel", "unconditional_ids"]
