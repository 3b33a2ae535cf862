"""RT-2 action tokens: each action dimension is normalised to [-1, 1] with the dataset's 1 % / 99 %
quantiles (OpenVLA), clipped, and cut into `bins` equal bins; bin b of a dimension decodes to the
bin's centre. In the LM vocabulary bin b is the token id `TokenIds.action_offset + b`."""
from __future__ import annotations

import numpy as np

from vla.contracts.action import ACTION_DIM

MIN_RANGE = 1e-6  # a dimension that never varies (q01 == q99) decodes to its constant value


class ActionTokenizer:
    def __init__(self, low, high, bins: int = 256):
        low, high = np.asarray(low, dtype=np.float32), np.asarray(high, dtype=np.float32)
        if low.shape != (ACTION_DIM,) or high.shape != (ACTION_DIM,):
            raise ValueError(f"action quantiles must have shape ({ACTION_DIM},), got {low.shape} and {high.shape}")
        if not (np.all(np.isfinite(low)) and np.all(np.isfinite(high)) and np.all(high >= low)):
            raise ValueError(
                f"action quantiles must be finite with q99 >= q01, got q01={low.tolist()} q99={high.tolist()}"
            )
        self.bins, self.low = bins, low
        self.range = np.maximum(high - low, MIN_RANGE)

    @classmethod
    def from_stats(cls, action_stats: dict, bins: int) -> ActionTokenizer:
        return cls(action_stats["q01"], action_stats["q99"], bins)

    @property
    def bin_width(self) -> np.ndarray:
        """Width of one bin per dimension, in action units."""
        return self.range / self.bins

    def encode(self, actions) -> np.ndarray:
        """float[..., 7] -> bins int64[..., 7] in 0..bins-1."""
        unit = np.clip((np.asarray(actions, dtype=np.float32) - self.low) / self.range, 0.0, 1.0)
        return np.minimum((unit * self.bins).astype(np.int64), self.bins - 1)

    def decode(self, bins) -> np.ndarray:
        """bins int[..., 7] -> float32[..., 7], the bin centres."""
        return (self.low + (np.asarray(bins, dtype=np.float32) + 0.5) / self.bins * self.range).astype(np.float32)
