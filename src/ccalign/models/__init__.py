"""Autoregressive image generators behind one small interface.

Every model exposes ``num_classes``, ``null_class``, ``vocab_size``, ``seq_len``,
``forward(labels, tokens) -> (B,)`` sequence log-likelihoods (what training differentiates) and
``logits(labels, tokens) -> (B, N, V)``; LlamaGen adds ``setup_kv_cache``/``prefill``/``decode``
for the sampler.
"""

from ccalign.models import llamagen
from ccalign.models.checkpoint import CheckpointMismatchError, load_weights
from ccalign.models.llamagen import LlamaGen, LlamaGenConfig

__all__ = ["llamagen", "LlamaGen", "LlamaGenConfig", "load_weights", "CheckpointMismatchError"]
