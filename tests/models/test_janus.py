"""Janus through transformers: teacher-forced log-likelihoods against a step-by-step float64
recomputation, samplers equal to transformers' own generate (CFG and guidance-free), the null
prompt as transformers builds it, the family's files and prompts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ccalign.conditions import CaptionBatch
from ccalign.models import families
from ccalign.models.family import ModelSpec
from ccalign.models.janus import JanusImageModel
from ccalign.models.next_token import Sampler

pytest.importorskip("transformers")

from support.janus import (  # noqa: E402
    BOI,
    BOS,
    CAPTIONS,
    PAD,
    prompts,
    save_tiny_janus,
    wrapped,
)


class CondOnly:
    """transformers' generate at guidance 1 crashes (it writes 2B tokens into B rows); this
    processor keeps the conditional half, the documented workaround."""

    def __call__(self, input_ids, scores):
        return scores[: scores.shape[0] // 2]


@pytest.mark.parametrize("scale", [5.0, 2.5])
def test_greedy_cfg_tokens_equal_transformers_generate(scale):
    model = wrapped()
    inputs, conds = prompts()
    expected = model.janus.generate(**inputs, generation_mode="image", do_sample=False,
                                    guidance_scale=scale)
    got = Sampler(model).generate(conds, cfg_scale=scale, top_k=1)
    assert torch.equal(got, expected)
    assert len(set(got.flatten().tolist())) > 8  # not a degenerate repeat


def test_guidance_free_tokens_equal_transformers_at_guidance_one_on_half_the_rows():
    from transformers import LogitsProcessorList

    model = wrapped()
    inputs, conds = prompts()
    expected = model.janus.generate(**inputs, generation_mode="image", do_sample=False,
                                    guidance_scale=1.0,
                                    logits_processor=LogitsProcessorList([CondOnly()]))
    rows = []
    handle = model.layers[0].self_attn.q_proj.register_forward_pre_hook(
        lambda module, args: rows.append(args[0].shape[0]))
    got = Sampler(model).generate(conds, cfg_scale=1.0, top_k=1)
    handle.remove()
    assert torch.equal(got, expected)
    assert set(rows) == {len(CAPTIONS)}  # B rows; transformers ran 2B
    Sampler(model).generate(conds, cfg_scale=3.0, top_k=1)


def test_one_sampler_serves_prompts_of_any_length_and_batch_size():
    """The cache grows its prompt room (and rows) as batches need; each batch's tokens equal a
    fresh sampler's."""
    model = wrapped()
    batches = [prompts(["a dog"])[1], prompts()[1],
               prompts(["blue bag to the right of a sneaker and a red cat on the left of the "
                        "photo and a dog to the right of a blue cat"])[1], prompts(["a cat"])[1]]
    assert batches[2].features.shape[1] > 16  # beyond the first batch's room
    shared = Sampler(model)
    for conds in batches:
        for scale in (1.0, 3.0):
            got = shared.generate(conds, cfg_scale=scale, top_k=1)
            assert torch.equal(got, Sampler(model).generate(conds, cfg_scale=scale, top_k=1))


@pytest.mark.numerics
def test_cached_decoding_gives_the_teacher_forced_log_likelihoods_in_float64():
    """prefill + decode through the static cache (prompt slots right-aligned in the room,
    rotary positions counted from the prompt, as transformers' generate counts them) against
    the teacher-forced forward: two batches of different prompt lengths and row counts through
    one cache, null rows included."""
    model = wrapped().double()
    model.setup_kv_cache(4, prefix_len=32)
    positions = []
    model.hf.language_model.rotary_emb.register_forward_pre_hook(
        lambda module, args, kwargs: positions.append(kwargs["position_ids"].flatten().tolist()),
        with_kwargs=True)
    g = torch.Generator().manual_seed(2)
    for captions, null in ((CAPTIONS + ["a cat"], [False, True, False, True]),
                           (["a dog"], [False])):
        _, conds = prompts(captions)
        conds = CaptionBatch(conds.features, conds.mask, torch.tensor(null))
        tokens = torch.randint(0, model.vocab_size, (len(captions), model.seq_len), generator=g)
        with torch.no_grad():
            logits = [model.prefill(conds)]
            for t in range(model.seq_len - 1):
                logits.append(model.decode(tokens[:, t], torch.tensor([model.prefix_len + t])))
            cached = torch.stack(logits, 1).log_softmax(-1).gather(-1, tokens[..., None])
            expected = model.token_logprobs(conds, tokens)
        torch.testing.assert_close(cached.squeeze(-1), expected, rtol=1e-10, atol=1e-10)
        length = conds.features.shape[1]
        assert positions[0] == list(range(length))
        steps = [p[0] for p in positions[1 : model.seq_len]]
        assert steps == list(range(length, length + model.seq_len - 1))
        positions.clear()


