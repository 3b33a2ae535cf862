"""Policies that need no model: the scripted expert, uniform random actions, replay of an action list."""
from __future__ import annotations

import numpy as np

from sim.contracts import ACTION_DIM, ACTION_HIGH, ACTION_LOW
from sim.expert import ScriptedExpert


class ExpertPolicy(ScriptedExpert):
    """The privileged scripted expert; it reads the simulator state of `env`."""


class RandomPolicy:
    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)

    def reset(self, instruction: str) -> None:
        pass

    def act(self, obs: dict) -> np.ndarray:
        return self.rng.uniform(ACTION_LOW, ACTION_HIGH).astype(np.float32)


class ReplayPolicy:
    """Plays back a recorded (T, 7) action array; holds still (zero deltas, last gripper) after it."""

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
