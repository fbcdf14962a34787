"""`ccalign export`: write a model in its official layout, or as safetensors with a config.json.

``official`` is what the model's own code loads (LlamaGen's ``{"model": state_dict}`` .pt, VAR's
raw state_dict .pth). ``safetensors`` is a ccalign file (the config also in its metadata, so
``ccalign sample`` reads it as it is) with a ``config.json`` beside it. The family comes from
the registry entry, the file itself or ``--model``, and loads the checkpoint as ``ccalign
sample`` does (an official VAR file needs ``--vae``, its VQVAE).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HELP = "write a model (file, registry name or hf:// URI) in the official layout or as safetensors"
FORMATS = ("official", "safetensors")
CONFIG_NAME = "config.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the command's options."""
    from ccalign.io import output_file
    from ccalign.settings import declared_range, number
    from ccalign.train.config import ModelSection

    parser.add_argument("checkpoint", help="model file, registry name (`ccalign models`) or hf://")
    parser.add_argument(
        "--format",
        choices=FORMATS,
        required=True,
        help="official: the project's own layout; safetensors: plus config.json",
    )
    parser.add_argument(
        "--out", type=output_file, required=True, help="the file to write (config.json goes beside)"
    )
    parser.add_argument("--model", help="preset of an official checkpoint, e.g. GPT-L")
    parser.add_argument(
        "--grid",
        type=number(int, within=declared_range(ModelSection, "grid")),
        help="LlamaGen: tokens per side of an official checkpoint (24 at 384 px)",
    )
    parser.add_argument(
        "--vae",
        help="VAR: the VQVAE of an official VAR file (file, registry "
        "name such as var-vae, or hf://); registry VAR names default to theirs",
    )
    parser.add_argument(
        "--dtype",
        choices=("float16", "bfloat16", "float32"),
        help="store the floating weights at this precision (safetensors: a smaller file, loaded "
        "back as float32); default: as loaded",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace --out (and the config.json of an earlier export) if they exist",
    )


def run(args: argparse.Namespace) -> int:
    """Load the model as ``ccalign sample`` does and write it in the chosen format."""
    from ccalign import hub
    from ccalign.commands.sample import check_recorded_architecture
    from ccalign.models import families
    from ccalign.models.family import ModelSpec

    out = Path(args.out)
    check_outputs(out, args.format, overwrite=args.overwrite)
    options = {"grid": args.grid, "vae": args.vae}
    spec = ModelSpec(init=args.checkpoint, preset=args.model, options=options)
    family = families.identify(spec)
    families.check_options(family, spec, where="--")
    path = hub.resolve(args.checkpoint, kind="model")
    check_recorded_architecture(family, path, args.model, {"grid": args.grid})
    model = family.load(spec)
    if args.dtype is not None:
        import torch

        model = model.to(getattr(torch, args.dtype))
    for item in write_export(family, model, args.format, out):
        print(f"wrote {item}")
    return 0


def check_outputs(out: Path, fmt: str, *, overwrite: bool) -> None:
    """Never write over a file the user did not name, nor over one they did unless asked: an
    existing --out needs --overwrite, and the config.json beside a safetensors export may only
    replace an earlier export's (a training run keeps its record there)."""
    if out.exists() and not overwrite:
        raise ValueError(f"--out {out} exists; pass --overwrite to replace it, or choose another")
    config = out.parent / CONFIG_NAME
    if fmt != "safetensors" or not config.exists():
        return
    try:
        record = json.loads(config.read_text())
    except (ValueError, OSError):
        record = None
    if not (isinstance(record, dict) and "family" in record):
        raise ValueError(
            f"{config} is not an export's record (a training run's, or another file): the "
            "safetensors export writes config.json beside --out; choose a folder without one"
        )
    if not overwrite:
        raise ValueError(
            f"{config} holds an earlier export's record; pass --overwrite to replace it, or "
            "choose another folder"
        )


def write_export(family, model, fmt: str, out: Path) -> list[Path]:
    """The family's official layout, or safetensors with ``config.json`` (family and
    architecture) beside it."""
    from ccalign.io import atomic_write

    if fmt == "official":
        family.save(model, out, official=True)
        return [out]
    family.save(model, out)
    config = out.parent / CONFIG_NAME
    text = json.dumps({"family": family.name, **model.config.to_dict()}, indent=1) + "\n"
    atomic_write(config, lambda tmp: Path(tmp).write_text(text))
    return [out, config]
