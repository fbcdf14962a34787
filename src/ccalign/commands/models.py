"""`ccalign models`: the released checkpoints ccalign knows by name, and which are cached here."""

from __future__ import annotations

import argparse

HELP = "list the released checkpoints known by name (family, preset, grid, Hub file, cached)"
COLUMNS = ("name", "family", "preset", "grid", "tokenizer", "cached", "file")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the command's options."""
    parser.add_argument("--family", help="only this family (llamagen, vq, var, var-vqvae, gft)")


def run(args: argparse.Namespace) -> int:
    """Print one row per registry entry; families this build cannot load yet are marked."""
    from ccalign import hub

    if args.family is not None and args.family not in hub.FAMILIES:
        raise ValueError(f"--family {args.family!r}: choose one of {', '.join(hub.FAMILIES)}")
    rows = [COLUMNS] + [
        _row(release, hub.is_cached(release), hub.FAMILIES[release.family].loadable)
        for release in hub.REGISTRY.values()
        if args.family in (None, release.family)
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS) - 1)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=True)]
        print("  ".join([*cells, row[-1]]))
    print("names resolve through the Hugging Face cache (HF_HUB_CACHE / HF_HOME); "
          "'(not yet)': this version cannot load that family")
    return 0


def _row(release, cached: bool, loadable: bool) -> tuple[str, ...]:
    family = release.family if loadable else f"{release.family} (not yet)"
    return (release.name, family, release.preset or "-", str(release.grid or "-"),
            release.tokenizer or "-", "yes" if cached else "no", release.uri)
