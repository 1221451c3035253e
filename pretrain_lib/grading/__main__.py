"""``python -m pretrain_lib.grading build``: regenerate exercises/ from solutions/."""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain_lib.grading")
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="regenerate exercises/ from solutions/")
    build.add_argument("names", nargs="*", help="solution stems to rebuild, e.g. 01_objectives (default: all)")
    args = parser.parse_args(argv)
    if args.command == "build":
        from .build import build_all
        build_all(names=args.names or None)
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
