"""Command-line plumbing shared by the entry points (main, linear_probe, knn_eval, pictures)."""

from __future__ import annotations

import sys
from collections.abc import Callable

from absl import flags


def error_line(program: str, error: BaseException) -> str:
    """The one line an entry point prints for an error the user can fix."""
    text = str(error).strip()
    return f"{program}: error: {text.splitlines()[0] if text else repr(error)}"


def flags_parser(program: str) -> Callable[[list[str]], list[str]]:
    """absl's parser, but a bad flag (an unknown --config.x, a value of the wrong type) is one
    `PROGRAM: error:` line and exit 2, like every other bad input, instead of a traceback."""

    def parse(argv: list[str]) -> list[str]:
        try:
            return flags.FLAGS(argv)
        except (flags.Error, AttributeError, KeyError) as error:
            text = str(error).strip()
            if not isinstance(error, flags.Error):  # ml_collections: only the missing field
                text = text.strip("\"'")
                names = [arg.split("=")[0] for arg in argv[1:] if arg.startswith("--config.")
                         and text in arg.split("=")[0].split(".")]
                text = f"{names[0] if names else text}: no such config field"
            print(f"{program}: error: {text.splitlines()[0] if text else repr(error)}",
                  file=sys.stderr, flush=True)
            sys.exit(2)

    return parse