def test_a_prompt_longer_than_the_caches_room_is_refused():
    model = wrapped()
    model.setup_kv_cache(3, prefix_len=8)
    with pytest.raises(ValueError, match="does not fit the cache's 8 prompt slots"):
        model.prefill(prompts()[1])


def reference_logprobs(model: JanusImageModel, conds: CaptionBatch, tokens: torch.Tensor):
    """Step by step through transformers' cached forward, float64: the null rows as
    transformers' generate builds them (every token but BOS and BOI set to pad)."""
    from transformers import DynamicCache

    ids = conds.features.clone()
    for row in torch.nonzero(conds.null).flatten():
        keep = (ids[row] == BOS) | (ids[row] == BOI)
        ids[row][~keep] = PAD
    hf = model.janus
    language = hf.model.language_model
    cache = DynamicCache(config=language.config)
    mask = conds.mask.long()
    embeds = hf.get_input_embeddings()(ids)
    total = torch.zeros(len(ids), dtype=torch.float64)
    for t in range(tokens.shape[1]):
        out = language(inputs_embeds=embeds, attention_mask=mask, cache=cache, use_cache=True)
        logits = hf.model.generation_head(out.last_hidden_state[:, -1])
        total += logits.log_softmax(-1).gather(1, tokens[:, t : t + 1]).squeeze(1)
        embeds = hf.prepare_embeddings_for_image_generation(tokens[:, t : t + 1])
        mask = torch.cat([mask, mask.new_ones(len(ids), 1)], dim=1)
    return total


@pytest.mark.numerics
def test_log_likelihood_equals_a_step_by_step_forward_in_float64():
    model = wrapped().double()
    _, conds = prompts()
    conds = CaptionBatch(conds.features, conds.mask, torch.tensor([False, True, False]))
    tokens = torch.randint(0, model.vocab_size, (3, model.seq_len),
                           generator=torch.Generator().manual_seed(1))
    got = model(conds, tokens)
    with torch.no_grad():
        expected = reference_logprobs(model, conds, tokens)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(got[1], model(CaptionBatch.of(conds.features[1:2],
                                                            conds.mask[1:2]), tokens[1:2])[0])


def test_the_family_loads_folders_and_round_trips_its_files(tmp_path):
    folder = save_tiny_janus(tmp_path / "tiny")
    family = families.identify(ModelSpec(init=str(folder)))
    assert family.name == "janus"
    model = families.create(ModelSpec(init=str(folder)))
    assert (model.seq_len, model.vocab_size, model.config.boi_id) == (16, 64, BOI)
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and not any(".vqmodel." in n or ".vision_model." in n for n in trained)
    family.save(model, tmp_path / "m.safetensors")
    from ccalign.io import open_safetensors  # the LM head tied to the embedding: stored once

    with open_safetensors(tmp_path / "m.safetensors") as f:
        stored, meta = set(f.keys()), f.metadata()
    assert "janus.lm_head.weight" not in stored and json.loads(meta["ccalign.tied_weights"]) == {
        "janus.lm_head.weight": "janus.model.language_model.embed_tokens.weight"}
    again = families.load_file(tmp_path / "m.safetensors")
    for (key, a), b in zip(model.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), key
    family.save(again, tmp_path / "hf", official=True)
    third = families.create(ModelSpec(init=str(tmp_path / "hf")))
    _, conds = prompts()
    tokens = torch.randint(0, 64, (3, 16))
    with torch.no_grad():
        assert torch.equal(third(conds, tokens), model(conds, tokens))
    assert third.janus.generation_config.generation_kwargs == {"boi_token_id": BOI}


