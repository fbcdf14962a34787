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

from ccalign.errors import shorten

HELP = "sample images from a checkpoint (tokens, PNGs, ADM .npz); resumable, multi-GPU via torchrun"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ccalign.devices import device_flag
    from ccalign.io import output_folder
    from ccalign.sample.runner import MAX_SAMPLES
    from ccalign.settings import MAX_SEED, number

    parser.add_argument(
        "checkpoint",
        help="model weights: ccalign .safetensors, official .pt, a registry name (`ccalign "
        "models`, e.g. cca-llamagen-L-384: preset, grid and tokenizer come with it) or "
        "hf://owner/repo/file",
    )
    parser.add_argument(
        "--out", type=output_folder, required=True, help="output folder (resumes if it holds a run)"
    )
    parser.add_argument(
        "--model", help="preset of an official checkpoint, e.g. GPT-L or VAR-d16 (var_d16.pth)"
    )
    what = parser.add_argument_group("what to sample")
    what.add_argument("--classes", help="class indices, e.g. '1,5,207' or '0-9'")
    what.add_argument(
        "--per-class",
        type=number(int, ge=1, le=MAX_SAMPLES),
        help="images per class (of --classes, default all)",
    )
    what.add_argument(
        "--num-samples",
        type=number(int, ge=1, le=MAX_SAMPLES),
        help="total images, cycling through the classes",
    )
    what.add_argument(
        "--labels",
        choices=("balanced", "random"),
        default="balanced",
        help="balanced (default): equal counts per class; random: each label uniform over the "
        "classes, drawn from --seed, as LlamaGen's sample_c2i_ddp (the paper's FIDs); needs "
        "--num-samples",
    )
    how = parser.add_argument_group("sampling")
    how.add_argument(
        "--batch-size",
        type=number(int, ge=1, le=65536),
        default=64,
        help="images per batch (= per shard)",
    )
    how.add_argument("--seed", type=number(int, ge=0, le=MAX_SEED), default=0)
    how.add_argument(
        "--cfg-scale",
        type=number(float, ge=0, le=1000),
        default=1.0,
        help="logits = uncond + scale * (cond - uncond): 1.0 = guidance-free (default), > 1 "
        "guides, 0 = the unconditional model, between 0 and 1 interpolates (LlamaGen's sampler "
        "treats any scale <= 1 as guidance-free); at most 1000",
    )
    how.add_argument("--top-k", type=number(int, ge=0, le=2**24), default=0, help="0 = off")
    how.add_argument("--top-p", type=number(float, gt=0, le=1), default=1.0, help="1.0 = off")
    images = parser.add_argument_group("images")
    images.add_argument(
        "--tokenizer",
        help="tokenizer file, registry name or hf:// URI: decode to PNGs and samples.npz "
        "(default for a registry checkpoint: its tokenizer; an official VAR checkpoint needs its "
        "VQVAE, vae_ch160v4096z32.pth, to sample)",
    )
    images.add_argument(
        "--resize",
        type=number(int, ge=1, le=16384),
        help="resize decoded images (bicubic), e.g. 256",
    )
    images.add_argument("--no-png", action="store_true", help="write samples.npz but no PNGs")
    run = parser.add_argument_group("hardware")
    run.add_argument(
        "--device", type=device_flag, help="cuda or cpu (default: cuda when available)"
    )
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    add_family_options(parser.add_argument_group("options of one model family"))


def add_family_options(group) -> None:
    """Every registered family's own sampling options (each family refuses the others')."""
    from ccalign.models import families

    seen: set[str] = set()
    for family in families.all_families():
        for option in family.sampling_options:
            if option.flags[0] not in seen:
                seen.add(option.flags[0])
                group.add_argument(*option.flags, **option.argparse)


def family_model_options(args: argparse.Namespace) -> dict:
    """The model options given on the command line (the flags that families read into their
    specs: LlamaGen's --grid), None where not given."""
    from ccalign.models import families

    return {
        option.dest: getattr(args, option.dest)
        for family in families.all_families()
        for option in family.sampling_options
        if option.dest in family.options
    }


def check_family_options(family, args: argparse.Namespace) -> None:
    """Refuse an option of another family that was given, naming it."""
    from ccalign.models import families

    own = {option.dest for option in family.sampling_options}
    for other in families.all_families():
        for option in other.sampling_options:
            if option.dest not in own and option.given(args):
                raise ValueError(
                    f"{option.flags[0]}: not an option of {family.title} sampling "
                    f"({family.title}'s sampler has none)"
                )


#: the most classes --classes may list (ImageNet has 1000); larger lists are typos
MAX_CLASSES = 100_000


