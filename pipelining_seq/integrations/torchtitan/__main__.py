"""``python -m pipelining_seq.integrations.torchtitan [--cpu] <torchtitan train arguments>``.

Runs ``torchtitan.train.main()`` unchanged, with its config manager taught the
``seq1f1b`` section (``--seq1f1b.n_seq_chunks``, ``--seq1f1b.partition``, ...) and
:func:`enable` applied to the parsed config before the Trainer is built. A setting that
cannot run is refused there, before any process group: the message is printed once (by
rank 0) on one line, and every rank exits with status 2.

Own flags (taken out before torchtitan parses the rest):

* ``--cpu``: run on CPU gloo ranks (:mod:`.cpu`);
* ``--cpu-assets DIR``: write an offline tokenizer and data set to ``DIR``, print the
  torchtitan flags that use them, and exit.
"""

from __future__ import annotations

import gc
import os
import sys
from typing import Any

from .config import Seq1F1BConfig, with_seq1f1b

PROG = "python -m pipelining_seq.integrations.torchtitan"


def _usage() -> str:
    from dataclasses import fields

    from .schedule import seq1f1b_names

    lines = [
        "usage: torchrun --nproc-per-node N -m pipelining_seq.integrations.torchtitan [--cpu] \\",
        "           --module MODULE --config CONFIG [torchtitan flags] [--seq1f1b.FIELD VALUE ...]",
        f"       {PROG} --cpu-assets DIR",
        "",
        "torchtitan's training (torchtitan.train) with the package's Seq1F1B schedules. Every torchtitan flag",
        "works as with torchtitan.train; pick a schedule with --parallelism.pipeline_parallel_schedule",
        f"{' | '.join(seq1f1b_names())} (or any of torch's) and set --parallelism.pipeline_parallel_degree > 1.",
        "",
        "entry options:",
        "  --cpu                 run on CPU gloo ranks (torchtitan assumes an accelerator); offline",
        "  --cpu-assets DIR      write a small tokenizer and JSONL data set to DIR, print the flags, exit",
        "  -h, --help            this text; with --module and --config: torchtitan's full help",
        "",
        "seq1f1b options (section of the config, --seq1f1b.FIELD):",
    ]
    for f in fields(Seq1F1BConfig):
        default = f.default
        lines.append(f"  --seq1f1b.{f.name:<20} default {default!r}")
    lines += [
        "  --seq1f1b.no-document-masking  attend across packed documents",
        "",
        "See docs/torchtitan.md.",
    ]
    return "\n".join(lines)


def _config_manager() -> type:
    from torchtitan.config import ConfigManager

    from .wiring import StartupRefusal, enable

    class Seq1F1BConfigManager(ConfigManager):
        def _load_config(self, args: list[str]) -> tuple[object, list[str]]:
            loaded, rest = super()._load_config(args)
            return with_seq1f1b(loaded), rest

        def parse_args(self, args: list[str] | None = None) -> Any:
            config = super().parse_args(args)
            try:
                return enable(config)
            except ValueError as err:  # every refusal of enable() is a ValueError naming the flag
                raise StartupRefusal(str(err)) from err

    return Seq1F1BConfigManager


def _take(args: list[str], flag: str, *, value: bool) -> tuple[bool, str | None]:
    for i, arg in enumerate(args):
        if arg == flag:
            if not value:
                del args[i]
                return True, None
            if i + 1 >= len(args):
                raise SystemExit(f"{PROG}: {flag} needs a value")
            got = args[i + 1]
            del args[i : i + 2]
            return True, got
        if value and arg.startswith(flag + "="):
            del args[i]
            return True, arg.split("=", 1)[1]
    return False, None


def _refuse(message: str) -> None:
    if os.environ.get("RANK", "0") == "0":
        print(f"seq1f1b: error: {' '.join(message.split())}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args) and not any(a.split("=")[0] == "--module" for a in args):
        print(_usage())
        return
    assets, folder = _take(args, "--cpu-assets", value=True)
    if assets:
        from .cpu import asset_args, make_assets

        tok, data = make_assets(folder)
        print(" ".join(asset_args(tok, data)))
        return
    cpu, _ = _take(args, "--cpu", value=False)
    if cpu:
        from .cpu import install

        install()
    import torchtitan.train as titan_train

    from .wiring import StartupRefusal

    sys.argv = [sys.argv[0], *args]
    titan_train.ConfigManager = _config_manager()
    try:
        titan_train.main()
    except StartupRefusal as err:
        _refuse(str(err))
    # torchtitan has destroyed its process groups: join their gloo worker threads before
    # the interpreter shuts down (why: pipelining_seq.p2p.destroy_process_group).
    gc.collect()


if __name__ == "__main__":
    main()
