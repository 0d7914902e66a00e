"""The two trainers: ``ac_dmd`` (stage 1, AC-DMD distillation) and ``rtdmd`` (stage 2, reward tilting);
``common`` holds what they share."""

from __future__ import annotations

from .ac_dmd import Stage1, Stage1State
from .common import StageState
from .rtdmd import Stage2, Stage2State

__all__ = ["Stage1", "Stage1State", "Stage2", "Stage2State", "StageState", "STATES", "init_state"]

STATES: dict[int, type[StageState]] = {1: Stage1State, 2: Stage2State}


def init_state(stage: int, generator, fake, cfg) -> StageState:
    """A new stage-``stage`` state around its trained networks: stage 1 starts both from the base (docs/method.md
    §12.1), stage 2 the generator from stage 1's EMA and the fake score from stage 1's (§8)."""
    return STATES[stage].create(generator, fake, cfg)
