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
from pathlib import Path

from ccalign.errors import shorten

HELP = "sample images from a checkpoint (tokens, PNGs, ADM .npz); resumable, multi-GPU via torchrun"


#: the weights and autocast dtypes ``ccalign sample`` takes, by name
DTYPES = ("float32", "bfloat16", "float16")
#: what a protocol-governed flag means when neither the command line nor a protocol sets it
DEFAULTS = {"labels": "balanced", "cfg_scale": 1.0, "top_k": 0, "top_p": 1.0,
            "weights_dtype": None, "autocast": "off", "tf32": None, "uint8": "round"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ccalign import hub
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
        help="balanced (default): equal counts per class; random: each label uniform over the "
        "classes, drawn from --seed, as LlamaGen's sample_c2i_ddp (the paper's FIDs); needs "
        "--num-samples",
    )
    what.add_argument(
        "--caption-features",
        help="text-to-image models: a .safetensors of caption features (features (N, L, C), "
        "mask (N, L) bool, left-padded; ccalign encode-captions writes one): one image per "
        "caption, or --num-samples cycling through them",
    )
    what.add_argument(
        "--prompts",
        help="text-to-image models: a text file of captions, one per line, encoded with "
        "--text-encoder into <out>/captions.safetensors",
    )
    what.add_argument(
        "--text-encoder",
        help="transformers T5 folder or Hub name for --prompts (default: the model family's, "
        "google/flan-t5-xl for LlamaGen T2I)",
    )
    what.add_argument(
        "--protocol",
        choices=hub.PROTOCOL_NAMES,
        help="sample as the release's published numbers were (registry names only; `ccalign "
        "models --json` shows each): labels, count, guidance, filters, dtypes, TF32, sizes; a "
        "flag given explicitly overrides the protocol, and run.json records both",
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
        help="logits = uncond + scale * (cond - uncond): 1.0 = guidance-free (default), > 1 "
        "guides, 0 = the unconditional model, between 0 and 1 interpolates (LlamaGen's sampler "
        "treats any scale <= 1 as guidance-free); at most 1000",
    )
    how.add_argument("--top-k", type=number(int, ge=0, le=2**24), help="0 = off (default)")
    how.add_argument("--top-p", type=number(float, gt=0, le=1), help="1.0 = off (default)")
    numerics = parser.add_argument_group("numerics")
    numerics.add_argument(
        "--weights-dtype", choices=tuple(DTYPES),
        help="the model's weights while sampling (default: bfloat16 on CUDA, the checkpoint's "
        "on the CPU)",
    )
    numerics.add_argument(
        "--autocast", choices=("off", *DTYPES[1:]),
        help="autocast the forward to this dtype (VAR's official samplers: float16 over float32 "
        "weights); default off",
    )
    numerics.add_argument(
        "--tf32", choices=("on", "off"),
        help="TF32 matrix products and convolutions on CUDA (the official samplers turn it on); "
        "default: PyTorch's setting",
    )
    numerics.add_argument(
        "--uint8", choices=("round", "floor"),
        help="decoded images to 8 bits: round (default; LlamaGen's 127.5 x + 128) or floor "
        "(VAR's samplers: 255 (x + 1) / 2 truncated)",
    )
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

    from ccalign.sample.runner import RunConfig, run_sampling

    classes = parse_classes(args.classes) if args.classes is not None else None
    options = family_model_options(args)
    _, family, _ = model_spec(args, options)
    check_family_options(family, args)
    protocol = apply_protocol(args, family)
    fill_defaults(args)
    sampling = family.sampling_settings(args)
    family.check_sampling(None, sampling)
    with _distributed(args.device) as (rank, world_size, device, barrier):
        family, model, tokenizer = load_checkpoint(args, options)
        family.check_sampling(model, sampling)
        if isinstance(tokenizer, torch.nn.Module):
            tokenizer.to(device).eval()
        set_tf32(args.tf32, device)
        sampler = family.sampler(model, device=device, inplace=True, **numerics_options(args),
                                 **family.sampler_options(args))
        kind = family.condition(model)
        if args.text_encoder is not None and args.prompts is None:
            raise ValueError("--text-encoder encodes --prompts: give the prompts too")
        if args.prompts is not None:
            args.caption_features = encode_prompts(args, family, kind, device, rank, barrier)
        labels, source = plan_conditions(kind, model, args, classes)
        config = RunConfig(
            labels=labels,
            batch_size=args.batch_size,
            seed=args.seed,
            sampling=sampling,
            resize=args.resize,
            decode=tokenizer is not None,
            uint8=args.uint8,
            numerics={"autocast": args.autocast, "tf32": args.tf32},
            protocol=protocol,
            conditions=source,
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


def plan_conditions(kind, model, args: argparse.Namespace, classes: list[int] | None) -> tuple:
    """Each image's condition as an int, and the source that turns them into conditions:
    class labels as planned by --classes / --per-class / --num-samples / --labels, or the rows
    of --caption-features for a caption-conditioned model."""
    from ccalign.conditions import Captions
    from ccalign.sample.runner import ClassLabelSource, plan_labels

    if isinstance(kind, Captions):
        return plan_captions(kind, args, classes)
    if args.caption_features is not None:
        raise ValueError(
            "--caption-features: this model is class-conditional; give --classes, --per-class "
            "or --num-samples"
        )
    labels = plan_labels(model.num_classes, classes=classes, per_class=args.per_class,
                         num_samples=args.num_samples, mode=args.labels, seed=args.seed)
    return labels, ClassLabelSource()


def encode_prompts(args: argparse.Namespace, family, kind, device, rank: int, barrier):
    """<out>/captions.safetensors: --prompts encoded by rank 0, in batches, with the encoder in
    the weights' dtype (the official T2I sampler encodes in its precision). The file records a
    digest of the prompts and the encoder: a resumed run must give the same ones (its samples
    belong to those captions), and then nothing is encoded again."""
    import hashlib

    import torch

    from ccalign.conditions import Captions
    from ccalign.data.captions import caption_file_metadata, write_caption_file
    from ccalign.data.text_encoder import open_text_encoder

    if not isinstance(kind, Captions):
        raise ValueError("--prompts: this model is class-conditional; give --classes, "
                         "--per-class or --num-samples")
    if args.caption_features is not None:
        raise ValueError("give either --prompts or --caption-features, not both")
    text = Path(args.prompts).read_text(encoding="utf-8")
    prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"--prompts {args.prompts}: no captions in the file")
    # a family without a text encoder of its own reads its prompts with its checkpoint (Janus)
    source = args.text_encoder or family.text_encoder or args.checkpoint
    dtype = getattr(torch, args.weights_dtype or "float32")
    record = {"prompts_sha256": hashlib.sha256("\n".join(prompts).encode()).hexdigest(),
              "text_encoder": str(source), "encoder_dtype": str(dtype).removeprefix("torch.")}
    path = args.out / "captions.safetensors"
    if path.exists():
        found = {key: caption_file_metadata(path).get(key) for key in record}
        if found != record:
            raise ValueError(f"{args.out} holds a run of other captions (prompts, encoder or its "
                             "dtype differ); give a new --out")
    elif rank == 0:
        try:
            encoder = open_text_encoder(source, length=kind.length, device=device, dtype=dtype)
            if encoder.dim != kind.dim:
                raise ValueError(f"--text-encoder {source} gives {encoder.dim}-wide features but "
                                 f"the model takes {kind.dim}: use the model's encoder")
            # prompts of any length (token ids) are padded to the longest, in one call
            batch = PROMPT_BATCH if kind.length else len(prompts)
            encoded = kind.cat(list(encoder.encode_batches(prompts, batch)))
            write_caption_file(path, encoded.features, encoded.mask, metadata=record)
        except BaseException:
            barrier()  # the other ranks wait here: they find no caption file and stop too
            raise
    barrier()
    if not path.exists():
        raise ValueError("rank 0 could not encode --prompts (its error says why)")
    return str(path)


