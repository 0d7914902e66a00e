"""What both command-line entry points share: one-line errors with exit 2, logging, the device."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys

import torch

from .checkpoint import CheckpointError
from .config import ConfigError

EXIT_USAGE = 2


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line (no usage dump) and exits 2; every command has
    ``--debug`` (tracebacks instead of one-line errors, see :func:`run_cli`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


class CLIExit(Exception):
    """Stop the command with ``code`` and one line, ``message`` (an interrupted or failed run, not a bug)."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


def run_cli(prog: str, main, argv=None) -> int:
    """Run ``main(argv)``. User errors (bad config, path, value, an unusable checkpoint) become one line on stderr
    and exit 2; a stopped run (:class:`CLIExit`: Ctrl-C 130, a non-finite step 1) and an OS error (a full disk: 1)
    one line too. ``--debug`` among the arguments shows the traceback instead."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    try:
        return main(argv)
    except (ConfigError, CheckpointError, FileNotFoundError, NotADirectoryError) as e:
        if debug:
            raise
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except CLIExit as e:
        if debug:
            raise
        print(f"{prog}: {'stopped' if e.code != 130 else 'interrupted'}: {e}", file=sys.stderr)
        return e.code
    except OSError as e:
        if debug:
            raise
        where = f" ({e.filename})" if e.filename else ""
        print(f"{prog}: error: {e.strerror or e}{where} (--debug shows the traceback)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except SystemExit as e:  # argparse (bad arguments, --help): return its code to in-process callers
        return e.code if isinstance(e.code, int) else EXIT_USAGE


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when there is one, else CPU; ``cuda`` without a GPU is a config error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("config key 'device' is 'cuda' but no CUDA device is available")
    return torch.device(name)


@contextlib.contextmanager
def user_errors():
    """A ``ValueError`` from loading the user's files (a wrong path, a folder that is not a model, a bad reward
    entry) is a user error: one line and exit 2 through :func:`run_cli`."""
    try:
        yield
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(str(e).splitlines()[0]) from e
