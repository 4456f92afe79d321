"""The ``aotdiff`` command line: a thin layer that parses flags, builds configs and calls the library.

Each sub-command lives in its own module exposing ``register(subparsers)``; the parser it adds carries a ``run``
default that receives the parsed arguments and returns an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from aotdiff import __version__
from aotdiff.cpu import prefer_passive_waiting

# Before anything imports torch: OpenMP reads its wait policy when it is loaded (see aotdiff.cpu).
prefer_passive_waiting()

# Sub-command modules, in the order `aotdiff --help` lists them.
COMMANDS = ("train", "sample", "fid", "curvature", "sweep", "dg", "bench", "convert")


class UserError(Exception):
    """A problem with the user's input: printed without a traceback, exit code 2."""


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aotdiff",
        description="Train and sample diffusion models with Approximated Optimal Transport (AOT) noise coupling.",
        epilog="Run `aotdiff COMMAND --help` for the flags of each command. Quick start: `aotdiff train --out "
        "runs/digits` then `aotdiff sample runs/digits --grid grid.png`.",
    )
    parser.add_argument("--version", action="version", version=f"aotdiff {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"aotdiff.cli.{name}")
        if name == "train":  # its --help shows the values of the preset named on the command line
            module.register(sub, argv)
        else:
            module.register(sub)
    return parser


def command_name(args: argparse.Namespace) -> str:
    """``aotdiff fid calc``, ``aotdiff dg train``, ``aotdiff sample``: the prefix of the command's messages, as
    argparse writes it in its own errors."""
    words = ["aotdiff", str(args.command)]
    sub = getattr(args, f"{args.command}_command", None)
    return " ".join([*words, sub] if sub else words)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 1
    from aotdiff.train.checkpoint import CheckpointError
    from aotdiff.train.runloop import CheckpointWriteError

    if args.command not in ("train", "dg", "bench"):  # those choose in their own setup (train: from its config)
        from aotdiff.cpu import configure_threads

        configure_threads(getattr(args, "threads", 0))
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        # Ctrl-C in sample / fid / sweep / curvature: their outputs are written (atomically) when the work is done,
        # so a traceback would say nothing useful. 130 = 128 + SIGINT, as the shell and `aotdiff train` report it.
        # Open progress bars are closed first, so the message starts on a line of its own.
        from tqdm import tqdm

        for bar in list(getattr(tqdm, "_instances", ())):
            bar.close()
        print(f"{command_name(args)}: interrupted (Ctrl-C)", file=sys.stderr)
        return 130
    except CheckpointWriteError as e:
        # The machine refused a checkpoint (full disk, permissions): the input was fine, so 1, like any OSError.
        print(f"{command_name(args)}: error: {e}", file=sys.stderr)
        return 1
    except (UserError, ValueError, FileNotFoundError, CheckpointError) as e:
        # Bad input: the message names the input and the fix; a traceback would only hide it.
        print(f"{command_name(args)}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        # The machine refused (disk full, read-only, permissions): say which file and why, without a traceback.
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"{command_name(args)}: error: {e.strerror or e}{where}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
