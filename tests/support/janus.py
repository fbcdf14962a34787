"""A tiny random Janus (transformers' JanusForConditionalGeneration) with a word-level tokenizer
and a processor built here, saved in transformers' format: nothing downloaded."""

from __future__ import annotations

from pathlib import Path

import torch

SPECIAL = ["<pad>", "<bos>", "<eos>", "<image_placeholder>", "<begin_of_image>",
           "<end_of_image>", "<|User|>", "<|Assistant|>", "<unk>"]
WORDS = ["a", "an", "red", "blue", "cat", "dog", "sneaker", "bag", "on", "the", "left", "right",
         "of", "and", "to", ":", "photo"]
PAD, BOS, EOS, IMAGE, BOI = 0, 1, 2, 3, 4
CAPTIONS = ["a red cat on the left", "a dog", "blue bag to the right of a sneaker"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|User|>: {{ message['content'][0]['text'] }}\n\n"
    "{% endfor %}{% if add_generation_prompt %}<|Assistant|>:{% endif %}"
)


def tiny_config(hidden: int = 32, layers: int = 2, grid: int = 4, codebook: int = 64):
    """A Janus config: Llama text model of width ``hidden``, a grid x grid image of ``codebook``
    codes (VQ decoder 4 -> 16 px per code side x 4)."""
    from transformers import JanusConfig, JanusVisionConfig, JanusVQVAEConfig, LlamaConfig

    vocab = len(SPECIAL) + len(WORDS)
    text = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                       num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=512, pad_token_id=PAD, bos_token_id=BOS,
                       eos_token_id=EOS)
    vision = JanusVisionConfig(hidden_size=hidden, num_hidden_layers=1, num_attention_heads=4,
                               image_size=4 * grid, patch_size=4, projection_dim=hidden,
                               num_image_tokens=grid * grid, mlp_ratio=2)
    vq = JanusVQVAEConfig(embed_dim=8, num_embeddings=codebook, latent_channels=32,
                          base_channels=32, channel_multiplier=[1, 1, 1], num_res_blocks=1,
                          projection_dim=hidden, image_token_embed_dim=hidden,
                          num_hidden_layers=2)
    return JanusConfig(text_config=text, vision_config=vision, vq_config=vq, image_token_id=IMAGE)


def tiny_janus(seed: int = 0, std: float = 0.2, **sizes):
    """The transformers model with random weights (a wider init than the default, so that
    greedy decoding does not collapse onto one code) and its generation config."""
    from transformers import JanusForConditionalGeneration

    torch.manual_seed(seed)
    model = JanusForConditionalGeneration(tiny_config(**sizes)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "language_model" in name or "generation" in name:
                p.normal_(0.0, std) if p.dim() > 1 else None
    model.generation_config.pad_token_id = PAD
    model.generation_config.bos_token_id = BOS
    model.generation_config.eos_token_id = EOS
    model.generation_config.generation_kwargs = {"boi_token_id": BOI}
    return model


def tiny_processor(image_size: int = 16, image_tokens: int = 16):
    from transformers import JanusImageProcessor, JanusProcessor, PreTrainedTokenizerFast

    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {token: i for i, token in enumerate(SPECIAL + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.add_special_tokens(SPECIAL)
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.post_processor = processors.TemplateProcessing(single="<bos> $A",
                                                      special_tokens=[("<bos>", BOS)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        unk_token="<unk>", padding_side="left",
        extra_special_tokens={"image_token": "<image_placeholder>", "boi_token":
                              "<begin_of_image>", "eoi_token": "<end_of_image>"},
    )
    images = JanusImageProcessor(size={"height": image_size, "width": image_size},
                                 image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return JanusProcessor(image_processor=images, tokenizer=tokenizer,
                          num_image_tokens=image_tokens, chat_template=CHAT_TEMPLATE)


def save_tiny_janus(folder: Path, seed: int = 0, **sizes) -> Path:
    """The tiny model, its generation config and processor in ``folder`` (transformers'
    format, as deepseek-community/Janus-Pro-1B is laid out)."""
    model = tiny_janus(seed, **sizes)
    model.save_pretrained(folder)
    grid = model.config.vision_config.image_size // model.config.vision_config.patch_size
    tiny_processor(4 * grid, grid * grid).save_pretrained(folder)
    return Path(folder)


def wrapped(seed: int = 0):
    """The tiny model as ccalign's JanusImageModel."""
    from ccalign.models.janus import JanusImageConfig, JanusImageModel

    hf = tiny_janus(seed)
    return JanusImageModel(JanusImageConfig(hf.config.to_dict(), BOS, BOI, PAD), hf)


def prompts(captions=CAPTIONS):
    """transformers' inputs for image generation, and the same prompts as a CaptionBatch."""
    from ccalign.conditions import CaptionBatch

    processor = tiny_processor()
    texts = [processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": c}]}], add_generation_prompt=True)
        for c in captions]
    inputs = processor(text=texts, generation_mode="image", padding=True, return_tensors="pt")
    return inputs, CaptionBatch.of(inputs["input_ids"], inputs["attention_mask"])
