"""Side by side with the official code: sampling and a CCA training step, same weights, one run.

    python benchmarks/side_by_side.py --official-llamagen ~/LlamaGen --official-var ~/VAR
    python benchmarks/side_by_side.py --official-var ~/VAR --device cuda --batch-sizes 1,8,64

The official model code is imported from the user's own checkouts of FoundationVision/LlamaGen
and FoundationVision/VAR (nothing of it ships with ccalign). Each family runs in a process of
its own (the two checkouts both have a top-level ``utils``): the official model is built at the
given size with random weights, saved in its released file format, and ccalign loads that file
through its family interface (``load_with_tokenizer``), so both hold the same weights. On the
CPU the VAR run first checks that both samplers, seeded alike, build the same f_hat bit for bit.

Rows, each timed interleaved (official and ccalign alternate, the first to run alternating by
round), reported as median [min, max] seconds. Each code path is warmed up once, untimed: on the
CPU at batch 1 before the first batch size, on CUDA at every batch size (a CUDA graph each):
- ``codes``: sampling at batch B, guidance-free and with CFG, until the codes. The official
  samplers as their sample scripts call them: LlamaGen's ``generate`` (cfg 1 runs B rows, cfg > 1
  2B rows); VAR's ``autoregressive_infer_cfg`` (always 2B rows; cfg 0 is guidance-free) with its
  VQVAE's final decode taken out. Top-k / top-p as each paper's protocol: none for LlamaGen
  (CCA's protocol), 900 / 0.96 for VAR. CFG scales: 4.0 for LlamaGen, VAR's 1.5 ramp.
- ``decode``: those B images from the codes (official: LlamaGen's ``decode_code``, VAR's
  ``fhat_to_img`` of the f_hat its sampler built; ccalign: the tokenizer's ``decode`` of the codes).
  ``images`` = codes + decode (the medians added).
- ``train``: one CCA step on B images, driven as the official CCA trainers drive theirs (thu-ml/CCA
  ``LlamaGen_finetune.py``, ``VAR_CCA_trainer.py``: policy and reference each on the 2B rows of
  positive and shuffled labels, full logits, log_softmax + gather, AdamW, clipping) against
  ccalign's ``Trainer.train_step``.
Ratios are official / ccalign seconds (> 1: ccalign is faster). On CUDA each row also gives the
peak memory a call allocates above what was resident before it. Random weights: speed does not
depend on them (the output heads are drawn at std 0.02 so that logits are not all equal).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

FAMILIES = ("llamagen", "var")
#: a file each official checkout must hold
CHECKOUT_MARKERS = {"llamagen": "autoregressive/models/gpt.py", "var": "models/var.py"}
LLAMAGEN_CFG = 4.0  # LlamaGen's README scale for GPT-B (ccalign's convention: 1 = guidance-free)
VAR_CFG = 1.5  # VAR's own cfg number (a ramp over the scales), its paper's setting
VAR_TOP_K, VAR_TOP_P = 900, 0.96
CCA = dict(beta=0.02, lam=1.0, uncond_ratio=0.1)
MAX_ROUNDS = 15
SAME_IMAGES_SEED = 11


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--official-llamagen", type=Path, help="a checkout of FoundationVision/LlamaGen")
    p.add_argument("--official-var", type=Path, help="a checkout of FoundationVision/VAR")
    p.add_argument("--llamagen-model", default="GPT-B", help="GPT-B .. GPT-3B")
    p.add_argument("--grid", type=int, default=16, help="LlamaGen tokens per side (16: 256 px)")
    p.add_argument("--var-model", default="VAR-d16", help="VAR-d16 .. VAR-d30")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--batch-sizes", default="1,8,64", help="sampling batch sizes")
    p.add_argument("--var-batch-sizes", help="VAR's own sampling batch sizes (default: the above)")
    p.add_argument("--train-batch", type=int, default=4, help="images per training step")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per row, at least")
    p.add_argument("--min-seconds", type=float, default=20.0,
                   help="more rounds (up to 15) until ccalign's calls of a row add up to this")
    p.add_argument("--skip", default="", help="row kinds to skip, comma-separated: "
                   "codes,decode,train")
    p.add_argument("--json", type=Path, help="also write every row to this file (and the "
                   "table beside it, .md)")
    p.add_argument("--family", choices=FAMILIES, help=argparse.SUPPRESS)  # the child process
    p.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for family, marker in CHECKOUT_MARKERS.items():
        checkout = getattr(args, f"official_{family}")
        if checkout is not None and not (checkout / marker).is_file():
            p.error(f"{checkout} is not a checkout with {marker}: clone the official repository "
                    "there")
    if args.official_llamagen is None and args.official_var is None and args.family is None:
        p.error("give --official-llamagen DIR and/or --official-var DIR (checkouts of "
                "FoundationVision/LlamaGen and FoundationVision/VAR)")
    return args


def batch_sizes(text: str) -> list[int]:
    return [int(b) for b in text.split(",") if b]


# ---- timing -------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_call(fn: Callable[[], object], device: torch.device) -> tuple[float, int | None]:
    """Seconds of one call, and on CUDA the peak bytes it allocated above what was resident."""
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        resident = torch.cuda.memory_allocated(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) - resident if device.type == "cuda" else None
    return seconds, peak


def side_by_side(
    official: Callable[[], object],
    ours: Callable[[], object],
    rounds: int,
    device: torch.device,
    warm_up: tuple[Callable[[], object], Callable[[], object]] | None = None,
    min_seconds: float = 0.0,
) -> dict:
    """Median [min, max] seconds of each, interleaved; the first to run alternates by round.

    Quick rows run more rounds, until ccalign's calls add up to ``min_seconds`` (at most
    ``MAX_ROUNDS``): a median of two 2-second calls says little on a shared machine.

    ``warm_up``: calls of the same code paths run once untimed first (lazy initialisation,
    allocator, kernel choice, CUDA graphs).
    """
    calls = {"official": official, "ccalign": ours}
    for fn in warm_up or ():
        fn()
    seconds = {name: [] for name in calls}
    peaks = {name: 0 for name in calls}
    r = 0
    while r < rounds or (sum(seconds["ccalign"]) < min_seconds and r < MAX_ROUNDS):
        order = list(calls) if r % 2 == 0 else list(reversed(calls))
        for name in order:
            s, peak = timed_call(calls[name], device)
            seconds[name].append(s)
            peaks[name] = max(peaks[name], peak or 0)
        r += 1
    row = {}
    for name, values in seconds.items():
        row[name] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
        if device.type == "cuda":
            row[name]["peak_bytes"] = peaks[name]
    row["ratio"] = row["official"]["median"] / row["ccalign"]["median"]
    return row


# ---- building the pair of models ----------------------------------------------------------


def import_checkout(checkout: Path) -> None:
    """Make a checkout (checked by ``parse_args``) importable."""
    sys.path.insert(0, str(checkout.resolve()))


def random_head(weight: torch.Tensor) -> None:
    """The released inits zero the output head (all logits equal); draw it as trained ones look."""
    with torch.no_grad():
        weight.normal_(std=0.02)


class LlamaGenPair:
    """Official LlamaGen GPT and VQ-16 with random weights; ccalign's loaded from their files."""

    family = "llamagen"

    def __init__(self, args: argparse.Namespace, work: Path, device: torch.device):
        import_checkout(args.official_llamagen)
        from autoregressive.models.generate import generate
        from autoregressive.models.gpt import GPT_models
        from tokenizer.tokenizer_image.vq_model import VQ_models

        from ccalign.models import families
        from ccalign.models.family import ModelSpec

        self.device, self.grid, self._generate = device, args.grid, generate
        torch.manual_seed(0)
        self.official = GPT_models[args.llamagen_model](
            vocab_size=16384, block_size=args.grid**2, num_classes=1000, cls_token_num=1,
            model_type="c2i",
        )
        random_head(self.official.output.weight)
        self.official_vq = VQ_models["VQ-16"](codebook_size=16384, codebook_embed_dim=8)
        torch.save({"model": self.official.state_dict()}, work / "gpt.pt")
        torch.save({"model": self.official_vq.state_dict()}, work / "vq.pt")
        family = families.get(self.family)
        spec = ModelSpec(init=str(work / "gpt.pt"), preset=args.llamagen_model,
                         options={"grid": args.grid}, family=self.family)
        self.model, self.codec = family.load_with_tokenizer(spec, work / "vq.pt")
        self.train_model = copy.deepcopy(self.model).to(device)  # before a sampler freezes it
        for module in (self.official, self.official_vq, self.model, self.codec):
            module.to(device).eval()
        self.sampler = family.sampler(self.model)
        self.seq_len, self.vocab = args.grid**2, 16384

    def official_codes(self, labels: torch.Tensor, guided: bool) -> torch.Tensor:
        with torch.no_grad():
            return self._generate(
                self.official, labels, self.seq_len, cfg_scale=LLAMAGEN_CFG if guided else 1.0,
                temperature=1.0, top_k=0, top_p=1.0, sample_logits=True,
            )

    def ccalign_codes(self, labels: torch.Tensor, guided: bool) -> torch.Tensor:
        return self.sampler.generate(labels, cfg_scale=LLAMAGEN_CFG if guided else 1.0)

    def official_decode(self, codes: torch.Tensor) -> Callable[[], object]:
        shape = [codes.shape[0], 8, self.grid, self.grid]
        return no_grad(lambda: self.official_vq.decode_code(codes, shape))

    def ccalign_decode(self, codes: torch.Tensor) -> Callable[[], object]:
        return lambda: self.codec.decode(codes)

    def official_train_step(self, labels: torch.Tensor, tokens: torch.Tensor) -> Callable:
        """thu-ml/CCA LlamaGen_finetune.py's step: both label sets in one 2B forward per model."""
        for layer in self.official.layers:  # as trained: no KV cache left from sampling
            layer.attention.kv_cache = None
        policy = copy.deepcopy(self.official).train()
        reference = copy.deepcopy(policy).requires_grad_(False)
        optimizer = official_optimizer(policy, self.device)

        def logps(net, cond, z):
            logits, _ = net(cond_idx=cond, idx=z[:, :-1], targets=z)
            return logits.float().log_softmax(-1).gather(2, z[:, :, None]).squeeze(2).sum(-1)

        def step():
            cond, uncond = cca_labels(labels, 1000)
            z = torch.cat([tokens, tokens])
            with autocast(self.device):
                with torch.no_grad():
                    ref = logps(reference, cond, z)
                pol = logps(policy, cond, z)
            official_cca_update(pol, ref, labels.shape[0], uncond, cond, policy, optimizer, 1.0)

        return step


class VarPair:
    """Official VAR and its VQVAE with random weights, and ccalign's loaded from their files."""

    family = "var"

    def __init__(self, args: argparse.Namespace, work: Path, device: torch.device):
        import_checkout(args.official_var)
        if "huggingface_hub" not in sys.modules:
            try:
                import huggingface_hub  # noqa: F401  (VAR's model subclasses its hub mixin)
            except ImportError:  # the mixin adds hub uploads only: a plain base serves here
                sys.modules["huggingface_hub"] = types.SimpleNamespace(PyTorchModelHubMixin=object)
        from models.var import VAR
        from models.vqvae import VQVAE

        from ccalign.models import families
        from ccalign.models.family import ModelSpec

        depth = int(args.var_model.split("-d")[-1])
        self.device = device
        torch.manual_seed(0)
        self.official_vae = VQVAE(vocab_size=4096, z_channels=32, ch=160, test_mode=True,
                                  share_quant_resi=4)
        self.official = VAR(
            vae_local=self.official_vae, num_classes=1000, depth=depth, embed_dim=depth * 64,
            num_heads=depth, drop_path_rate=0.1 * depth / 24, norm_eps=1e-6, cond_drop_rate=0.1,
            attn_l2_norm=True, flash_if_available=True, fused_if_available=True,
        )
        self.official.init_weights(init_adaln=0.5, init_adaln_gamma=1e-5, init_head=0.02)
        # its seeded draws use this generator, made on CUDA whenever CUDA exists
        self.official.rng = torch.Generator(device)
        torch.save(self.official.state_dict(), work / "var.pth")
        torch.save(self.official_vae.state_dict(), work / "vae.pth")
        family = families.get(self.family)
        spec = ModelSpec(init=str(work / "var.pth"), preset=args.var_model, family=self.family)
        self.model, self.codec = family.load_with_tokenizer(spec, work / "vae.pth")
        self.train_model = copy.deepcopy(self.model).to(device)  # before a sampler freezes it
        for module in (self.official, self.official_vae, self.model, self.codec):
            module.to(device).eval()
        self.sampler = family.sampler(self.model)
        self.seq_len, self.vocab = self.model.seq_len, 4096
        self._last_fhat: torch.Tensor | None = None

    def official_codes(
        self, labels: torch.Tensor, guided: bool, seed: int | None = None
    ) -> torch.Tensor:
        """VAR's sampler until f_hat: its final ``fhat_to_img`` is swapped for keeping f_hat."""
        keep = types.SimpleNamespace(fhat_to_img=self._keep_fhat)
        real, self.official.vae_proxy = self.official.vae_proxy, (keep,)
        try:
            with torch.no_grad():
                self.official.autoregressive_infer_cfg(
                    labels.shape[0], labels, g_seed=seed, cfg=VAR_CFG if guided else 0.0,
                    top_k=VAR_TOP_K, top_p=VAR_TOP_P,
                )
        finally:
            self.official.vae_proxy = real
        return self._last_fhat

    def same_images(self) -> bool:
        """Whether both samplers, seeded alike, build the same f_hat bit for bit (2 images with
        CFG; float32 on both sides, so the CPU only: ccalign samples in bf16 on CUDA)."""
        labels = torch.tensor([3, 207], device=self.device)
        official = self.official_codes(labels, True, seed=SAME_IMAGES_SEED)
        generator = torch.Generator(self.device).manual_seed(SAME_IMAGES_SEED)
        codes = self.sampler.generate(labels, official_cfg=VAR_CFG, top_k=VAR_TOP_K,
                                      top_p=VAR_TOP_P, generator=generator)
        return torch.equal(official, self.model.quantizer.codes_to_fhat(codes))

    def _keep_fhat(self, f_hat: torch.Tensor) -> torch.Tensor:
        """Keep a copy: VAR's sampler maps what ``fhat_to_img`` returns to [0, 1] in place."""
        self._last_fhat = f_hat.clone()
        return f_hat

    def ccalign_codes(self, labels: torch.Tensor, guided: bool) -> torch.Tensor:
        return self.sampler.generate(labels, official_cfg=VAR_CFG if guided else 0.0,
                                     top_k=VAR_TOP_K, top_p=VAR_TOP_P)

    def official_decode(self, f_hat: torch.Tensor) -> Callable[[], object]:
        return no_grad(lambda: self.official_vae.fhat_to_img(f_hat).add_(1).mul_(0.5))

    def ccalign_decode(self, codes: torch.Tensor) -> Callable[[], object]:
        return lambda: self.codec.decode(codes)

    def official_train_step(self, labels: torch.Tensor, tokens: torch.Tensor) -> Callable:
        """thu-ml/CCA VAR_CCA_trainer.py's step, with the four cross-entropies it logs."""
        policy = copy.deepcopy(self.official).train()
        reference = copy.deepcopy(policy).requires_grad_(False)
        optimizer = official_optimizer(policy, self.device)
        quant = self.official_vae.quantize
        starts = [0]
        for pn in self.official.patch_nums:
            starts.append(starts[-1] + pn * pn)
        scales = [tokens[:, a:b] for a, b in zip(starts, starts[1:], strict=False)]

        def logps(logits, z):
            return logits.float().log_softmax(-1).gather(2, z[:, :, None]).squeeze(2).sum(-1)

        def step():
            x = quant.idxBl_to_var_input(scales)
            cond, uncond = cca_labels(labels, 1000)
            z = torch.cat([tokens, tokens])
            x2 = torch.cat([x, x])
            with autocast(self.device):
                all_logits = policy(cond, x2)
                with torch.no_grad():
                    ref_logits = reference(cond, x2)
            pol, ref = logps(all_logits, z), logps(ref_logits, z)
            with torch.no_grad():  # the trainer's logged cross-entropies, every step
                for logits in (*all_logits.chunk(2), *ref_logits.chunk(2)):
                    F.cross_entropy(logits.reshape(-1, self.vocab), tokens.reshape(-1))
            official_cca_update(pol, ref, labels.shape[0], uncond, cond, policy, optimizer, 2.0)

        return step


def no_grad(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` run under ``torch.no_grad`` (as the official sample scripts run their decoders)."""
    return torch.no_grad()(fn)


PAIRS = {"llamagen": LlamaGenPair, "var": VarPair}


# ---- the official CCA step's pieces -------------------------------------------------------


def autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def official_optimizer(model: torch.nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """AdamW as the official trainers make it (decay on >= 2-D weights, fused on CUDA)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.05},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=1e-5, betas=(0.9, 0.95), fused=device.type == "cuda")


def cca_labels(labels: torch.Tensor, null: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positive and rolled labels, a tenth of the rows made unconditional (the official way)."""
    shuffled = torch.roll(labels, shifts=-1, dims=0)
    uncond = torch.rand(labels.shape[0], device=labels.device) < CCA["uncond_ratio"]
    labels, shuffled = torch.where(uncond, null, labels), torch.where(uncond, null, shuffled)
    return torch.cat([labels, shuffled]), uncond | (labels == shuffled)


def official_cca_update(pol, ref, batch, neg_is_pos, cond, policy, optimizer, clip) -> None:
    """The official CCA loss (unconditional rows as positives), backward, clip, AdamW."""
    gap, neg_gap = (pol - ref).split(batch)
    weight = torch.where(neg_is_pos, 1.0, CCA["lam"])
    sign = neg_is_pos.float() * 2 - 1
    loss = -F.logsigmoid(gap * CCA["beta"]).mean() - (
        weight * F.logsigmoid(sign * neg_gap * CCA["beta"])).mean()
    (loss / max(CCA["lam"], 1.0)).backward()
    torch.nn.utils.clip_grad_norm_(policy.parameters(), clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


class RandomCodes:
    """A data set of one repeated batch (the trainer sizes its plan from it)."""

    def __init__(self, tokens: torch.Tensor, labels: torch.Tensor):
        self.tokens, self.labels = tokens.cpu(), labels.cpu()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return self.tokens[i], self.labels[i]


def ccalign_train_step(model, labels, tokens, device: torch.device, clip: float) -> Callable:
    """``Trainer.train_step`` on one micro-batch of the same images and labels."""
    from ccalign.train import TrainConfig, Trainer

    config = TrainConfig.from_dict({
        "method": {"name": "cca", **CCA},
        "optim": {"lr": 1e-5, "grad_clip": clip},
        "train": {"global_batch": len(labels), "micro_batch": len(labels), "steps": 1,
                  "device": device.type, "precision": "auto", "progress": False},
        "checkpoint": {"out": str(Path(tempfile.gettempdir()) / "ccalign-side-by-side")},
    })
    trainer = Trainer(config, model, RandomCodes(tokens, labels))
    steps = iter(range(1, 10**9))
    return lambda: trainer.train_step([(tokens, labels)], next(steps))


# ---- one family ---------------------------------------------------------------------------


def run_family(args: argparse.Namespace) -> list[dict]:
    """Every row of one family, in this process."""
    device = torch.device(args.device)
    skip = set(args.skip.split(","))
    sizes = batch_sizes(args.var_batch_sizes if args.family == "var" and args.var_batch_sizes
                        else args.batch_sizes)
    rows, outputs = [], {}
    with tempfile.TemporaryDirectory() as work:
        pair = PAIRS[args.family](args, Path(work), device)
        same_images = getattr(pair, "same_images", None)
        if same_images is not None and device.type == "cpu":
            verdict = "yes" if same_images() else "NO: the timings compare different samplers"
            print(f"  {args.family}: same images as the official sampler at one seed: {verdict}",
                  flush=True)
        for index, batch in enumerate(sizes):
            labels = torch.arange(batch, device=device) * 37 % 1000
            # CUDA: warm up at every batch size (a CUDA graph each); the CPU: once, at batch 1
            warm = labels if device.type == "cuda" else labels[:1] if index == 0 else None
            for guided in (False, True):
                what = dict(family=args.family, batch=batch, guidance="cfg" if guided else "free")
                official = kept(outputs, "official", partial(pair.official_codes, labels, guided))
                ours = kept(outputs, "ccalign", partial(pair.ccalign_codes, labels, guided))
                if "codes" not in skip:
                    warm_up = None if warm is None else (
                        partial(pair.official_codes, warm, guided),
                        partial(pair.ccalign_codes, warm, guided),
                    )
                    row = side_by_side(
                        official, ours, args.rounds, device, warm_up, args.min_seconds
                    )
                    rows.append(report({**what, "kind": "codes", **row}))
                if "decode" not in skip and not guided:  # the decode does not depend on it
                    if "codes" in skip:
                        official(), ours()
                    decodes = (pair.official_decode(outputs["official"]),
                               pair.ccalign_decode(outputs["ccalign"]))
                    row = side_by_side(*decodes, args.rounds, device,
                                       None if warm is None else decodes, args.min_seconds)
                    rows.append(report({**what, "guidance": "any", "kind": "decode", **row}))
        if "train" not in skip:
            rows.append(report(train_row(args, pair, device)))
    return rows


def kept(outputs: dict, name: str, fn: Callable[[], object]) -> Callable[[], None]:
    """``fn``, its last result kept in ``outputs[name]`` (the decode rows decode those codes)."""

    def call() -> None:
        outputs[name] = fn()

    return call


def train_row(args: argparse.Namespace, pair, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(0)
    b = args.train_batch
    tokens = torch.randint(0, pair.vocab, (b, pair.seq_len), generator=g).to(device)
    labels = torch.randint(0, 1000, (b,), generator=g).to(device)
    clip = 2.0 if pair.family == "var" else 1.0
    ours = ccalign_train_step(pair.train_model.train(), labels, tokens, device, clip)
    official = pair.official_train_step(labels, tokens)
    row = side_by_side(official, ours, args.rounds, device, (official, ours), args.min_seconds)
    return dict(family=pair.family, batch=b, guidance="-", kind="train", **row)


def report(row: dict) -> dict:
    o, c = row["official"], row["ccalign"]
    print(f"  {row['family']:8} {row['kind']:6} B={row['batch']:<3} {row['guidance']:4} "
          f"official {o['median']:8.3f} s [{o['min']:.3f}, {o['max']:.3f}]  "
          f"ccalign {c['median']:8.3f} s [{c['min']:.3f}, {c['max']:.3f}]  "
          f"x{row['ratio']:.2f}", flush=True)
    return row


# ---- the whole run ------------------------------------------------------------------------


def with_images_rows(rows: list[dict]) -> list[dict]:
    """Add ``images`` rows (codes + decode, medians added) after each family's rows."""
    decode = {(r["family"], r["batch"]): r for r in rows if r["kind"] == "decode"}
    out = list(rows)
    for r in rows:
        d = decode.get((r["family"], r["batch"]))
        if r["kind"] != "codes" or d is None:
            continue
        sums = {k: r[k]["median"] + d[k]["median"] for k in ("official", "ccalign")}
        out.append(dict(family=r["family"], batch=r["batch"], guidance=r["guidance"],
                        kind="images", official={"median": sums["official"]},
                        ccalign={"median": sums["ccalign"]},
                        ratio=sums["official"] / sums["ccalign"]))
    return out


def free_vs_official_guided(rows: list[dict]) -> list[dict]:
    """ccalign guidance-free against the official guided run, per family and batch."""
    out = []
    for kind in ("codes", "images"):
        index = {(r["family"], r["batch"], r["guidance"]): r for r in rows if r["kind"] == kind}
        for (family, batch, guidance), r in index.items():
            guided = index.get((family, batch, "cfg"))
            if guidance == "free" and guided is not None:
                ratio = guided["official"]["median"] / r["ccalign"]["median"]
                out.append(dict(family=family, batch=batch, kind=kind, ratio=ratio))
    return out


def spread(timing: dict) -> str:
    return f" [{timing['min']:.3g}, {timing['max']:.3g}]" if "min" in timing else ""


def markdown(rows: list[dict], saving: list[dict], machine: str) -> str:
    lines = [f"Machine: {machine}", "",
             "| family | row | batch | guidance | official s | ccalign s | official / ccalign |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        o, c = r["official"], r["ccalign"]
        lines.append(f"| {r['family']} | {r['kind']} | {r['batch']} | {r['guidance']} | "
                     f"{o['median']:.3g}{spread(o)} | {c['median']:.3g}{spread(c)} | "
                     f"{r['ratio']:.2f}x |")
    lines += ["", "| family | row | batch | official guided / ccalign guidance-free |",
              "|---|---|---|---|"]
    lines += [f"| {s['family']} | {s['kind']} | {s['batch']} | {s['ratio']:.2f}x |" for s in saving]
    return "\n".join(lines)


def machine_name(device: torch.device) -> str:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return f"{p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}"
    return f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def cpu_name() -> str:
    """The CPU's model name (Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} CPU"


def child_argv(argv: list[str], family: str, out: Path) -> list[str]:
    """This script again on the parent's arguments, for one family, its rows to ``out``."""
    return [sys.executable, __file__, *argv, "--family", family, "--child-out", str(out)]


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.family is not None:  # a child: one family, rows to a file
        args.child_out.write_text(json.dumps(run_family(args)))
        return
    started = time.perf_counter()
    rows = []
    wanted = [f for f in FAMILIES if getattr(args, f"official_{f}") is not None]
    with tempfile.TemporaryDirectory() as tmp:
        for family in wanted:
            print(f"{family}:", flush=True)
            out = Path(tmp) / f"{family}.json"
            subprocess.run(child_argv(argv, family, out), check=True)
            rows += json.loads(out.read_text())
    rows = with_images_rows(rows)
    saving = free_vs_official_guided(rows)
    machine = machine_name(torch.device(args.device))
    print()
    print(markdown(rows, saving, machine))
    print(f"\n{time.perf_counter() - started:.0f} s in all")
    if args.json is not None:
        args.json.with_suffix(".md").write_text(markdown(rows, saving, machine) + "\n")
        args.json.write_text(json.dumps({"machine": machine, "args": vars(args) | {
            k: str(v) for k, v in vars(args).items() if isinstance(v, Path)},
            "rows": rows, "guidance_free_vs_official_guided": saving}, indent=2))


if __name__ == "__main__":
    main()
