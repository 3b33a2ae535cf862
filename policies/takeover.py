"""A learned policy that hands over to the scripted expert: DAgger-style corrections.

The checkpoint drives the first `expert_from` steps and the expert the rest, from whatever state the
policy left (a cube knocked aside, fingers closed on nothing). Recorded episodes hold what was
executed, so they replay exactly; training reads only the expert's steps (episode metadata
`expert_from`), which teach recovering from the states the policy itself reaches.
"""
from __future__ import annotations

import numpy as np

from policies.base import Policy


class ExpertTakeover:
    def __init__(self, policy: Policy, expert, expert_from: int):
        if expert_from < 0:
            raise ValueError(f"expert_from must be >= 0, got {expert_from}")
        self.policy, self.expert, self.expert_from = policy, expert, expert_from
        self.spec = policy.spec
        self.t, self.instruction = 0, ""

    def reset(self, instruction: str) -> None:
        self.t, self.instruction = 0, instruction
        self.policy.reset(instruction)

    def act(self, obs: dict) -> np.ndarray:
        t, self.t = self.t, self.t + 1
        if t < self.expert_from:
            return self.policy.act(obs)
        if t == self.expert_from:
            self.expert.reset(self.instruction)  # it reads the state the policy left
        return self.expert.act(obs)
