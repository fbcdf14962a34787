"""`ccalign <command>`: each module in ``ccalign.commands`` contributes one sub-command.

A command module defines ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args)``; the
sub-command's name is the module name with underscores as dashes (``extract_codes`` ->
``extract-codes``). Imports are deferred so ``ccalign --help`` stays fast.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import pkgutil
import sys
from typing import NoReturn

import ccalign
import ccalign.commands
from ccalign.errors import UserError


def _command_modules() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(ccalign.commands.__path__))


class Parser(argparse.ArgumentParser):
    """argparse with its usage errors as one line (the option, the value, the range), pointing
    to ``--help`` instead of printing the usage; sub-command parsers are of this class too."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="ccalign", description="Condition Contrastive Alignment for AR image generators"
    )
    parser.add_argument("--version", action="version", version=f"ccalign {ccalign.__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="<command>")
    for name in _command_modules():
        module = importlib.import_module(f"ccalign.commands.{name}")
        sub = subparsers.add_parser(
            name.replace("_", "-"), help=module.HELP, description=module.HELP
        )
        module.add_arguments(sub)
        sub.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2, one line printed)
        return int(exc.code or 0)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        result = args._run(args)
    except (ValueError, OSError, UserError) as exc:  # user errors: one line, no traceback
        print(f"ccalign {args.command}: error: {describe_error(exc)}", file=sys.stderr)
        return 1
    except (MemoryError, RuntimeError) as exc:
        if not out_of_memory(exc):
            raise
        print(
            f"ccalign {args.command}: error: out of memory ({_first_line(exc)}); lower the "
            "batch size (--batch-size, train.micro_batch) or use a smaller model; resumable "
            "commands continue from their last saved state",
            file=sys.stderr,
        )
        return 1
    return int(result or 0)


def out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` says an allocation failed (Python's, the CPU allocator's, CUDA's)."""
    text = str(exc)
    return (
        isinstance(exc, MemoryError)
        or type(exc).__name__ == "OutOfMemoryError"
        or "can't allocate memory" in text
        or "out of memory" in text.lower()
    )


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def describe_error(exc: BaseException) -> str:
    """The message for the user: the error's own words, with the fix for system errors."""
    if not isinstance(exc, OSError) or exc.strerror is None:
        return str(exc) or type(exc).__name__
    where = f": {exc.filename}" if exc.filename else ""
    fixes = {
        errno.ENOSPC: "free some space, then rerun; files are written atomically, so every "
        "complete file is intact (a training run continues with --resume)",
        errno.EACCES: "choose a location you can write to, or fix its permissions",
        errno.EROFS: "choose a location on a writable file system",
        errno.ENOTDIR: "a path component is a file, not a folder: choose another path",
        errno.EISDIR: "give a file, not a folder",
        errno.EEXIST: "a file stands where a folder is needed: choose another path",
    }
    fix = fixes.get(exc.errno)
    return f"{exc.strerror}{where}" + (f"; {fix}" if fix else "")


if __name__ == "__main__":
    sys.exit(main())
