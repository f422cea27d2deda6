"""``python -m pipelining_seq.integrations.torchtitan <torchtitan train arguments>``.

Runs ``torchtitan.train.main()`` unchanged, with its config manager taught the
``seq1f1b`` section (``--seq1f1b.n_seq_chunks``, ``--seq1f1b.partition``, ...) and
:func:`enable` applied to the parsed config before the Trainer is built.
"""

from __future__ import annotations

import sys
from typing import Any

from .config import with_seq1f1b


def _config_manager() -> type:
    from torchtitan.config import ConfigManager

    from .wiring import enable

    class Seq1F1BConfigManager(ConfigManager):
        def _load_config(self, args: list[str]) -> tuple[object, list[str]]:
            loaded, rest = super()._load_config(args)
            return with_seq1f1b(loaded), rest

        def parse_args(self, args: list[str] | None = None) -> Any:
            return enable(super().parse_args(args))

    return Seq1F1BConfigManager


def main(argv: list[str] | None = None) -> None:
    import torchtitan.train as titan_train

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    titan_train.ConfigManager = _config_manager()
    titan_train.main()


if __name__ == "__main__":
    main()