def test_encode_captions_writes_the_processors_prompt_ids(tmp_path, capsys):
    from ccalign.cli import main
    from ccalign.data.captions import CaptionFile

    folder = save_tiny_janus(tmp_path / "tiny")
    (tmp_path / "captions.txt").write_text("\n".join(CAPTIONS))
    out = tmp_path / "prompts.safetensors"
    assert main(["encode-captions", str(tmp_path / "captions.txt"), "--text-encoder",
                 str(folder), "--length", "20", "--out", str(out), "--quiet"]) == 0
    stored = CaptionFile(out, 0, 0).batch([0, 1, 2])
    _, expected = prompts()
    pad = 20 - expected.features.shape[1]
    assert stored.features.dtype == torch.int64 and stored.features.shape == (3, 20)
    assert torch.equal(stored.features[:, pad:], expected.features)
    assert (stored.features[:, :pad] == PAD).all() and not stored.mask[:, :pad].any()
    with pytest.raises(ValueError, match="token ids"):
        CaptionFile(out, 120, 2048)
    assert main(["encode-captions", str(tmp_path / "captions.txt"), "--text-encoder",
                 str(folder), "--length", "5", "--out", str(tmp_path / "short.safetensors"),
                 "--quiet"]) == 1
    assert "raise --length" in capsys.readouterr().err


def test_cli_samples_prompts_with_the_models_own_processor_and_vq(tmp_path):
    import numpy as np

    from ccalign.cli import main

    folder = save_tiny_janus(tmp_path / "tiny")
    (tmp_path / "prompts.txt").write_text("\n".join(CAPTIONS))
    out = tmp_path / "run"
    assert main(["sample", str(folder), "--prompts", str(tmp_path / "prompts.txt"), "--out",
                 str(out), "--cfg-scale", "5", "--top-k", "1"]) == 0
    tokens = np.load(out / "tokens.npz")["tokens"]
    model = families.create(ModelSpec(init=str(folder)))
    inputs, _ = prompts()
    expected = model.janus.generate(**inputs, generation_mode="image", do_sample=False,
                                    guidance_scale=5.0)
    np.testing.assert_array_equal(tokens, expected.numpy())
    images = np.load(out / "samples.npz")["arr_0"]
    assert images.shape == (3, 16, 16, 3) and images.dtype == np.uint8


def test_codec_takes_the_cosine_nearest_code_and_decodes_with_the_models_vq():
    """The original quantiser's rule (codebook_l2_norm): the code of largest cosine to the
    latent, not transformers' Euclidean-nearest unnormalised code."""
    import torch.nn.functional as F

    from ccalign.models.janus.codec import JanusCodec

    model = wrapped()
    codec = JanusCodec.of_model(model)
    assert (codec.grid, codec.image_size, codec.vocab_size) == (4, 16, 64)
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    codes = codec.encode(images)
    vq = model.hf.vqmodel
    with torch.no_grad():
        z = vq.quant_conv(vq.encoder(images)).double().permute(0, 2, 3, 1).reshape(3, 16, -1)
    book = vq.quantize.embedding.weight.double()
    cosine = F.normalize(z, dim=-1) @ F.normalize(book, dim=-1).T
    assert codes.shape == (3, 16) and torch.equal(codes, cosine.argmax(-1))
    with torch.no_grad():  # transformers' own encode picks other codes here (17 of 48)
        euclidean = vq.encode(images).image_tokens.view(3, -1)
    assert not torch.equal(codes, euclidean)
    with torch.no_grad():
        assert torch.equal(codec.decode(codes), vq.decode(codes).float())
    assert codec.decode(codes).shape == (3, 3, 16, 16)


def test_extract_codes_reads_images_through_the_checkpoints_own_vq(tmp_path):
    """`extract-codes --tokenizer <Janus folder>`: the codes JanusCodec gives the centre crops."""
    import numpy as np
    from PIL import Image

    from ccalign.cli import main
    from ccalign.data.codes import open_codes
    from ccalign.data.images import views
    from ccalign.models.janus.codec import JanusCodec

    folder = save_tiny_janus(tmp_path / "tiny")
    rng = np.random.default_rng(0)
    paths = []
    for name, size in (("cat", (20, 24)), ("dog", (16, 16)), ("dog", (30, 18))):
        (tmp_path / "images" / name).mkdir(parents=True, exist_ok=True)
        paths.append(tmp_path / "images" / name / f"{len(paths)}.png")
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(paths[-1])
    flat = tmp_path / "codes.safetensors"
    assert main(["extract-codes", str(tmp_path / "images"), "--tokenizer", str(folder),
                 "--views", "center", "--flat", str(flat), "--workers", "0",
                 "--no-progress"]) == 0
    codec = JanusCodec.of_model(families.create(ModelSpec(init=str(folder))))
    crops = np.concatenate([views(Image.open(p).convert("RGB"), 16, "center") for p in paths])
    x = torch.from_numpy(crops).float().div(255).sub(0.5).div(0.5).permute(0, 3, 1, 2)
    codes = open_codes(flat)
    assert codes.vocab_size == 64 and codes.codes.shape == (3, 1, 16)
    np.testing.assert_array_equal(codes.codes[:, 0].numpy(), codec.encode(x).numpy())
    np.testing.assert_array_equal(codes.all_labels(), [0, 1, 1])


