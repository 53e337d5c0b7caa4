"""Command-line plumbing shared by the entry points (main, linear_probe, knn_eval, pictures)."""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

from absl import flags
from ml_collections.config_flags.config_flags import ConfigFileFlagParser


class ConfigFileError(flags.Error):
    """A --config file that cannot be read, does not run, or has no usable get_config()."""


def first_line(error: BaseException) -> str:
    """An exception's message in one line (its type when it has none)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def error_line(program: str, error: BaseException) -> str:
    """The one line an entry point prints for an error the user can fix."""
    return f"{program}: error: {first_line(error)}"


def run_or_exit(program: str, fn: Callable[..., Any], *args,
                errors: tuple[type[BaseException], ...] = (), **kwargs) -> Any:
    """`fn(*args, **kwargs)` for an evaluation entry point, with absl's INFO logs off; an error
    the user can fix (ValueError, OSError, or one of `errors`) is its one stderr line, exit 2."""
    import logging  # noqa: PLC0415

    logging.getLogger("absl").setLevel(logging.WARNING)
    try:
        return fn(*args, **kwargs)
    except (ValueError, OSError, *errors) as error:
        print(error_line(program, error), file=sys.stderr, flush=True)
        sys.exit(2)


def run_with_config_and_workdir(program: str, main: Callable[[Any, str], None], *,
                                config_help: str, workdir_help: str) -> None:
    """`app.run` of an entry point taking --config (a config file whose fields
    --config.field=value overrides) and --workdir: `main(config, workdir)`."""
    from absl import app  # noqa: PLC0415
    from ml_collections import config_flags  # noqa: PLC0415

    config = config_flags.DEFINE_config_file(
        "config", None, f"{config_help}; override fields with --config.field=value.",
        lock_config=True)
    workdir = flags.DEFINE_string("workdir", None, workdir_help)
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(lambda argv: main(config.value, workdir.value), flags_parser=flags_parser(program))


def flags_parser(program: str) -> Callable[[list[str]], list[str]]:
    """absl's parser, but a bad flag (an unknown --config.x, a value of the wrong type, a config
    file that is missing or broken) is one `PROGRAM: error:` line and exit 2, like every other
    bad input, instead of a traceback."""

    def parse(argv: list[str]) -> list[str]:
        _name_config_file_errors()
        try:
            return flags.FLAGS(argv)
        except flags.Error as error:
            print(error_line(program, error), file=sys.stderr, flush=True)
            sys.exit(2)
        except (AttributeError, KeyError) as error:  # ml_collections: only the missing field
            field = str(error).strip().strip("\"'")
            names = [arg.split("=")[0] for arg in argv[1:] if arg.startswith("--config.")
                     and field in arg.split("=")[0].split(".")]
            print(error_line(program, ValueError(
                f"{names[0] if names else field}: no such config field")),
                file=sys.stderr, flush=True)
            sys.exit(2)

    return parse


def _name_config_file_errors() -> None:
    """Makes every config-file flag raise ConfigFileError for a file it cannot use.

    ml_collections reports these badly: a missing file only when the config is first read (by
    then the workdir exists) and without its path, a syntax error or a failing import as a
    traceback, a file without get_config() as a missing config field.
    """
    for name in flags.FLAGS:
        flag = flags.FLAGS[name]
        if isinstance(flag.parser, ConfigFileFlagParser):
            flag.parser = _ConfigFileParser(flag.parser)


class _ConfigFileParser(flags.ArgumentParser):
    """ml_collections' config-file parser, with each failure one line naming the file."""

    def __init__(self, parser: ConfigFileFlagParser):
        self._parser = parser

    def flag_type(self) -> str:
        return self._parser.flag_type()

    def parse(self, argument: str) -> Any:
        path = argument.split(":", 1)[0]  # FILE:ARG passes ARG to get_config
        try:
            with open(path, "rb"):
                pass
        except OSError as error:
            raise ConfigFileError(f"config file {path}: {error.strerror}") from None
        try:
            config = self._parser.parse(argument)
        except Exception as error:  # noqa: BLE001 (anything the file raised is its problem)
            raise ConfigFileError(f"config file {path}: {_problem(error, path)}") from None
        if config is None:
            raise ConfigFileError(f"config file {path}: get_config() returned None")
        return config


def _problem(error: Exception, path: str) -> str:
    """What went wrong while running config file `path`, at which of its lines."""
    if isinstance(error, (TypeError, ValueError)) and error.__context__ is not None:
        error = error.__context__  # ml_collections re-raises these with a traceback as text
    lines = [frame.lineno for frame in traceback.extract_tb(error.__traceback__)
             if _same_file(frame.filename, path)]
    if isinstance(error, SyntaxError) and _same_file(error.filename or "", path):
        return f"line {error.lineno}: {error.msg}"
    if isinstance(error, AttributeError) and error.name == "get_config" and not lines:
        return "defines no get_config()"
    where = f"line {lines[-1]}: " if lines else ""
    return f"{where}{type(error).__name__}: {error}"


def _same_file(a: str, b: str) -> bool:
    return os.path.abspath(a) == os.path.abspath(b)
