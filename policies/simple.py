"""Policies that need no model: uniform random actions, replay of an action list. (The scripted
expert lives with the simulator, whose privileged state it reads: sim.expert.)"""
from __future__ import annotations

import numpy as np

from vla.contracts.action import ACTION_DIM, ACTION_HIGH, ACTION_LOW
from vla.contracts.observation import ObservationSpec


class RandomPolicy:
    spec = ObservationSpec()

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)

    def reset(self, instruction: str) -> None:
        pass

    def act(self, obs: dict) -> np.ndarray:
        return self.rng.uniform(ACTION_LOW, ACTION_HIGH).astype(np.float32)


class ReplayPolicy:
    """Plays back a recorded (T, 7) action array; holds still (zero deltas, last gripper) after it."""

    spec = ObservationSpec()

    def __init__(self, actions):
        self.actions = np.asarray(actions, dtype=np.float32).reshape(-1, ACTION_DIM)
        self.t = 0

    def reset(self, instruction: str) -> None:
        self.t = 0

    def act(self, obs: dict) -> np.ndarray:
        if self.t < len(self.actions):
            action = self.actions[self.t]
        else:
            action = np.zeros(ACTION_DIM, dtype=np.float32)
            action[6] = self.actions[-1, 6] if len(self.actions) else 1.0
        self.t += 1
        return action
