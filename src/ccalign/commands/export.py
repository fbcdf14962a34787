"""`ccalign export`: write a model in its official layout, or as safetensors with a config.json.

``official`` is what the model's own code loads: LlamaGen's ``{"model": state_dict}`` .pt (its
samplers read it for every size). ``safetensors`` is a ccalign file (the config also in its
metadata, so ``ccalign sample`` reads it as it is) with a ``config.json`` beside it.
VAR's official layout is its raw state_dict .pth; an official VAR file needs ``--vae`` (its
VQVAE, whose quantiser a ccalign VAR file carries). The family comes from the registry entry,
the file itself (metadata, or VAR's keys) or ``--model``; each family has its exporter in
:data:`EXPORTERS`.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

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
    parser.add_argument("--vae", help="VAR: the VQVAE of an official VAR file (file, registry "
                        "name such as var-vae, or hf://); registry VAR names default to theirs")


def run(args: argparse.Namespace) -> int:
    """Load the model as ``ccalign sample`` does and write it in the chosen format."""
    from ccalign import hub
    from ccalign.models import families

    release = hub.find(args.checkpoint)
    preset = args.model or (release.preset if release else None)
    grid = args.grid or (release.grid if release else None)
    path = hub.resolve(args.checkpoint, kind="model")
    family = (release.family if release is not None else None) or families.family_of_file(path)
    family = family or families.family_of_preset(preset) or "llamagen"
    default = release.tokenizer if release is not None and family == "var" else None
    vae = args.vae or default
    vae = hub.resolve(vae, kind="tokenizer") if vae is not None else None
    written = EXPORTERS[family](path, preset, grid, args.format, Path(args.out), vae)
    for item in written:
        print(f"wrote {item}")
    return 0


def export_llamagen(
    path: Path, preset: str | None, grid: int | None, fmt: str, out: Path, vae: Path | None = None
) -> list[Path]:
    """LlamaGen: ``{"model": state_dict}`` .pt, or safetensors with its config beside it."""
    from ccalign.commands.sample import check_recorded_architecture
    from ccalign.models import llamagen

    if vae is not None:
        raise ValueError("--vae is VAR's VQVAE; a LlamaGen checkpoint needs none: drop it")
    check_recorded_architecture(str(path), preset, grid)
    return write_export(llamagen, "llamagen", llamagen.load(path, preset, grid=grid), fmt, out)


def export_var(
    path: Path, preset: str | None, grid: int | None, fmt: str, out: Path, vae: Path | None = None
) -> list[Path]:
    """VAR: its raw state_dict (.pth, as released), or safetensors (with the quantiser copy)
    and its config beside it."""
    from ccalign.models import var

    if grid is not None:
        raise ValueError("--grid is LlamaGen's; a VAR model's scales come with its preset")
    recorded = var.config_from_file(path)
    if recorded is None and (preset is None or vae is None):
        raise ValueError(
            f"{path} is an official VAR file: give --model (its preset, e.g. VAR-d16) and --vae "
            "(its VQVAE, e.g. vae_ch160v4096z32.pth or var-vae)"
        )
    model = var.load(path, None if recorded else preset, vae=vae)
    return write_export(var, "var", model, fmt, out)


def write_export(module: ModuleType, family: str, model, fmt: str, out: Path) -> list[Path]:
    """``module.save`` in the official layout, or as safetensors with ``config.json`` beside."""
    from ccalign.io import atomic_write

    if fmt == "official":
        module.save(model, out, official=True)
        return [out]
    module.save(model, out)
    config = out.parent / CONFIG_NAME
    text = json.dumps({"family": family, **model.config.to_dict()}, indent=1) + "\n"
    atomic_write(config, lambda tmp: Path(tmp).write_text(text))
    return [out, config]


#: family -> exporter(path, preset, grid, format, out, vae) -> files written
Exporter = Callable[[Path, str | None, int | None, str, Path, Path | None], list[Path]]
EXPORTERS: dict[str, Exporter] = {"llamagen": export_llamagen, "var": export_var}
