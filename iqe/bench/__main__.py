"""`python -m iqe.bench ...`: the same as `iqe bench ...` (for scripts that should not depend on the CLI wiring)."""

from __future__ import annotations

import argparse
import sys

from iqe.bench.core import __doc__ as BENCH_DOC
from iqe.bench.core import add_bench_arguments, run_bench
from iqe.errors import InputError


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keep the module docstring's layout and show every option's default."""


def main(argv: list[str] | None = None) -> int:
    """Parse `argv` (default: sys.argv[1:]) and run the benchmark; returns the exit status."""
    parser = argparse.ArgumentParser(prog="iqe bench", description=BENCH_DOC, formatter_class=_HelpFormatter)
    add_bench_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_bench(args)
    except InputError as exc:
        print(f"iqe bench: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
