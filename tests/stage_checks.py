"""Checks both stages' tests share."""

from __future__ import annotations

import torch


def assert_resume_equals_straight(straight, resumed, logs_straight: list[dict], logs_resumed: list[dict]) -> None:
    """A run interrupted and resumed from its checkpoint ends bitwise where the uninterrupted one does: the
    generator, fake score and EMA weights, and every logged number but the wall time."""
    for m_a, m_c in [(straight.generator, resumed.generator), (straight.fake, resumed.fake),
                     (straight.ema.module, resumed.ema.module)]:
        for a, c in zip(m_a.state_dict().values(), m_c.state_dict().values(), strict=True):
            assert torch.equal(a, c)
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in logs_straight]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in logs_resumed]
