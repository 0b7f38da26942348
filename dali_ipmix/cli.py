"""The ``dali-ipmix`` command: one subcommand per task, each registered by its own module."""
from __future__ import annotations

import argparse
import importlib
import sys

from .errors import UserError  # noqa: F401  (re-exported: the commands raise it)

# subcommand -> module defining ``register(subparsers)``; the module adds its parser and sets
# ``func`` (called with the parsed args, returns an exit code).  Modules are imported lazily so
# that ``dali-ipmix fractals`` does not pay for importing DALI.
SUBCOMMANDS = {
    "fractals": "dali_ipmix.data.fractals",
    "synth": "dali_ipmix.data.synth",
    "graph": "dali_ipmix.debug.graph",
    "preview": "dali_ipmix.debug.preview",
    "stages": "dali_ipmix.debug.stages",
    "doctor": "dali_ipmix.debug.doctor",
    "bench": "dali_ipmix.bench",
    "eval": "dali_ipmix.robustness.cli",
    "verify": "dali_ipmix.verify",
    "shard": "dali_ipmix.shard",
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="dali-ipmix", description="IPMix as NVIDIA DALI pipelines: generated data, graph "
        "debugging, benchmarks, robustness evaluation, data checks (train with train.py).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = argv[0] if argv and argv[0] in SUBCOMMANDS else None
    for name, module in SUBCOMMANDS.items():
        if wanted is None or name == wanted:
            importlib.import_module(module).register(sub)
        else:
            sub.add_parser(name, help=f"(see dali-ipmix {name} --help)")
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"dali-ipmix {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Ctrl-C: one line and the shell's code for SIGINT, not a traceback; the commands write
        # each file whole (temp file + rename) or not at all
        print(f"\ndali-ipmix {args.command}: interrupted (Ctrl-C); every file it wrote is whole, "
              f"the one it was writing is absent", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
