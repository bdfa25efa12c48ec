"""The `st-sdk` command line. Each subcommand is a module of this package exposing
`add_parser(subparsers)` (which sets `func` on its parser) and nothing heavy at import."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

COMMANDS = ["demo", "generate", "chat", "synth", "info", "backends", "bench", "quantize", "perplexity", "serve", "cache"]


def build_parser() -> argparse.ArgumentParser:
    from st_sdk import __version__

    parser = argparse.ArgumentParser(prog="st-sdk", description="Run SmallThinker models locally.")
    parser.add_argument("--version", action="version", version=f"st-sdk {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"st_sdk.cli.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from st_sdk.errors import STError

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=[logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)],
                        format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        rc = int(args.func(args) or 0)
        sys.stdout.flush()   # a reader gone shows here (BrokenPipeError below), not as a traceback at exit
        return rc
    except STError as e:
        print(f"st-sdk: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:   # the reader of our output went away (`st-sdk cache | head`): stop quietly
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # nothing left to flush at exit
        return 141   # as a shell reports a process ended by SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
