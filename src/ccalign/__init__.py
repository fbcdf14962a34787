"""ccalign: Condition Contrastive Alignment for class-conditional autoregressive image models."""

__version__ = "0.1.0"
