"""LlamaGen GPT: official layout, exact forward against a float64 reference, file loaders."""

import math

import pytest
import torch
import torch.nn.functional as F

from ccalign.models import llamagen
from ccalign.weights import CheckpointMismatchError

OFFICIAL_COUNTS = {
    "GPT-B": (110_888_448, 12, 768, 2048),
    "GPT-L": (342_910_976, 24, 1024, 2816),
    "GPT-XL": (774_699_520, 36, 1280, 3584),
    "GPT-XXL": (1_410_972_672, 48, 1536, 4096),
    "GPT-3B": (3_096_659_200, 24, 3200, 8704),
}


#: the architecture of ``tiny()``, also what an official-layout file of it must be loaded with
TINY = dict(grid=3, dim=32, n_layer=2, n_head=4, vocab_size=40, num_classes=5)


def tiny(**kw) -> llamagen.LlamaGen:
    torch.manual_seed(0)
    args = {**TINY, **kw}
    model = llamagen.build("custom", **args)
    torch.nn.init.normal_(model.output.weight, std=0.3)  # the official zero init hides bugs
    for layer in model.layers:  # non-trivial norm weights
        torch.nn.init.uniform_(layer.attention_norm.weight, 0.5, 1.5)
    return model.eval()


@pytest.mark.parametrize("name", list(OFFICIAL_COUNTS))
def test_official_keys_shapes_and_parameter_counts(name):
    count, n_layer, dim, hidden = OFFICIAL_COUNTS[name]
    with torch.device("meta"):
        model = llamagen.build(name, grid=24)
    sd = model.state_dict()
    assert model.num_parameters() == count
    expected = {
        "cls_embedding.embedding_table.weight": (1001, dim),
        "tok_embeddings.weight": (16384, dim),
        "norm.weight": (dim,),
        "output.weight": (16384, dim),
    }
    for i in range(n_layer):
        p = f"layers.{i}."
        expected.update(
            {
                p + "attention.wqkv.weight": (3 * dim, dim),
                p + "attention.wo.weight": (dim, dim),
                p + "feed_forward.w1.weight": (hidden, dim),
                p + "feed_forward.w3.weight": (hidden, dim),
                p + "feed_forward.w2.weight": (dim, hidden),
                p + "attention_norm.weight": (dim,),
                p + "ffn_norm.weight": (dim,),
            }
        )
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected


def test_init_matches_llamagen():
    torch.manual_seed(0)
    model = llamagen.build("custom", grid=4, dim=64, n_layer=2, n_head=4, vocab_size=512)
    assert torch.count_nonzero(model.output.weight) == 0
    w = model.layers[0].feed_forward.w1.weight
    assert abs(w.std().item() - 0.02) < 0.002
    assert torch.all(model.norm.weight == 1)


def reference_rope_angles(grid: int, head_dim: int, base: float) -> torch.Tensor:
    """Angle (position, pair) in float64, written from the spec: cell (r, c) -> [r f, c f]."""
    half = head_dim // 2
    freqs = [base ** (-(k / half)) for k in range(0, half, 2)]
    angles = torch.zeros(1 + grid * grid, half, dtype=torch.float64)
    for r in range(grid):
        for c in range(grid):
            angles[1 + r * grid + c] = torch.tensor([r * f for f in freqs] + [c * f for f in freqs])
    return angles