#: prompts encoded at once by ``--prompts``
PROMPT_BATCH = 64


def plan_captions(kind, args: argparse.Namespace, classes: list[int] | None) -> tuple:
    """One image per caption row (``--num-samples N``: N images cycling through the rows)."""
    from ccalign.data.captions import CaptionFile

    given = {"--classes": classes is not None, "--per-class": args.per_class is not None,
             "--labels random": args.labels == "random"}
    for flag, used in given.items():
        if used:
            raise ValueError(f"{flag}: a text-to-image model samples from captions, not classes; "
                             "give --caption-features")
    if args.caption_features is None:
        raise ValueError(
            "a text-to-image model samples from captions: give --caption-features "
            "FILE.safetensors (ccalign encode-captions writes one)"
        )
    source = CaptionFile(args.caption_features, kind.length, kind.dim)
    count = args.num_samples or len(source)
    return [i % len(source) for i in range(count)], source


def apply_protocol(args: argparse.Namespace, family) -> dict | None:
    """Fill the flags that ``--protocol`` governs and the command line left unset; the record of
    the protocol and of every flag that overrides it (for run.json), or None without one."""
    from ccalign import hub

    if args.protocol is None:
        return None
    release = hub.find(args.checkpoint)
    if release is None:
        raise ValueError(
            f"--protocol {args.protocol}: {args.checkpoint} is not a registry name; protocols "
            "belong to the releases (`ccalign models` lists them)"
        )
    protocol = release.find_protocol(args.protocol)
    own = {o.dest: o for o in family.sampling_options}
    flags = protocol_flags(protocol, family)
    overrides = {}
    guidance = next((d for d, o in own.items() if family.own_guidance is not None
                     and o.setting == family.own_guidance.setting and d in flags), None)
    if guidance is not None and args.cfg_scale is not None and not own[guidance].given(args):
        overrides[guidance] = {"protocol": flags.pop(guidance), "given": "--cfg-scale"}
    counted = args.per_class is not None or (args.classes is not None and args.num_samples is None)
    if counted and args.labels is None and flags.get("labels") == "random":  # no total to draw
        overrides["labels"] = {"protocol": flags.pop("labels"), "given": "--classes / --per-class"}
    for dest, value in flags.items():
        given = own[dest].given(args) if dest in own else getattr(args, dest) is not None
        if not given:
            setattr(args, dest, value)
        elif getattr(args, dest) != value:
            overrides[dest] = {"protocol": value, "given": getattr(args, dest)}
    if not protocol.takes_captions:  # how many captions to sample is the user's
        apply_count(args, protocol, overrides)
    return {"name": args.protocol, "release": release.name, "values": protocol.to_dict(),
            "overrides": overrides}


