"""The VQ inside a Janus checkpoint as an image tokenizer: 24 x 24 codes <-> 384 px for
Janus-Pro.

Decoding is transformers' ``JanusVQVAE.decode`` (codebook rows L2-normalised). Encoding takes
the cosine-nearest code, as the original Janus quantiser does (``codebook_l2_norm``), and not
transformers' ``encode``, which takes the Euclidean-nearest of the unnormalised vectors and can
give other codes than those the models were trained on.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ccalign.errors import UserError
from ccalign.io import open_safetensors

#: where a transformers Janus checkpoint keeps its VQ's tensors
VQ_PREFIX = "model.vqmodel."


class JanusCodec(nn.Module):
    """Images (B, 3, S, S) in [-1, 1] <-> codes (B, grid * grid) of a Janus model's VQ
    (transformers' ``JanusVQVAE``), for ``image_tokens`` codes per image."""

    channels = 3

    def __init__(self, vq: nn.Module, image_tokens: int):
        super().__init__()
        self.vq = vq
        self.vocab_size = vq.config.num_embeddings
        self.grid = math.isqrt(image_tokens)
        upsampling = 2 ** (len(self.vq.config.channel_multiplier) - 1)
        self.image_size = self.grid * upsampling

    @classmethod
    def of_model(cls, model: nn.Module) -> JanusCodec:
        """The VQ of a loaded ``JanusImageModel``."""
        return cls(model.hf.vqmodel, model.seq_len)

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


def load_vq(source: str) -> JanusCodec | None:
    """The VQ of a transformers Janus checkpoint (folder or Hub name) alone: its config and the
    ``model.vqmodel.*`` tensors, read from the safetensors shards that hold them, so encoding
    images does not load the language model (Janus-Pro-7B: ~14 GB in bf16). The tensors keep
    their stored dtype. None when the checkpoint has no safetensors file or lacks some of the
    VQ's tensors under that name (then load the whole model)."""
    try:
        from transformers import JanusConfig
        from transformers.models.janus.modeling_janus import JanusVQVAE
    except ImportError:
        raise UserError("Janus models need transformers: pip install 'ccalign[text]'") from None
    config = JanusConfig.from_pretrained(source)
    state = _prefixed_tensors(source, VQ_PREFIX)
    with torch.device("meta"):
        vq = JanusVQVAE(config.vq_config)
    if not state or set(vq.state_dict()) - set(state):
        return None
    vq.load_state_dict(state, strict=False, assign=True)  # extra entries ignored, as transformers
    return JanusCodec(vq.eval().requires_grad_(False), config.vision_config.num_image_tokens)


def _prefixed_tensors(source: str, prefix: str) -> dict[str, Tensor]:
    """The tensors whose names start with ``prefix`` (the prefix dropped), from the checkpoint's
    safetensors files that hold any (its index says which, when it is sharded); none without a
    safetensors file."""
    from transformers.utils import cached_file

    def find(name: str) -> str | None:
        return cached_file(source, name, _raise_exceptions_for_missing_entries=False)

    index = find("model.safetensors.index.json")
    if index is not None:
        weight_map = json.loads(Path(index).read_text())["weight_map"]
        files = sorted({file for key, file in weight_map.items() if key.startswith(prefix)})
    else:
        files = ["model.safetensors"] if find("model.safetensors") is not None else []
    state = {}
    for file in files:
        with open_safetensors(cached_file(source, file)) as tensors:
            for key in tensors.keys():
                if key.startswith(prefix):
                    state[key[len(prefix):]] = tensors.get_tensor(key)
    return state
