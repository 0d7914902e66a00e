"""The trainer's optional dependencies: found before anything imports them, or one line and exit 2.

``pip install rtdmd`` installs what :mod:`rtdmd_kernels` needs (torch; Triton through the ``triton`` extra).
The trainer and sampler need the ``train`` extra as well. This module imports the standard library only, so
the entry points can check for those packages before their first import of one.
"""

from __future__ import annotations

import importlib.util
import sys

#: import name -> the distribution that provides it (what ``pip install`` is told). Keep in step with the
#: ``train`` extra of setup.py (tests/test_install.py checks that they agree).
TRAINER_MODULES = {
    "numpy": "numpy",
    "safetensors": "safetensors",
    "diffusers": "diffusers",
    "transformers": "transformers",
    "peft": "peft",
    "yaml": "pyyaml",
    "tqdm": "tqdm",
    "matplotlib": "matplotlib",
    "PIL": "pillow",
    "scipy": "scipy",
}

INSTALL_HINT = 'pip install "rtdmd[train]" (from a clone: pip install -e ".[train]")'


def _present(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken or blocked package counts as missing
        return False


def missing_trainer_packages() -> list[str]:
    """The distributions of the ``train`` extra whose modules cannot be found, in a fixed order."""
    return [dist for module, dist in TRAINER_MODULES.items() if not _present(module)]


def require_trainer_packages(prog: str) -> None:
    """Exit with status 2 and one line naming the missing packages and the install command, if any is missing."""
    missing = missing_trainer_packages()
    if missing:
        names = ", ".join(missing)
        sys.stderr.write(f"{prog}: error: the trainer needs {names} (not installed): {INSTALL_HINT}\n")
        raise SystemExit(2)