def apply_count(args: argparse.Namespace, protocol, overrides: dict) -> None:
    """The protocol's number of samples, unless --num-samples, --classes or --per-class says
    otherwise (recorded in ``overrides``)."""
    if args.num_samples is None and (args.classes is not None or args.per_class is not None):
        overrides["num_samples"] = {"protocol": protocol.num_samples,
                                    "given": "--classes / --per-class"}
    elif args.num_samples is None:
        args.num_samples = protocol.num_samples
    elif args.num_samples != protocol.num_samples:
        overrides["num_samples"] = {"protocol": protocol.num_samples, "given": args.num_samples}


def protocol_flags(protocol, family) -> dict:
    """Flag destination -> the protocol's value. A family's own guidance setting (VAR's ramp)
    stands for the guidance in place of --cfg-scale; a text-to-image protocol leaves the
    conditions (--labels) to the user."""
    flags = {
        "top_k": protocol.top_k, "top_p": protocol.top_p,
        "weights_dtype": protocol.weights_dtype, "autocast": protocol.autocast_dtype or "off",
        "tf32": "on" if protocol.tf32 else "off", "uint8": protocol.uint8,
    }
    if not protocol.takes_captions:
        flags["labels"] = protocol.labels
    if protocol.resize is not None:
        flags["resize"] = protocol.resize
    own = family.own_guidance
    if own is None or own.setting not in protocol.settings:
        flags["cfg_scale"] = protocol.cfg_scale
    for option in family.sampling_options:
        if option.setting == "temperature":
            flags[option.dest] = protocol.temperature
        elif option.setting in protocol.settings:
            flags[option.dest] = protocol.settings[option.setting]
    return flags


def fill_defaults(args: argparse.Namespace) -> None:
    """The built-in value of every protocol-governed flag still unset."""
    for dest, value in DEFAULTS.items():
        if getattr(args, dest) is None:
            setattr(args, dest, value)


def numerics_options(args: argparse.Namespace) -> dict:
    """The sampler's ``dtype`` and ``autocast`` from --weights-dtype and --autocast."""
    import torch

    def dtype(name: str | None):
        return None if name in (None, "off") else getattr(torch, name)

    return {"dtype": dtype(args.weights_dtype), "autocast": dtype(args.autocast)}


def set_tf32(tf32: str | None, device) -> None:
    """--tf32 on / off for CUDA matrix products and convolutions (nothing to set on the CPU)."""
    import torch

    if tf32 is None or device.type != "cuda":
        return
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32 == "on"


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
