"""`ccalign models`: the released checkpoints ccalign knows by name, which are cached here, and
the sampling protocol each one's published numbers were measured with."""

from __future__ import annotations

import argparse
import json

HELP = ("list the released checkpoints known by name (family, preset, grid, Hub file, cached, "
        "published protocol)")
COLUMNS = ("name", "family", "kind", "preset", "grid", "tokenizer", "cached", "file")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the command's options."""
    parser.add_argument("--family", help="only this model family (llamagen, var)")
    parser.add_argument(
        "--json", action="store_true",
        help="one JSON object per release (name, family, preset, grid, tokenizer, file, cached, "
        "protocol with its published figures and source)",
    )


def run(args: argparse.Namespace) -> int:
    """Print one row (or JSON object) per registry entry, tokenizers under their family."""
    from ccalign import hub

    known = sorted({release.family for release in hub.REGISTRY.values()})
    if args.family is not None and args.family not in known:
        raise ValueError(f"--family {args.family!r}: choose one of {', '.join(known)}")
    releases = [r for r in hub.REGISTRY.values() if args.family in (None, r.family)]
    if args.json:
        for release in releases:
            print(json.dumps(release_record(release, hub.is_cached(release))))
        return 0
    rows = [COLUMNS] + [_row(release, hub.is_cached(release)) for release in releases]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS) - 1)]
    for row, release in zip(rows, [None, *releases], strict=True):
        cells = [cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=True)]
        print("  ".join([*cells, row[-1]]))
        if release is not None and release.protocol is not None:
            print(" " * 4 + "protocol: " + release.protocol.short())
    print("names resolve through the Hugging Face cache (HF_HUB_CACHE / HF_HOME); `ccalign sample "
          "NAME --protocol paper` samples as the published numbers were")
    return 0


def release_record(release, cached: bool) -> dict:
    """What ``--json`` prints for one release (protocol None for tokenizers)."""
    protocol = release.protocol
    return {
        "name": release.name,
        "family": release.family,
        "kind": release.kind,
        "preset": release.preset,
        "grid": release.grid,
        "tokenizer": release.tokenizer,
        "file": release.uri,
        "cached": cached,
        "protocol": None if protocol is None else protocol.to_dict(),
        "protocols": sorted(release.protocols),
    }


def _row(release, cached: bool) -> tuple[str, ...]:
    return (release.name, release.family, release.kind, release.preset or "-",
            str(release.grid or "-"), release.tokenizer or "-", "yes" if cached else "no",
            release.uri)
