"""CCA, its baselines and DDO as pure functions of per-sample sequence log-probabilities; GFT's
mixed logits."""

from ccalign.align.gft import gft_logits, gft_token_logprobs
from ccalign.align.losses import (
    OBJECTIVES,
    AlignOutput,
    alignment_loss,
    cca_loss,
    ddo_loss,
    dpo_loss,
    unlearning_loss,
)
from ccalign.align.negatives import ContrastPairs, contrast_pairs, make_pairs, roll_labels

__all__ = [
    "OBJECTIVES",
    "AlignOutput",
    "ContrastPairs",
    "alignment_loss",
    "contrast_pairs",
    "cca_loss",
    "ddo_loss",
    "dpo_loss",
    "gft_logits",
    "gft_token_logprobs",
    "make_pairs",
    "roll_labels",
    "unlearning_loss",
]
