"""rtdmd: a compact RTDMD trainer and sampler on diffusers, transformers and peft.

Run as ``python -m rtdmd.train`` and ``python -m rtdmd.sample`` (docs/training.md); it needs the ``train`` extra.
The kernels it stands on are :mod:`rtdmd_kernels`, which needs torch alone.
"""

from rtdmd_kernels import __version__

__all__ = ["__version__"]
