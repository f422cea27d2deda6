"""``pipelining-seq``: one entry point, one subcommand per concern.

Each subcommand lives in its own module, which exposes ``add_arguments(parser)`` and
``main(args) -> int``; modules are imported only when their subcommand runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys

__all__ = ["main"]

# subcommand -> (module, one-line help)
_COMMANDS = {
    "run": ("pipelining_seq.trainer.launch", "train from a recipe on N local processes (torchrun underneath)"),
    "validate": ("pipelining_seq.trainer.launch", "check a recipe and its overrides without starting processes"),
    "ls": ("pipelining_seq.trainer.launch", "list the shipped recipes"),
    "export": ("pipelining_seq.trainer.export", "gather a sharded checkpoint into one safetensors file"),
    "plan": ("pipelining_seq.tools.planner", "predict per-stage memory of a recipe on the meta device"),
    "schedules": ("pipelining_seq.registry", "print the table of schedules (class, placement, orders, planned)"),
    "simulate": ("pipelining_seq.tools.simulate", "play a schedule through a cost model; print bubble and memory"),
    "bench": ("pipelining_seq.tools.bench", "benchmarks: memory, time, partition, gpu"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pipelining-seq", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    argv = sys.argv[1:] if argv is None else argv
    chosen = argv[0] if argv and argv[0] in _COMMANDS else None
    for name, (module, help_text) in _COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        if name == chosen:
            mod = importlib.import_module(module)
            mod.add_arguments(p, command=name)
            p.set_defaults(_main=mod.main)
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "_accepts_extra", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.extra = extra
    return int(args._main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
