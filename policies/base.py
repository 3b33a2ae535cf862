"""The one policy interface used by the sim loop, evaluation, data collection and the ROS node."""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Policy(Protocol):
    def reset(self, instruction: str) -> None:
        """Start a new episode with this instruction."""

    def act(self, obs: dict) -> np.ndarray:
        """Observation (sim.contracts) in, float32[7] action out."""
