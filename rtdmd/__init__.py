"""rtdmd: a compact RTDMD trainer and sampler on diffusers, transformers and peft.

The trainer (``python -m rtdmd.train``) and sampler (``python -m rtdmd.sample``) are being built;
the kernels they stand on are in :mod:`rtdmd_kernels`.
"""

from rtdmd_kernels import __version__

__all__ = ["__version__"]