def shard_apart(folder, prefix: str) -> set[str]:
    """Rewrite a one-file checkpoint as shards (and an index) that keep the tensors named
    ``prefix``* apart from the others, as a large sharded checkpoint does; their shards' names."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    weight_map, shards = {}, {}
    for name, tensor in tensors.items():
        file = f"model-0000{2 if name.startswith(prefix) else 1}-of-00002.safetensors"
        weight_map[name] = file
        shards.setdefault(file, {})[name] = tensor
    for file, part in shards.items():
        save_file(part, folder / file, metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return {"model-00002-of-00002.safetensors"}


def test_the_vq_alone_is_read_from_the_shards_that_hold_it(tmp_path, monkeypatch):
    """extract-codes' codec: the VQ's tensors only (not the language model), the same codes and
    images as the whole model's VQ; a checkpoint naming them otherwise loads the whole model."""
    import safetensors

    from ccalign.models.janus import codec as janus_codec
    from ccalign.models.janus.codec import JanusCodec

    folder = tmp_path / "tiny"
    save_tiny_janus(folder)
    model = families.create(ModelSpec(init=str(folder)))
    vq_files = shard_apart(folder, janus_codec.VQ_PREFIX)
    opened, real_open = [], safetensors.safe_open
    monkeypatch.setattr(safetensors, "safe_open",
                        lambda path, **kw: opened.append(Path(path).name) or real_open(path, **kw))
    alone = families.get("janus").codec_for(ModelSpec(init=str(folder)), "--tokenizer")
    assert set(opened) == vq_files
    whole = JanusCodec.of_model(model)
    assert (alone.grid, alone.image_size, alone.vocab_size) == (whole.grid, whole.image_size,
                                                                 whole.vocab_size)
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    codes = whole.encode(images)
    assert torch.equal(alone.encode(images), codes)
    assert torch.equal(alone.decode(codes), whole.decode(codes))
    monkeypatch.setattr(janus_codec, "VQ_PREFIX", "model.elsewhere.")
    fallback = families.get("janus").codec_for(ModelSpec(init=str(folder)), "--tokenizer")
    assert torch.equal(fallback.encode(images), codes)


def test_extract_codes_encodes_in_float32_and_refuses_other_sizes(tmp_path, capsys):
    from ccalign.cli import main
    from ccalign.commands.extract_codes import open_tokenizer

    folder = tmp_path / "tiny"
    save_tiny_janus(folder)
    model = families.create(ModelSpec(init=str(folder)))
    model.janus.to(torch.bfloat16).save_pretrained(folder)  # as the Hub stores Janus-Pro
    assert open_tokenizer(str(folder), None, None).vq.quant_conv.weight.dtype == torch.float32
    assert open_tokenizer(str(folder), None, 16).image_size == 16
    for option, message in ((["--image-size", "32"], "codes 16 px images (4 x 4 codes"),
                            (["--tokenizer-name", "VQ-16"], "decodes with its own VQ")):
        assert main(["extract-codes", str(tmp_path), "--tokenizer", str(folder), "--flat",
                     str(tmp_path / "x.safetensors"), *option]) == 1
        assert message in capsys.readouterr().err
    with pytest.raises(Exception, match="not a tokenizer"):  # a model without its own tokenizer
        open_tokenizer("llamagen-B-256", None, None)


def test_a_checkpoint_without_safetensors_files_falls_back_to_the_whole_model(tmp_path):
    from ccalign.models.janus.codec import JanusCodec, load_vq

    folder = tmp_path / "tiny"
    save_tiny_janus(folder)
    model = families.create(ModelSpec(init=str(folder)))
    (folder / "model.safetensors").unlink()
    torch.save(model.janus.state_dict(), folder / "pytorch_model.bin")
    assert load_vq(str(folder)) is None
    codec = families.get("janus").codec_for(ModelSpec(init=str(folder)), "--tokenizer")
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    assert torch.equal(codec.encode(images), JanusCodec.of_model(model).encode(images))
