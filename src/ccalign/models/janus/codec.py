"""The VQ inside a Janus checkpoint as an image tokenizer: 24 x 24 codes <-> 384 px for
Janus-Pro.

Decoding is transformers' ``JanusVQVAE.decode`` (codebook rows L2-normalised). Encoding takes
the cosine-nearest code, as the original Janus quantiser does (``codebook_l2_norm``), and not
transformers' ``encode``, which takes the Euclidean-nearest of the unnormalised vectors and can
give other codes than those the models were trained on.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class JanusCodec(nn.Module):
    """Images (B, 3, S, S) in [-1, 1] <-> codes (B, grid * grid) of a Janus model's VQ."""

    channels = 3

    def __init__(self, model: nn.Module):
        super().__init__()
        self.vq = model.hf.vqmodel
        self.vocab_size = model.vocab_size
        self.grid = math.isqrt(model.seq_len)
        upsampling = 2 ** (len(self.vq.config.channel_multiplier) - 1)
        self.image_size = self.grid * upsampling

    @property
    def device(self) -> torch.device:
        return self.vq.quant_conv.weight.device

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        z = self.vq.quant_conv(self.vq.encoder(images.to(self.vq.quant_conv.weight.dtype)))
        z = F.normalize(z.permute(0, 2, 3, 1).float(), dim=-1)
        codebook = F.normalize(self.vq.quantize.embedding.weight.float(), dim=-1)
        return (z @ codebook.T).argmax(-1).flatten(1)

    @torch.no_grad()
    def decode(self, codes: Tensor) -> Tensor:
        return self.vq.decode(codes).float()
