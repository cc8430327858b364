"""The `verispec` command: thin parsing and printing over the library. Bad input exits 2 with a message."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from verispec.cli import advise, bench, calibrate, diagnose, generate, models, serve, train
from verispec.errors import VerispecError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="verispec", description="Lossless speculative decoding.")
    sub = p.add_subparsers(dest="command", required=True)
    for command in (generate, serve, bench, advise, calibrate, diagnose, train, models):
        command.add_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        args.run(args)
    except VerispecError as e:
        print(f"verispec: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
