"""rtdmd_kernels: fused, exact kernels for DMD / AC-DMD distillation and flow-model GRPO.

``import rtdmd_kernels as rk``. Imports torch only (and triton when installed). Every op runs on
CPU or CUDA tensors; see ``rk.backend_for`` and docs/kernels.md §1 for how the backend is chosen.
"""

from ._backend import backend_for, use_backend
from .advantage import group_advantages, group_ids
from .dmd import ac_dmd_loss, dmd_loss
from .fake_score import consistency_loss, fake_score_loss, renoise
from .policy import cps_logprob, cps_step, ppo_clip_loss
from .rollout import checkpointed_decode, checkpointed_rollout

__version__ = "0.1.0"

__all__ = ["group_advantages", "group_ids", "backend_for", "use_backend", "dmd_loss", "ac_dmd_loss",
           "cps_step", "cps_logprob", "ppo_clip_loss", "renoise", "fake_score_loss", "consistency_loss",
           "checkpointed_rollout", "checkpointed_decode", "__version__"]