def parse_classes(text: str) -> list[int]:
    """'1,5,7-9' -> [1, 5, 7, 8, 9]; empty lists, reversed ranges ('3-1') and lists of more than
    ``MAX_CLASSES`` classes are errors (checked before anything is built)."""
    classes: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        span = _class_range(part, text)
        if len(classes) + len(span) > MAX_CLASSES:
            raise ValueError(
                f"--classes {shorten(text)!r} lists more than {MAX_CLASSES:,} classes; give the "
                "model's class indices (e.g. '0-999' for ImageNet)"
            )
        classes.extend(span)
    if not classes:
        raise ValueError(
            f"--classes {shorten(text)!r}: no class given; expected e.g. '1,5,207' or '0-9'"
        )
    return classes


def _class_range(part: str, text: str) -> range:
    """One comma-separated item of --classes: 'k' or 'low-high' (inclusive)."""
    try:
        low, _, high = part.partition("-") if "-" in part[1:] else (part, "", part)
        first, last = int(low), int(high)
    except ValueError:
        raise ValueError(
            f"--classes {shorten(text)!r}: expected indices like '1,5,207' or '0-9'"
        ) from None
    if first > last:
        raise ValueError(
            f"--classes {shorten(text)!r}: the range {shorten(part)!r} is empty; write low-high "
            "with low <= high"
        )
    return range(first, last + 1)


def check_recorded_architecture(family, path, preset: str | None, options: dict) -> None:
    """A --model or a family option (--grid) that contradicts the architecture a ccalign file
    records is an error (the file's config would silently win)."""
    recorded = family.config_from_file(path)
    if recorded is None:
        return
    for key, value in options.items():
        if value is not None and value != getattr(recorded, key, value):
            raise ValueError(
                f"--{key} {value} contradicts {path}, which records {key} "
                f"{getattr(recorded, key)}; leave --{key} out (ccalign files carry their "
                "architecture)"
            )
    if preset is None:
        return
    if preset not in family.presets:
        raise ValueError(f"--model {preset!r}: choose one of {sorted(family.presets)}")
    sizes = family.presets[preset]
    found = {key: getattr(recorded, key) for key in sizes}
    if found != dict(sizes):
        raise ValueError(
            f"--model {preset} ({_sizes(sizes)}) contradicts {path}, which records "
            f"{_sizes(found)}; leave --model out (ccalign files carry their architecture)"
        )


def _sizes(sizes: dict) -> str:
    return ", ".join(f"{key} {value}" for key, value in sorted(sizes.items()))


def model_spec(args: argparse.Namespace, family_options: dict):
    """The spec of the checkpoint argument, its family, and the tokenizer to use (the
    registry's for a registry name unless --tokenizer says)."""
    from ccalign import hub
    from ccalign.models import families
    from ccalign.models.family import ModelSpec

    spec = ModelSpec(init=args.checkpoint, preset=args.model, options=family_options)
    family = families.identify(spec)
    release = hub.find(args.checkpoint)
    tokenizer = args.tokenizer or (release.tokenizer if release is not None else None)
    return spec, family, tokenizer


def load_checkpoint(args: argparse.Namespace, family_options: dict):
    """(family, model, tokenizer or None) of the checkpoint, checked against the options.

    The tokenizer is loaded first: some families build their model with it (VAR's quantiser).
    """
    from ccalign import hub

    spec, family, tokenizer_source = model_spec(args, family_options)
    path = hub.resolve(args.checkpoint, kind="model")
    given = {key: value for key, value in family_options.items() if key in family.options}
    check_recorded_architecture(family, path, args.model, given)
    model, tokenizer = family.load_with_tokenizer(spec, tokenizer_source)
    return family, model, tokenizer


def run(args: argparse.Namespace) -> int:
    import torch

    from ccalign.sample.runner import RunConfig, plan_labels, run_sampling

    classes = parse_classes(args.classes) if args.classes is not None else None
    options = family_model_options(args)
    _, family, _ = model_spec(args, options)
    check_family_options(family, args)
    sampling = family.sampling_settings(args)
    family.check_sampling(None, sampling)
    with _distributed(args.device) as (rank, world_size, device, barrier):
        family, model, tokenizer = load_checkpoint(args, options)
        family.check_sampling(model, sampling)
        if isinstance(tokenizer, torch.nn.Module):
            tokenizer.to(device).eval()
        sampler = family.sampler(model, device=device, inplace=True, **family.sampler_options(args))
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


@contextmanager
def _distributed(device_arg: str | None) -> Iterator[tuple]:
    """(rank, world size, device, barrier): torchrun's when launched by it, else one process."""
    import torch
    import torch.distributed as dist

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    from ccalign.devices import pick_device

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_arg, local_rank)
    if world_size == 1:
        yield 0, 1, device, lambda: None
        return
    want_cuda = device.type == "cuda"
    if want_cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if want_cuda else "gloo")
    try:
        yield dist.get_rank(), world_size, device, dist.barrier
    finally:
        dist.destroy_process_group()
