"""Sampling from AR image models of any family: ``generate`` and ``sampler_for`` hand a model to
its family's sampler, ``sample_grid`` returns decoded images as one picture, ``run_sampling``
drives sharded, resumable runs (the ``ccalign sample`` command).

The samplers themselves belong to the families (``ccalign.models.next_token`` for next-token
models such as LlamaGen, ``ccalign.models.var.sampler`` for VAR); guidance and filtering are
``ccalign.models.guidance`` and ``ccalign.models.filtering``.
"""

from ccalign.models.filtering import (
    filter_logits,
    sample_categorical,
    top_k_filter,
    top_p_filter,
)
from ccalign.models.guidance import GuidanceScale, guidance_scales, linear_ramp, mix_guidance
from ccalign.models.next_token import Sampler
from ccalign.sample.generic import generate, sampler_for
from ccalign.sample.images import decode_tokens, image_grid, sample_grid
from ccalign.sample.runner import RunConfig, plan_labels, run_sampling

__all__ = [
    "Sampler",
    "generate",
    "sampler_for",
    "filter_logits",
    "sample_categorical",
    "top_k_filter",
    "top_p_filter",
    "GuidanceScale",
    "guidance_scales",
    "linear_ramp",
    "mix_guidance",
    "decode_tokens",
    "image_grid",
    "sample_grid",
    "RunConfig",
    "plan_labels",
    "run_sampling",
]
