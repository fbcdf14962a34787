"""CUDA paths against their CPU / eager references (skipped without a GPU; run by
``benchmarks/gpu_check.sh`` or ``pytest -m cuda``)."""

from __future__ import annotations

import pytest
import torch

from ccalign.sample import Sampler
from support.tiny import RandomCodes, make_config, random_model, tiny_model

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def one_step(tmp_path, **train) -> tuple[dict, list[torch.Tensor]]:
    """One CCA step of the tiny model on CUDA: the record and the weight update (float32)."""
    config = make_config(tmp_path, train={"device": "cuda", "steps": 1, **train})
    from ccalign.train import Trainer

    trainer = Trainer(config, tiny_model(), RandomCodes(8))
    start = [p.detach().float().clone() for p in trainer.model.parameters()]
    data = RandomCodes(8)
    micro = [(data.tokens[:4], data.labels[:4]), (data.tokens[4:], data.labels[4:])]
    record = trainer.train_step(micro, 1)
    update = [
        p.detach().float() - s for p, s in zip(trainer.model.parameters(), start, strict=True)
    ]
    return record, update


def test_bf16_train_step_matches_float32_on_gpu(tmp_path):
    """bf16 autocast and bf16 weights give the float32 step's loss and update direction."""
    exact, exact_update = one_step(tmp_path / "fp32", precision="fp32")
    for name, train in {
        "autocast": {"precision": "bf16"},
        "bf16-weights": {"precision": "bf16", "weights_dtype": "bf16"},
    }.items():
        record, update = one_step(tmp_path / name, **train)
        assert record["loss"] == pytest.approx(exact["loss"], rel=2e-2), name
        flat, flat_exact = (
            torch.cat([u.flatten() for u in update]),
            torch.cat([u.flatten() for u in exact_update]),
        )
        assert torch.nn.functional.cosine_similarity(flat, flat_exact, dim=0) > 0.97, name


def greedy_tokens(model, device: str, **options) -> torch.Tensor:
    """top-k 1 picks the argmax whatever the random draw: comparable across devices."""
    sampler = Sampler(model, device=device, dtype=torch.float32, **options)
    generator = torch.Generator(device).manual_seed(0)
    labels = torch.arange(6) % model.num_classes
    return sampler.generate(labels, cfg_scale=2.0, top_k=1, generator=generator).cpu()


def test_kv_cache_sampling_on_cuda_equals_cpu():
    model = random_model(std=0.3)
    cpu = greedy_tokens(model, "cpu")
    cuda = greedy_tokens(model, "cuda", cuda_graph=False)
    assert (cpu == cuda).float().mean() >= 0.99


def test_cuda_graph_sampling_equals_eager():
    """The captured graph replays the eager step's kernels: the same draws, token for token."""
    model = random_model(std=0.3)
    outs = {}
    for graph in (False, True):
        sampler = Sampler(model, device="cuda", cuda_graph=graph)
        generator = torch.Generator("cuda").manual_seed(0)
        labels = torch.arange(8) % model.num_classes
        outs[graph] = sampler.generate(labels, cfg_scale=2.0, generator=generator).cpu()
    assert torch.equal(outs[False], outs[True])


def test_compiled_sampling_equals_eager():
    """torch.compile fuses kernels (float rounding may differ): greedy tokens agree."""
    model = random_model(std=0.3)
    eager = greedy_tokens(model, "cuda", cuda_graph=False)
    compiled = greedy_tokens(model, "cuda", cuda_graph=True, compile=True)
    assert (eager == compiled).float().mean() >= 0.99


def test_janus_cuda_graph_sampling_equals_eager_and_transformers():
    """Janus' decode step over transformers' layers, captured: the eager step's draws in
    float32 and bf16, through a cache whose prompt room grows between batches; greedy CFG
    tokens equal to transformers' generate on the GPU."""
    pytest.importorskip("transformers")
    from support.janus import prompts, wrapped

    model = wrapped().to("cuda")
    inputs, conds = prompts()
    longer = prompts(["blue bag to the right of a sneaker and a red cat on the left of the "
                      "photo and a dog to the right of a blue cat"])[1]
    for dtype in (torch.float32, torch.bfloat16):
        outs = {}
        for graph in (False, True):
            sampler = Sampler(model, device="cuda", dtype=dtype, cuda_graph=graph)
            generator = torch.Generator("cuda").manual_seed(0)
            outs[graph] = [sampler.generate(c, cfg_scale=3.0, generator=generator).cpu()
                           for c in (conds, longer, conds)]
        for eager, captured in zip(outs[False], outs[True], strict=True):
            assert torch.equal(eager, captured), dtype
    expected = model.janus.generate(**{k: v.cuda() for k, v in inputs.items()},
                                    generation_mode="image", do_sample=False,
                                    guidance_scale=3.0).cpu()
    sampler = Sampler(model, device="cuda", dtype=torch.float32)
    assert torch.equal(sampler.generate(conds, cfg_scale=3.0, top_k=1).cpu(), expected)
