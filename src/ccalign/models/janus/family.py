"""Janus(-Pro) as a model family: checkpoints in transformers' format (a local folder or a Hub
name such as deepseek-community/Janus-Pro-1B, through huggingface_hub's cache), prompts as
captions of token ids, the family's sampler, and its memory estimate.

A ccalign file of a Janus model (a fine-tune's ``final.safetensors``) carries transformers'
config and the special ids in its metadata (the LM head tied to the embedding stored once);
``official`` saving writes a transformers folder (``save_pretrained``) that
``JanusForConditionalGeneration.from_pretrained`` reads back.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from torch import nn

from ccalign import hub
from ccalign.conditions import Captions
from ccalign.errors import UserError
from ccalign.io import PathLike
from ccalign.models.family import (
    Activations,
    BaseFamily,
    Dtypes,
    ModelSpec,
    local_file,
)
from ccalign.models.janus.model import JanusImageConfig, JanusImageModel
from ccalign.models.next_token import SAMPLING_OPTIONS, Sampler, sampler_options

#: prompt tokens assumed by the memory plan (Janus-Pro's prompts: the chat template + caption)
PLAN_PROMPT_TOKENS = 64


def _preset(hidden: int, layers: int, heads: int, ffn: int) -> dict:
    """A Janus-Pro architecture: DeepSeek-LLM sizes (the Janus-Pro paper's table; the FFN
    widths are DeepSeek-LLM's), SigLIP-L/16 at 384 px, the 16,384-code VQ at 24 x 24."""
    return {"hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
            "intermediate_size": ffn}


class JanusFamily(BaseFamily):
    """Janus and Janus-Pro (1B, 7B) through transformers' JanusForConditionalGeneration."""

    name = "janus"
    title = "Janus"
    model_class = JanusImageModel
    config_class = JanusImageConfig
    official_suffix = ""  # a transformers folder
    presets = {"Janus-Pro-1B": _preset(2048, 24, 16, 5632),
               "Janus-Pro-7B": _preset(4096, 30, 32, 11008)}
    # every attention and MLP projection of the language model (LoRA through peft)
    lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    capabilities = frozenset({"own_tokenizer"})  # the VQ inside the checkpoint (extract-codes)
    lacks = {
        "beta_embedding": "GFT's beta embedding belongs to the class-conditional LlamaGen",
        "retokenize": "Janus' VQ is not used to re-encode samples here",
    }
    sampling_options = SAMPLING_OPTIONS

    # ---- files ----
    def recognizes(self, path: PathLike) -> bool:
        return self.config_from_file(path) is not None or hf_folder_type(path) == "janus"

    def config_for(self, spec: ModelSpec) -> JanusImageConfig:
        """A ccalign file's or a transformers folder's config, else a preset's (also for a
        registry name not in the cache: a memory plan needs no weights)."""
        path = local_file(spec.init)
        recorded = self.config_from_file(path) if path is not None else None
        if recorded is not None:
            return recorded
        release = hub.find(spec.init) if spec.init is not None else None
        try:
            folder = self._folder(spec.init) if spec.init is not None else None
        except UserError:
            if release is None or release.preset not in self.presets:
                raise
            return preset_config(self.presets[release.preset], spec.arch)
        if folder is not None:
            return config_of(load_hf(folder, meta=True), folder)
        if spec.preset not in self.presets:
            raise ValueError(f"{spec.preset!r} is not a Janus preset; choose one of "
                             f"{sorted(self.presets)}, or give a model folder")
        return preset_config(self.presets[spec.preset], spec.arch)

    def build(self, spec: ModelSpec) -> JanusImageModel:
        return JanusImageModel(self.config_for(spec))

    def load(self, spec: ModelSpec, *, codec: Any = None) -> JanusImageModel:
        """A ccalign file, a transformers folder or a registry/Hub name, loaded strictly."""
        path = local_file(spec.init)
        if path is not None and self.config_from_file(path) is not None:
            return super().load(spec)
        folder = self._folder(spec.init)
        if folder is None:
            raise ValueError(f"{spec.init} is neither a ccalign Janus file nor a transformers "
                             "folder of a Janus model (config.json with model_type janus)")
        janus = load_hf(folder)
        return JanusImageModel(config_of(janus, folder), janus)

    def _folder(self, init: str) -> str | None:
        """The transformers folder (or Hub repo id) ``init`` names, if any."""
        release = hub.find(init)
        if release is not None:
            hub.resolve(init, kind="model")  # the config file: cached, or one clear line
            return release.repo
        if hf_folder_type(init) == "janus":
            return str(init)
        return None

    def save_official(self, model: nn.Module, path: PathLike) -> None:
        """A transformers folder: ``save_pretrained`` of the model and its generation config."""
        model.janus.save_pretrained(path)

    # ---- conditions, geometry, sampling ----
    def condition(self, model: nn.Module) -> Captions:
        return model.condition_kind

    def token_grid(self, model: nn.Module) -> int:
        return math.isqrt(model.seq_len)

    def describe(self, model: nn.Module) -> str:
        return f"({model.seq_len} image tokens)"

    def sampler(self, model: nn.Module, **options: Any) -> Sampler:
        return Sampler(model, **options)

    def sampler_options(self, args: argparse.Namespace) -> dict:
        return sampler_options(args)

    def prompt_encoder(self, source: str, *, length: int = 0, **options: Any):
        """Captions to this family's prompts: the checkpoint's own processor."""
        from ccalign.models.janus.prompts import JanusPrompts

        return JanusPrompts(self._folder(source) or source, length=length)

    def load_with_tokenizer(self, spec: ModelSpec, tokenizer: PathLike | None) -> tuple:
        """The model and its own VQ (Janus decodes with the VQ inside the checkpoint)."""
        from ccalign.models.janus.codec import JanusCodec

        if tokenizer is not None:
            raise ValueError("--tokenizer: a Janus model decodes with its own VQ; leave it out")
        model = self.load(spec)
        return model, JanusCodec.of_model(model)

    def codec_for(self, spec: ModelSpec, purpose: str) -> Any:
        """The checkpoint's VQ; from a transformers checkpoint without the language model."""
        from ccalign.models.janus.codec import JanusCodec, load_vq

        folder = self._folder(spec.init)
        if folder is not None:
            try:
                codec = load_vq(folder)
            except OSError as exc:
                raise unreadable(folder, exc) from None
            if codec is not None:
                return codec
        return JanusCodec.of_model(self.load(spec))

    # ---- memory ----
    def activations(self, model: nn.Module, rows: int, dtypes: Dtypes,
                    checkpointing: bool) -> Activations:
        """Saved tensors of one teacher-forced forward of ``rows`` prompts (PLAN_PROMPT_TOKENS
        each) and their image tokens, and the workspace.

        Per token and Llama block (D width, F FFN width, K key/value width; r residual bytes,
        c compute bytes): two RMSNorms (float32 input, normalised value, output, rsqrt), q, k,
        v and the attention output with its log-sum-exp, the FFN's gate, up, activation and
        product (4 x F x c). The generation head keeps (N, 16384) float32 logits and their
        log-softmax per image. With checkpointing a block keeps only its input.
        """
        text = model.janus.config.text_config
        dim, ffn, heads = text.hidden_size, text.intermediate_size, text.num_attention_heads
        kv = text.num_key_value_heads * (dim // heads)
        r, c = dtypes.weight_bytes, dtypes.compute_bytes
        tokens = rows * (PLAN_PROMPT_TOKENS + model.seq_len)
        norm = (4 + r + c) * dim + 4
        block = 2 * norm + c * (2 * dim + 2 * kv) + 4 * heads + 4 * c * ffn
        per_layer = r * dim if checkpointing else block
        saved = tokens * (text.num_hidden_layers * per_layer + (4 + r) * dim)
        head = rows * model.seq_len * (model.vocab_size * (c + 8) + c * dim)
        block_transient = tokens * c * (3 * ffn + 3 * dim)
        recompute = tokens * block if checkpointing else 0
        return Activations(saved + head, block_transient + recompute)


def hf_folder_type(path: PathLike | None) -> str | None:
    """The model_type of a transformers folder's config.json (None when it is not one)."""
    if path is None:
        return None
    config = Path(path) / "config.json"
    if not config.is_file():
        return None
    try:
        return json.loads(config.read_text()).get("model_type")
    except (ValueError, OSError):
        return None


def load_hf(source: str, meta: bool = False):
    """transformers' JanusForConditionalGeneration from a folder or Hub repo (the cache and the
    offline flags apply); ``meta``: the architecture only, no weights."""
    try:
        from transformers import JanusConfig, JanusForConditionalGeneration
    except ImportError:
        raise UserError("Janus models need transformers: pip install 'ccalign[text]'") from None
    try:
        if meta:
            import torch

            config = JanusConfig.from_pretrained(source)
            with torch.device("meta"):
                model = JanusForConditionalGeneration(config)
            model.generation_config = _generation_config(source)
            return model
        return JanusForConditionalGeneration.from_pretrained(source)
    except OSError as exc:
        raise unreadable(source, exc) from None


def unreadable(source: str, exc: OSError) -> UserError:
    """The error for a Janus checkpoint that transformers or the Hub cache could not read."""
    return UserError(f"Janus model {source!r} could not be loaded ({str(exc).splitlines()[0]}): "
                     "give a transformers folder, or a Hub name that is cached here")


def _generation_config(source: str):
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(source)
    except OSError:
        return GenerationConfig()


def config_of(janus, source: str) -> JanusImageConfig:
    """The special ids from the checkpoint's generation config: BOS, pad, and BOI from its
    ``generation_kwargs``, as transformers' generate reads it. That key is read from the file
    itself: transformers 5.25's GenerationConfig drops it on loading."""
    gen = janus.generation_config
    boi = _raw_generation_config(source).get("generation_kwargs", {}).get("boi_token_id")
    ids = {"bos_id": gen.bos_token_id, "boi_id": boi, "pad_id": gen.pad_token_id}
    missing = [key for key, value in ids.items() if value is None]
    if missing:
        raise ValueError(
            f"the checkpoint's generation_config.json lacks {', '.join(missing)} (bos_token_id, "
            "pad_token_id, generation_kwargs.boi_token_id): image generation needs them"
        )
    return JanusImageConfig(janus=janus.config.to_dict(), **ids)


def _raw_generation_config(source: str) -> dict:
    """generation_config.json of a folder or a (cached) Hub repo, as written; {} if absent."""
    path = Path(source) / "generation_config.json"
    if not Path(source).is_dir():
        from huggingface_hub import hf_hub_download

        try:
            path = Path(hf_hub_download(source, "generation_config.json"))
        except Exception:  # not cached / no such file: the ids are then reported missing
            return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def preset_config(sizes: dict, arch: dict) -> JanusImageConfig:
    """A Janus-Pro architecture for memory plans: the language model's sizes (``arch``
    overrides them), vocabulary 102,400, SigLIP-L at 384 px, the VQ's 24 x 24 codes."""
    from transformers import JanusConfig

    text = {"model_type": "llama", "vocab_size": 102400, "max_position_embeddings": 16384,
            "num_key_value_heads": sizes["num_attention_heads"], **sizes, **arch}
    vision = {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
              "intermediate_size": 4096, "image_size": 384, "patch_size": 16,
              "projection_dim": text["hidden_size"], "num_image_tokens": 576}
    vq = {"projection_dim": text["hidden_size"], "image_token_embed_dim": text["hidden_size"]}
    config = JanusConfig(text_config=text, vision_config=vision, vq_config=vq)
    return JanusImageConfig(janus=config.to_dict(), bos_id=100000, boi_id=100016, pad_id=100015)


FAMILY = JanusFamily()
