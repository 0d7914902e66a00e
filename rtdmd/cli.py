"""What both command-line entry points share: one-line errors with exit 2, logging, the device."""

from __future__ import annotations

import argparse
import logging
import sys

import torch

from .config import ConfigError

EXIT_USAGE = 2


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line (no usage dump) and exits 2."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def run_cli(prog: str, main, argv=None) -> int:
    """Run ``main(argv)``; user errors (bad config, bad path, bad value) become one line on stderr and exit 2."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        return main(argv)
    except (ConfigError, FileNotFoundError, NotADirectoryError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as e:  # argparse (bad arguments, --help): return its code to in-process callers
        return e.code if isinstance(e.code, int) else EXIT_USAGE


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when there is one, else CPU; ``cuda`` without a GPU is a config error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("config key 'device' is 'cuda' but no CUDA device is available")
    return torch.device(name)
