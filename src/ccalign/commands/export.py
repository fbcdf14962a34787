"""`ccalign export`: write a model in its official layout, or as safetensors with a config.json.

``official`` is what the model's own code loads: LlamaGen's ``{"model": state_dict}`` .pt (its
samplers read it for every size). ``safetensors`` is a ccalign file (the config also in its
metadata, so ``ccalign sample`` reads it as it is) with a ``config.json`` beside it.
A model family plugs in by adding its exporter to :data:`EXPORTERS` (VAR: a raw state_dict .pth).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

HELP = "write a model (file, registry name or hf:// URI) in the official layout or as safetensors"
FORMATS = ("official", "safetensors")
CONFIG_NAME = "config.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the command's options."""
    parser.add_argument("checkpoint", help="model file, registry name (`ccalign models`) or hf://")
    parser.add_argument("--format", choices=FORMATS, required=True,
                        help="official: the project's own layout; safetensors: plus config.json")
    parser.add_argument("--out", required=True, help="the file to write (config.json goes beside)")
    parser.add_argument("--model", help="preset of an official checkpoint, e.g. GPT-L")
    parser.add_argument("--grid", type=int, help="tokens per side of an official checkpoint")


def run(args: argparse.Namespace) -> int:
    """Load the model as ``ccalign sample`` does and write it in the chosen format."""
    from ccalign import hub

    release = hub.find(args.checkpoint)
    family = release.family if release is not None else "llamagen"
    preset = args.model or (release.preset if release else None)
    grid = args.grid or (release.grid if release else None)
    path = hub.resolve(args.checkpoint, kind="model")
    written = EXPORTERS[family](path, preset, grid, args.format, Path(args.out))
    for item in written:
        print(f"wrote {item}")
    return 0


def export_llamagen(
    path: Path, preset: str | None, grid: int | None, fmt: str, out: Path
) -> list[Path]:
    """LlamaGen: ``{"model": state_dict}`` .pt, or safetensors with its config beside it."""
    from ccalign.commands.sample import check_recorded_architecture
    from ccalign.io import atomic_write
    from ccalign.models import llamagen

    check_recorded_architecture(str(path), preset, grid)
    model = llamagen.load(path, preset, grid=grid)
    if fmt == "official":
        llamagen.save(model, out, official=True)
        return [out]
    llamagen.save(model, out)
    config = out.parent / CONFIG_NAME
    text = json.dumps({"family": "llamagen", **model.config.to_dict()}, indent=1) + "\n"
    atomic_write(config, lambda tmp: Path(tmp).write_text(text))
    return [out, config]


#: family -> exporter(path, preset, grid, format, out) -> files written
EXPORTERS: dict[str, Callable[[Path, str | None, int | None, str, Path], list[Path]]] = {
    "llamagen": export_llamagen,
}
