"""A tiny T5 encoder and a word-level tokenizer built here (nothing downloaded), saved in
transformers' format: what ``--text-encoder`` reads."""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = ["<pad>", "</s>", "<unk>", "a", "an", "sneaker", "bag", "shirt", "boot", "to", "the",
         "left", "right", "of", "and", "red", "on"]


def save_tiny_text_encoder(folder: Path, dim: int, seed: int = 0) -> Path:
    """T5 encoder of width ``dim`` (2 layers) and its tokenizer in ``folder``."""
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {word: i for i, word in enumerate(WORDS)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", vocab["</s>"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>",
                                   eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(seed)
    config = T5Config(vocab_size=len(WORDS), d_model=dim, d_kv=dim // 2, d_ff=2 * dim,
                      num_layers=2, num_heads=2, feed_forward_proj="gated-gelu")
    T5EncoderModel(config).save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder
