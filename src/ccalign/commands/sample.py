"""`ccalign sample`: draw images from a LlamaGen or VAR checkpoint into tokens, PNGs and an ADM
.npz.

Runs on one process or under ``torchrun --nproc-per-node G``; a killed run resumes from the
shards already written when started again with the same arguments.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from contextlib import contextmanager

HELP = "sample images from a checkpoint (tokens, PNGs, ADM .npz); resumable, multi-GPU via torchrun"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "checkpoint",
        help="model weights: ccalign .safetensors, official .pt, a registry name (`ccalign "
        "models`, e.g. cca-llamagen-L-384: preset, grid and tokenizer come with it) or "
        "hf://owner/repo/file",
    )
    parser.add_argument("--out", required=True, help="output folder (resumes if it holds a run)")
    parser.add_argument(
        "--model", help="preset of an official checkpoint, e.g. GPT-L or VAR-d16 (var_d16.pth)"
    )
    parser.add_argument(
        "--grid", type=int, help="tokens per side of an official checkpoint (24 at 384 px)"
    )
    what = parser.add_argument_group("what to sample")
    what.add_argument("--classes", help="class indices, e.g. '1,5,207' or '0-9'")
    what.add_argument("--per-class", type=int, help="images per class (of --classes, default all)")
    what.add_argument("--num-samples", type=int, help="total images, cycling through the classes")
    what.add_argument(
        "--labels",
        choices=("balanced", "random"),
        default="balanced",
        help="balanced (default): equal counts per class; random: each label uniform over the "
        "classes, drawn from --seed, as LlamaGen's sample_c2i_ddp (the paper's FIDs); needs "
        "--num-samples",
    )
    how = parser.add_argument_group("sampling")
    how.add_argument("--batch-size", type=int, default=64, help="images per batch (= per shard)")
    how.add_argument("--seed", type=int, default=0)
    how.add_argument(
        "--cfg-scale",
        type=float,
        default=1.0,
        help="logits = uncond + scale * (cond - uncond): 1.0 = guidance-free (default), > 1 "
        "guides, 0 = the unconditional model, between 0 and 1 interpolates (LlamaGen's sampler "
        "treats any scale <= 1 as guidance-free); must be finite and >= 0",
    )
    how.add_argument(
        "--var-cfg",
        type=float,
        help="VAR models: VAR's own cfg number c instead of --cfg-scale, a ramp over the scales "
        "from 1 (guidance-free) to 1 + c, as VAR's sampler (the paper's VAR setting: 1.5 with "
        "--top-k 900 --top-p 0.96); 0 = guidance-free",
    )
    how.add_argument("--cfg-interval", type=int, default=-1, help="guide tokens <= this + 1 only")
    how.add_argument(
        "--gft-beta",
        type=float,
        help="GFT checkpoints only: the beta input, 1 / s for a CFG-like scale s (the released "
        "GFT models: 0.66 for L, 0.7 for 3B), one pass per token; 1.0 = the plain conditional",
    )
    how.add_argument("--temperature", type=float, default=1.0)
    how.add_argument("--top-k", type=int, default=0, help="0 = off")
    how.add_argument("--top-p", type=float, default=1.0, help="1.0 = off")
    images = parser.add_argument_group("images")
    images.add_argument(
        "--tokenizer",
        help="tokenizer file, registry name or hf:// URI: decode to PNGs and samples.npz "
        "(default for a registry checkpoint: its tokenizer; an official VAR checkpoint needs its "
        "VQVAE, vae_ch160v4096z32.pth, to sample)",
    )
    images.add_argument("--resize", type=int, help="resize decoded images (bicubic), e.g. 256")
    images.add_argument("--no-png", action="store_true", help="write samples.npz but no PNGs")
    run = parser.add_argument_group("hardware")
    run.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    run.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    run.add_argument("--no-cuda-graph", action="store_true", help="run the decode step eagerly")
    run.add_argument("--quiet", action="store_true", help="no progress bar")


def parse_classes(text: str) -> list[int]:
    """'1,5,7-9' -> [1, 5, 7, 8, 9]; empty lists and reversed ranges ('3-1') are errors."""
    classes: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        classes.extend(_class_range(part, text))
    if not classes:
        raise ValueError(f"--classes {text!r}: no class given; expected e.g. '1,5,207' or '0-9'")
    return classes


def _class_range(part: str, text: str) -> range:
    """One comma-separated item of --classes: 'k' or 'low-high' (inclusive)."""
    try:
        low, _, high = part.partition("-") if "-" in part[1:] else (part, "", part)
        first, last = int(low), int(high)
    except ValueError:
        raise ValueError(f"--classes {text!r}: expected indices like '1,5,207' or '0-9'") from None
    if first > last:
        raise ValueError(
            f"--classes {text!r}: the range {part!r} is empty; write low-high with low <= high"
        )
    return range(first, last + 1)


def check_args(args: argparse.Namespace) -> None:
    """Reject unusable options before any model is loaded, naming the option."""
    from ccalign.sample.engine import check_gft_beta
    from ccalign.sample.filtering import check_sampling_args
    from ccalign.sample.guidance import check_scale

    if args.resize is not None and args.resize < 1:
        raise ValueError(f"--resize {args.resize}: give the image side in pixels (>= 1), e.g. 256")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size {args.batch_size}: must be >= 1")
    if args.seed < 0:
        raise ValueError(f"--seed {args.seed}: must be >= 0")
    check_scale(args.cfg_scale)
    check_gft_beta(args.gft_beta)
    if args.var_cfg is not None and args.cfg_scale != 1.0:
        raise ValueError("give either --cfg-scale (ccalign's scale) or --var-cfg (VAR's), not both")
    check_sampling_args(args.temperature, args.top_k, args.top_p)


def check_recorded_architecture(path: str, name: str | None, grid: int | None) -> None:
    """A --model or --grid that contradicts the architecture a ccalign file records is an error
    (the file's config would silently win, or the grid be overridden)."""
    from ccalign.models import llamagen

    recorded = llamagen.config_from_file(path)
    if recorded is None:
        return
    if grid is not None and grid != recorded.grid:
        raise ValueError(
            f"--grid {grid} contradicts {path}, which records grid {recorded.grid}; leave "
            "--grid out (ccalign files carry their architecture)"
        )
    if name is None:
        return
    if name not in llamagen.PRESETS:
        raise ValueError(f"--model {name!r}: choose one of {sorted(llamagen.PRESETS)}")
    preset = llamagen.PRESETS[name]
    found = {key: getattr(recorded, key) for key in preset}
    if found != preset:
        raise ValueError(
            f"--model {name} ({_sizes(preset)}) contradicts {path}, which records "
            f"{_sizes(found)}; leave --model out (ccalign files carry their architecture)"
        )


def _sizes(sizes: dict) -> str:
    return ", ".join(f"{key} {value}" for key, value in sorted(sizes.items()))


def run(args: argparse.Namespace) -> int:
    import torch

    from ccalign import hub
    from ccalign.sample.runner import RunConfig, plan_labels, run_sampling

    check_args(args)
    classes = parse_classes(args.classes) if args.classes is not None else None
    release = hub.find(args.checkpoint)
    if release is not None:  # a registry name supplies what the command line leaves out
        args.model = args.model or release.preset
        if release.family != "var":  # VAR's scales come with its preset
            args.grid = args.grid or release.grid
        args.tokenizer = args.tokenizer or release.tokenizer
    args.checkpoint = str(hub.resolve(args.checkpoint, kind="model"))
    family = _setup_var if _is_var(args) else _setup_llamagen
    with _distributed(args.device) as (rank, world_size, device, barrier):
        sampler, tokenizer, sampling = family(args, device)
        model = sampler.model
        labels = plan_labels(
            model.num_classes,
            classes=classes,
            per_class=args.per_class,
            num_samples=args.num_samples,
            mode=args.labels,
            seed=args.seed,
        )
        config = RunConfig(
            labels=labels,
            batch_size=args.batch_size,
            seed=args.seed,
            sampling=sampling,
            resize=args.resize,
            decode=tokenizer is not None,
        )
        with torch.no_grad():
            outputs = run_sampling(
                sampler,
                config,
                args.out,
                tokenizer=tokenizer,
                write_png=not args.no_png,
                rank=rank,
                world_size=world_size,
                barrier=barrier,
                progress=not args.quiet,
            )
    if outputs is not None:
        print(f"{len(labels)} images ({outputs.shards_sampled} batches sampled now)")
        for name in ("tokens", "samples", "images"):
            path = getattr(outputs, name)
            if path is not None:
                print(f"{name}: {path}")
    return 0


def _setup_llamagen(args: argparse.Namespace, device) -> tuple:
    """(sampler, tokenizer or None, sampling settings) for a LlamaGen checkpoint."""
    from ccalign.models import llamagen
    from ccalign.sample.engine import Sampler, check_gft_beta

    if args.var_cfg is not None:
        raise ValueError("--var-cfg is VAR's guidance number; for LlamaGen give --cfg-scale")
    check_recorded_architecture(args.checkpoint, args.model, args.grid)
    model = llamagen.load(args.checkpoint, args.model, grid=args.grid)
    check_gft_beta(args.gft_beta, model)
    tokenizer = (
        _load_tokenizer(args.tokenizer, device, model.config.grid) if args.tokenizer else None
    )
    sampling = dict(
        cfg_scale=args.cfg_scale,
        cfg_interval=args.cfg_interval,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
    )
    if args.gft_beta is not None:  # only then: runs without it keep their recorded settings
        sampling["gft_beta"] = args.gft_beta
    use_graph = False if args.no_cuda_graph or device.type != "cuda" else None
    sampler = Sampler(
        model, device=device, cuda_graph=use_graph, compile=args.compile, inplace=True
    )
    return sampler, tokenizer, sampling


def _is_var(args: argparse.Namespace) -> bool:
    """A ccalign VAR file, or an official one named by a VAR preset (--model VAR-d16)."""
    from ccalign.models import var

    named = (args.model or "").startswith("VAR-")
    return named or var.config_from_file(args.checkpoint) is not None


def _setup_var(args: argparse.Namespace, device) -> tuple:
    """(sampler, tokenizer or None, sampling settings) for a VAR checkpoint.

    The VQVAE (--tokenizer) is loaded once and gives an official checkpoint its quantiser.
    """
    from ccalign.models import var
    from ccalign.sample.var import VarSampler
    from ccalign.tokenizers import var_vq
    from ccalign.tokenizers.files import resolve_file

    unsupported = {
        "--grid": args.grid is not None, "--temperature": args.temperature != 1.0,
        "--cfg-interval": args.cfg_interval != -1, "--compile": args.compile,
        "--gft-beta": args.gft_beta is not None,
    }
    if any(unsupported.values()):
        given = ", ".join(name for name, used in unsupported.items() if used)
        raise ValueError(f"{given}: not an option of VAR sampling (VAR's sampler has none)")
    recorded = var.config_from_file(args.checkpoint)
    if recorded is None and args.tokenizer is None:
        raise ValueError(
            f"{args.checkpoint} is an official VAR file: give --tokenizer with its VQVAE "
            "(vae_ch160v4096z32.pth), whose quantiser builds every scale's input"
        )
    if args.model is not None and args.model not in var.PRESETS:
        raise ValueError(f"--model {args.model!r}: choose one of {sorted(var.PRESETS)}")
    if recorded is not None and args.model is not None:
        preset = var.PRESETS[args.model]
        found = {key: getattr(recorded, key) for key in preset}
        if found != preset:
            raise ValueError(
                f"--model {args.model} contradicts {args.checkpoint}, which records depth "
                f"{recorded.depth}, width {recorded.dim}; leave --model out (ccalign files carry "
                "their architecture)"
            )
    config = recorded or var.VARConfig(**var.PRESETS[args.model])
    tokenizer = None
    if args.tokenizer:  # read at the model's scales (official VQVAE files do not record them)
        tokenizer = var_vq.load(resolve_file(args.tokenizer), patch_nums=config.patch_nums)
    model = var.load(args.checkpoint, None if recorded else args.model, vae=tokenizer)
    if tokenizer is not None:
        tokenizer.to(device).eval()
    sampling = dict(cfg_scale=args.cfg_scale, top_k=args.top_k, top_p=args.top_p)
    if args.var_cfg is not None:
        sampling["official_cfg"] = args.var_cfg
    return VarSampler(model, device=device, inplace=True), tokenizer, sampling


def _load_tokenizer(path: str, device, grid: int):
    """The ``--tokenizer``, sized for the model's ``grid`` (VQ-16 at grid 24: 384 px)."""
    import torch

    from ccalign import tokenizers

    tokenizer = tokenizers.load(path)
    if tokenizer.grid != grid:  # convolutional VQs decode any grid: set the image size to match
        downsample = tokenizer.image_size // tokenizer.grid
        tokenizer = tokenizers.load(path, image_size=grid * downsample)
    if isinstance(tokenizer, torch.nn.Module):
        tokenizer.to(device).eval()
    return tokenizer


@contextmanager
def _distributed(device_arg: str | None) -> Iterator[tuple]:
    """(rank, world size, device, barrier): torchrun's when launched by it, else one process."""
    import torch
    import torch.distributed as dist

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    want_cuda = device_arg == "cuda" or (device_arg is None and torch.cuda.is_available())
    if device_arg not in (None, "cuda", "cpu") and not device_arg.startswith("cuda:"):
        raise ValueError(f"--device {device_arg!r}: use cuda, cuda:N or cpu")
    if want_cuda and not torch.cuda.is_available():
        raise ValueError("--device cuda but no CUDA device is visible; use --device cpu")
    if world_size == 1:
        device = torch.device(device_arg or ("cuda" if want_cuda else "cpu"))
        yield 0, 1, device, lambda: None
        return
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if want_cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if want_cuda else torch.device("cpu")
    dist.init_process_group("nccl" if want_cuda else "gloo")
    try:
        yield dist.get_rank(), world_size, device, dist.barrier
    finally:
        dist.destroy_process_group()