def reference_logits(model: llamagen.LlamaGen, labels, tokens) -> torch.Tensor:
    """Float64 transcription of the official forward (complex rotation, explicit softmax)."""
    cfg = model.config
    sd = {k: v.double() for k, v in model.state_dict().items()}
    n = tokens.shape[1]
    x = torch.cat(
        [
            sd["cls_embedding.embedding_table.weight"][labels][:, None],
            sd["tok_embeddings.weight"][tokens[:, :-1]],
        ],
        dim=1,
    )
    angles = reference_rope_angles(cfg.grid, cfg.head_dim, cfg.rope_base)[:n]
    rot = torch.polar(torch.ones_like(angles), angles)
    rot[0] = 0  # class position: cos = sin = 0
    hd = cfg.head_dim

    def rms(v, w):
        return v / torch.sqrt((v * v).mean(-1, keepdim=True) + cfg.norm_eps) * w

    def rotate(v):  # v (B, S, H, hd)
        c = torch.view_as_complex(v.reshape(*v.shape[:-1], hd // 2, 2).contiguous())
        return torch.view_as_real(c * rot[None, :, None, :]).reshape(v.shape)

    causal = torch.ones(n, n, dtype=torch.bool).tril()
    for i in range(cfg.n_layer):
        p = f"layers.{i}."
        h = rms(x, sd[p + "attention_norm.weight"])
        q, k, v = (h @ sd[p + "attention.wqkv.weight"].T).split(cfg.dim, dim=-1)
        q, k, v = (t.reshape(*t.shape[:2], cfg.n_head, hd) for t in (q, k, v))
        q, k = rotate(q), rotate(k)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
        attn = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        out = torch.einsum("bhqk,bkhd->bqhd", attn, v).reshape(*x.shape[:2], cfg.dim)
        x = x + out @ sd[p + "attention.wo.weight"].T
        h = rms(x, sd[p + "ffn_norm.weight"])
        ff = F.silu(h @ sd[p + "feed_forward.w1.weight"].T) * (
            h @ sd[p + "feed_forward.w3.weight"].T
        )
        x = x + ff @ sd[p + "feed_forward.w2.weight"].T
    return rms(x, sd["norm.weight"]) @ sd["output.weight"].T


def test_logits_equal_float64_reference():
    model = tiny()
    g = torch.Generator().manual_seed(1)
    labels = torch.tensor([0, 3, 5])  # 5 = the null class
    tokens = torch.randint(0, 40, (3, 9), generator=g)
    got = model.logits(labels, tokens)
    assert got.dtype == torch.float32 and got.shape == (3, 9, 40)
    want = reference_logits(model, labels, tokens)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


def test_rope_table_and_zero_class_position():
    table = llamagen.rope_2d_table(grid=3, head_dim=8, base=10000.0)
    angles = reference_rope_angles(3, 8, 10000.0)
    torch.testing.assert_close(table[1:, :, 0].double(), angles[1:].cos(), atol=1e-6, rtol=0)
    torch.testing.assert_close(table[1:, :, 1].double(), angles[1:].sin(), atol=1e-6, rtol=0)
    assert torch.all(table[0] == 0)  # not the identity rotation


def test_rope_frequencies_are_the_official_float32_expression():
    """1 / base^(k/half) bit for bit: base^(-k/half) differs in the last bit for some k."""
    head_dim, base = 64, 10000.0
    half = head_dim // 2
    official = 1.0 / (base ** (torch.arange(0, half, 2)[: half // 2].float() / half))
    table = llamagen.rope_2d_table(grid=2, head_dim=head_dim, base=base)
    # cell (1, 0) holds the angles [1 * freqs, 0 * freqs]: its row angles are the frequencies
    row_angles = torch.atan2(table[1 + 2, : half // 2, 1], table[1 + 2, : half // 2, 0])
    expected = torch.stack([official.cos(), official.sin()], dim=-1)
    assert torch.equal(table[1 + 2, : half // 2], expected)
    torch.testing.assert_close(row_angles, official, atol=1e-6, rtol=0)
    legacy = base ** (-torch.arange(0, half, 2, dtype=torch.float32)[: half // 2] / half)
    assert not torch.equal(legacy, official)  # the test can tell the two expressions apart


def test_class_token_query_and_key_are_zero():
    model = tiny()
    captured = {}

    def hook(module, args, output):
        captured["qkv"] = output

    model.layers[1].attention.wqkv.register_forward_hook(hook)
    model.logits(torch.tensor([1, 2]), torch.randint(0, 40, (2, 9)))
    q = llamagen.apply_rope(captured["qkv"][..., :32].reshape(2, 9, 4, 8), model.rope[:9])
    assert torch.all(q[:, 0] == 0) and q[:, 1:].abs().sum() > 0


@pytest.mark.numerics
def test_sequence_logprob_equals_naive_values_and_gradients():
    model = tiny(grid=4).train()
    for m in model.modules():  # deterministic: no dropout randomness between the two passes
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    labels, tokens = torch.tensor([0, 1, 4]), torch.randint(0, 40, (3, 16))
    naive = model.logits(labels, tokens).log_softmax(-1).gather(2, tokens[..., None]).sum((1, 2))
    weights = torch.tensor([0.3, -1.2, 2.0])
    (naive * weights).sum().backward()
    naive_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    chunked = model(labels, tokens, chunk_rows=7)  # 48 rows in 7 uneven chunks
    (chunked * weights).sum().backward()
    torch.testing.assert_close(chunked, naive.detach(), rtol=1e-5, atol=1e-5)
    for name, p in model.named_parameters():
        scale = naive_grads[name].abs().max().item()
        torch.testing.assert_close(p.grad, naive_grads[name], rtol=1e-4, atol=1e-6 * scale)


def test_sequence_logprob_never_keeps_full_vocab_tensor():
    model = tiny(grid=4, vocab_size=2048).train()
    labels, tokens = torch.tensor([0, 1]), torch.randint(0, 2048, (2, 16))
    sizes = []
    params = {p.data_ptr() for p in model.parameters()}

    def pack(t):
        if t.data_ptr() not in params:  # weights are saved by reference: not activations
            sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(labels, tokens, chunk_rows=8).sum().backward()
    full = 2 * 16 * 2048
    assert max(sizes) <= full / 8, max(sizes)  # FFN activations, never (B, N, V)
    sizes.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.logits(labels, tokens).log_softmax(-1).sum().backward()
    assert max(sizes) >= full  # the naive path does keep it: the probe sees it


def test_bad_inputs_are_named():
    model = tiny()
    with pytest.raises(ValueError, match="grid"):
        model.logits(torch.tensor([0]), torch.zeros(1, 10, dtype=torch.long))
    with pytest.raises(ValueError, match="expected labels"):
        model.logits(torch.tensor([0, 1]), torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="unknown LlamaGen model"):
        llamagen.build("GPT-M", grid=16)


@pytest.mark.parametrize("layout", ["model", "ema", "raw", "fsdp_dir", "stray_freqs", "ddp_prefix"])
def test_loads_every_official_layout_strictly(tmp_path, layout):
    source = tiny()
    sd = source.state_dict()
    if layout == "model":
        obj = {"model": sd, "optimizer": {}, "steps": 10, "args": {"gpt_model": "GPT-B"}}
    elif layout == "ema":
        obj = {"ema": sd, "steps": 3}
    elif layout == "stray_freqs":
        obj = {**sd, "freqs_cis": torch.zeros(10, 4, 2)}
    elif layout == "ddp_prefix":
        obj = {"model": {f"module.{k}": v for k, v in sd.items()}}
    else:
        obj = sd
    path = tmp_path / "ckpt.pt"
    if layout == "fsdp_dir":
        path = tmp_path / "0005000"
        path.mkdir()
        torch.save(obj, path / "consolidated.pth")
    else:
        torch.save(obj, path)
    loaded = llamagen.load(path, "custom", **TINY)
    for k, v in sd.items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_mismatched_checkpoint_lists_every_problem(tmp_path):
    sd = tiny().state_dict()
    sd.pop("norm.weight")
    sd["layers.0.attention.bias"] = torch.zeros(3)
    sd["output.weight"] = torch.zeros(41, 32)
    torch.save({"model": sd}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointMismatchError) as err:
        llamagen.load(tmp_path / "bad.pt", "custom", **TINY)
    msg = str(err.value)
    assert "1 missing" in msg and "norm.weight" in msg
    assert "1 unexpected" in msg and "layers.0.attention.bias" in msg
    assert "output.weight: checkpoint (41, 32) vs model (40, 32)" in msg
    torch.save({"optimizer": {}}, tmp_path / "empty.pt")
    with pytest.raises(CheckpointMismatchError, match="no model weights"):
        llamagen.load(tmp_path / "empty.pt", "GPT-B", grid=16)
    with pytest.raises(FileNotFoundError):
        llamagen.load(tmp_path / "absent.pt", "GPT-B", grid=16)
    with pytest.raises(ValueError, match="preset name"):
        llamagen.load(tmp_path / "bad.pt")


def test_save_load_round_trip_and_no_cache_in_files(tmp_path):
    model = tiny()
    model.setup_kv_cache(batch=2)
    assert set(model.state_dict()) == set(tiny().state_dict())  # cache buffers never saved
    llamagen.save(model, tmp_path / "m.safetensors")
    llamagen.save(model, tmp_path / "m.pt", official=True)
    again = llamagen.load(tmp_path / "m.safetensors")  # config read from the file itself
    assert again.config == model.config
    official = llamagen.load(tmp_path / "m.pt", "custom", **TINY)
    raw = torch.load(tmp_path / "m.pt", weights_only=True)
    assert set(raw) == {"model"}
    labels, tokens = torch.tensor([1, 5]), torch.randint(0, 40, (2, 9))
    for other in (again, official):
        assert torch.equal(other.eval().logits(labels, tokens), model.logits(labels, tokens))
    assert not list(tmp_path.glob(".*tmp"))  # atomic writes leave no temporaries


@pytest.mark.numerics
def test_cached_decode_matches_teacher_forcing():
    model = tiny()
    labels, tokens = torch.tensor([2, 5]), torch.randint(0, 40, (2, 9))
    want = model.logits(labels, tokens)
    model.setup_kv_cache(batch=2)
    with torch.no_grad():
        steps = [model.prefill(labels)]
        for t in range(8):
            steps.append(model.decode(tokens[:, t], torch.tensor([t + 1])))
    torch.testing.assert_close(torch.stack(steps, 1), want, rtol=1e-5, atol=1e-5)
