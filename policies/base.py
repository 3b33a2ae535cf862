"""The one policy interface used by the sim loop, evaluation, data collection and the ROS node."""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from vla.contracts.observation import ObservationSpec


@runtime_checkable
class Policy(Protocol):
    """A policy whose episodes are worth learning from only in part (a DAgger takeover, a deliberate
    missed grasp) also has `expert_from`: the first such step, which recorded episodes keep."""

    spec: ObservationSpec  # what its observations must hold (image size, IMU window, wrist camera)

    def reset(self, instruction: str) -> None:
        """Start a new episode with this instruction."""

    def act(self, obs: dict) -> np.ndarray:
        """Observation (vla.contracts) in, float32[7] action out."""
