"""Janus(-Pro)'s image generation, over transformers' ``JanusForConditionalGeneration``.

The condition is a prompt as transformers' processor builds it for image generation: the chat
template's "<|User|>: {caption}\\n\\n<|Assistant|>:", BOS first and ``<begin_of_image>`` last,
left-padded within a batch. It is a :class:`~ccalign.conditions.CaptionBatch` of token ids
(B, L) with their mask; its null rows are transformers' unconditional prompt: every token but
BOS and BOI replaced by the pad token, the mask kept. Image token t is embedded by the
generation embedding and aligner, the language model runs over [prompt; image tokens], and the
generation head at the position before token t gives its logits (16,384 VQ codes for
Janus-Pro). Positions count every prompt slot, pads included, as ``generate()`` does.

Only the language model and the generation embedding, aligner and head take part; the SigLIP
encoder, its aligner and the VQ (used to decode) are frozen.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from ccalign.conditions import CaptionBatch, Captions
from ccalign.models.family import at_least_float32
from ccalign.models.janus.decoding import ROOM_STEP, JanusKVCache, room_for, run_layers

#: the parts of JanusForConditionalGeneration's ``model`` that image generation never trains
FROZEN = ("vision_model", "aligner", "vqmodel")


@dataclass(frozen=True)
class JanusImageConfig:
    """transformers' JanusConfig (as a dict) and the special ids image generation needs (from
    the checkpoint's generation config: BOS, ``<begin_of_image>``, pad)."""

    janus: dict
    bos_id: int
    boi_id: int
    pad_id: int

    def to_dict(self) -> dict:
        return asdict(self)

    def hf_config(self):
        from transformers import JanusConfig

        return JanusConfig(**self.janus)


def unconditional_ids(ids: Tensor, null: Tensor, config: JanusImageConfig) -> Tensor:
    """The prompt ids with null rows as transformers builds them: every token but BOS and BOI
    replaced by pad."""
    blank = null[:, None] & (ids != config.bos_id) & (ids != config.boi_id)
    return ids.masked_fill(blank, config.pad_id)


