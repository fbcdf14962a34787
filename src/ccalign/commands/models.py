"""`ccalign models`: the released checkpoints ccalign knows by name, and which are cached here."""

from __future__ import annotations

import argparse

HELP = "list the released checkpoints known by name (family, preset, grid, Hub file, cached)"
COLUMNS = ("name", "family", "kind", "preset", "grid", "tokenizer", "cached", "file")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the command's options."""
    parser.add_argument("--family", help="only this model family (llamagen, var)")


def run(args: argparse.Namespace) -> int:
    """Print one row per registry entry, tokenizers under the family they serve."""
    from ccalign import hub

    known = sorted({release.family for release in hub.REGISTRY.values()})
    if args.family is not None and args.family not in known:
        raise ValueError(f"--family {args.family!r}: choose one of {', '.join(known)}")
    rows = [COLUMNS] + [
        _row(release, hub.is_cached(release))
        for release in hub.REGISTRY.values()
        if args.family in (None, release.family)
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS) - 1)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=True)]
        print("  ".join([*cells, row[-1]]))
    print("names resolve through the Hugging Face cache (HF_HUB_CACHE / HF_HOME)")
    return 0


def _row(release, cached: bool) -> tuple[str, ...]:
    return (release.name, release.family, release.kind, release.preset or "-",
            str(release.grid or "-"), release.tokenizer or "-", "yes" if cached else "no",
            release.uri)
