"""Sampling from class-conditional AR image models: ``generate``/``Sampler`` return tokens,
``sample_grid`` returns decoded images as one picture, ``run_sampling`` drives sharded,
resumable runs (the ``ccalign sample`` command)."""

from ccalign.sample.engine import Sampler, generate
from ccalign.sample.filtering import filter_logits, sample_categorical, top_k_filter, top_p_filter
from ccalign.sample.guidance import GuidanceScale, guidance_scales, linear_ramp, mix_guidance
from ccalign.sample.images import decode_tokens, image_grid, sample_grid
from ccalign.sample.runner import RunConfig, plan_labels, run_sampling

__all__ = [
    "Sampler",
    "generate",
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