class JanusImageModel(nn.Module):
    """Prompt-conditional image tokens of a Janus model; ``forward`` returns sequence
    log-likelihoods log p(image tokens | prompt)."""

    num_classes = 0  # conditioned on prompts

    def __init__(self, config: JanusImageConfig, janus: nn.Module | None = None):
        super().__init__()
        from transformers import JanusForConditionalGeneration

        self.config = config
        self.janus = janus if janus is not None else JanusForConditionalGeneration(
            config.hf_config())
        for name in FROZEN:
            getattr(self.janus.model, name).requires_grad_(False)
        generation = self.janus.generation_config  # what transformers' generate reads
        generation.bos_token_id, generation.pad_token_id = config.bos_id, config.pad_id
        generation.generation_kwargs = {"boi_token_id": config.boi_id}
        self._cache: JanusKVCache | None = None

    # ---- sizes ----
    @property
    def hf(self) -> nn.Module:
        """transformers' JanusModel (language model, generation parts, VQ)."""
        return self.janus.model

    @property
    def layers(self) -> nn.ModuleList:
        return self.hf.language_model.layers

    @property
    def seq_len(self) -> int:
        return self.janus.config.vision_config.num_image_tokens

    @property
    def vocab_size(self) -> int:
        return self.janus.config.vq_config.num_embeddings

    @property
    def null_class(self) -> int:
        return 0

    @property
    def condition_kind(self) -> Captions:
        return Captions(0, 0, name="prompt")

    def num_parameters(self) -> int:
        """Parameters of the generation path: the language model and the generation parts."""
        frozen = {id(p) for name in FROZEN for p in getattr(self.hf, name).parameters()}
        return sum(p.numel() for p in self.parameters() if id(p) not in frozen)

    def train(self, mode: bool = True) -> JanusImageModel:
        super().train(mode)
        for name in FROZEN:  # the frozen parts stay in eval mode
            getattr(self.hf, name).eval()
        return self

    # ---- embeddings ----
    def prompt_embeddings(self, prompts: CaptionBatch) -> Tensor:
        """(B, L, H) text embeddings of the prompts, null rows as the unconditional prompt."""
        ids = unconditional_ids(prompts.features, prompts.null, self.config)
        return self.hf.language_model.embed_tokens(ids)

    def image_embeddings(self, tokens: Tensor) -> Tensor:
        """(B, T, H) inputs of image tokens (B, T): generation embedding, then aligner."""
        return self.hf.generation_aligner(self.hf.generation_embeddings(tokens))

    def image_logits(self, hidden: Tensor) -> Tensor:
        """Generation-head logits of hidden states, in at least float32."""
        logits = self.hf.generation_head(hidden)
        return logits.to(at_least_float32(logits.dtype))

    # ---- teacher-forced path ----
    def hidden_states(self, prompts: CaptionBatch, tokens: Tensor) -> Tensor:
        """Final hidden states (B, N, H) at the positions that predict each image token."""
        self._check_inputs(prompts, tokens)
        length = prompts.features.shape[1]
        embeds = torch.cat([self.prompt_embeddings(prompts),
                            self.image_embeddings(tokens[:, :-1])], dim=1)
        ones = prompts.mask.new_ones(tokens.shape[0], tokens.shape[1] - 1)
        mask = torch.cat([prompts.mask, ones], dim=1).long()
        out = self.hf.language_model(inputs_embeds=embeds, attention_mask=mask, use_cache=False)
        return out.last_hidden_state[:, length - 1 :]

    def token_logprobs(self, prompts: CaptionBatch, tokens: Tensor) -> Tensor:
        """Per-token log-probabilities (B, N) of the given image tokens."""
        logits = self.image_logits(self.hidden_states(prompts, tokens))
        return logits.log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)

    def forward(self, prompts: CaptionBatch, tokens: Tensor, *, hidden: bool = False) -> Tensor:
        """Sequence log-likelihood (B,); ``hidden=True`` returns the final hidden states."""
        if hidden:
            return self.hidden_states(prompts, tokens)
        return self.token_logprobs(prompts, tokens).sum(dim=1)

    # ---- cached decoding: the shared next-token sampler's interface ----
    def prefix_len_for(self, prompts: CaptionBatch) -> int:
        """Cache slots a batch of these prompts needs before its first image token."""
        return room_for(prompts.features.shape[1])

    @property
    def prefix_len(self) -> int:
        """Cache slots before the first image token's input: the cache's prompt room."""
        return self._require_cache().room

    def setup_kv_cache(self, batch: int, dtype: torch.dtype | None = None,
                       device: torch.device | None = None, *,
                       prefix_len: int = ROOM_STEP) -> None:
        """A static KV cache for ``batch`` rows, prompts of up to ``prefix_len`` tokens and
        the image tokens."""
        ref = next(self.parameters())
        self._cache = JanusKVCache(self.hf.language_model, batch, prefix_len, self.seq_len,
                                   dtype or ref.dtype, device or ref.device)

    def clear_kv_cache(self) -> None:
        self._cache = None

    def prefill(self, prompts: CaptionBatch) -> Tensor:
        """Feed the prompts (null rows as the unconditional prompt) into the cache; logits
        (B, V) of image token 0."""
        self._check_prompts(prompts)
        cache = self._require_cache()
        slots, mask = cache.start(prompts.mask)
        hidden = run_layers(self.hf.language_model, cache, self.prompt_embeddings(prompts),
                            slots, mask)
        return self.image_logits(hidden[:, -1])

    def decode(self, tokens: Tensor, position: Tensor) -> Tensor:
        """Feed image tokens (R,) at cache slot ``position`` (a (1,) tensor); logits (R, V) of
        the next."""
        cache = self._require_cache()
        mask = cache.step_mask(tokens.shape[0], position)
        hidden = run_layers(self.hf.language_model, cache, self.image_embeddings(tokens[:, None]),
                            position, mask)
        return self.image_logits(hidden[:, -1])

    def _require_cache(self) -> JanusKVCache:
        if self._cache is None:
            raise RuntimeError("call setup_kv_cache(batch) before prefill/decode")
        return self._cache

    def _check_prompts(self, prompts: CaptionBatch) -> None:
        if prompts.features.dim() != 2 or prompts.features.is_floating_point():
            raise ValueError(
                "a Janus model takes prompt token ids (B, L), not text-encoder features: encode "
                "the captions with the model's own processor (ccalign encode-captions "
                "--text-encoder <the Janus model>)"
            )

    def _check_inputs(self, prompts: CaptionBatch, tokens: Tensor) -> None:
        self._check_prompts(prompts)
        if tokens.dim() != 2 or tokens.shape[0] != len(prompts) or tokens.shape[1] > self.seq_len:
            raise ValueError(f"expected image tokens (B, <= {self.seq_len}) for {len(prompts)} "
                             f"prompts; got {tuple(tokens.shape)}")
