"""The command line every flow shares: `python -m flows.<stage> [-P params.yaml] [-S key=value ...]`."""

from __future__ import annotations

import argparse
from typing import Sequence

from tasks.params import Params, load_params


def parse_cli(argv: Sequence[str] | None, description: str) -> Params:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("-P", "--params", default=None, help="params file (default: params.yaml at the project root)")
    parser.add_argument(
        "-S", "--set", action="append", default=[], metavar="KEY=VALUE",
        help="override a params.yaml key, e.g. -S data.dataset=scientific (repeatable; the syntax of `dvc exp run -S`)",
    )
    args = parser.parse_args(argv)
    return load_params(args.params, args.set)
