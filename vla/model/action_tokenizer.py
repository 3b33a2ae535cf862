"""RT-2 action tokens: each action dimension is normalised to [-1, 1] with the dataset's 1 % / 99 %
quantiles (OpenVLA), clipped, and cut into `bins` equal bins; bin b of a dimension decodes to the
bin's centre. In the LM vocabulary bin b is the token id `offset + b` (see VLAModel)."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from sim.contracts import ACTION_DIM

MIN_RANGE = 1e-6  # a dimension that never varies (q01 == q99) decodes to its constant value


class ActionTokenizer(nn.Module):
    def __init__(self, low, high, bins: int = 256):
        super().__init__()
        low, high = np.asarray(low, dtype=np.float32), np.asarray(high, dtype=np.float32)
        if low.shape != (ACTION_DIM,) or high.shape != (ACTION_DIM,):
            raise ValueError(f"action quantiles must have shape ({ACTION_DIM},), got {low.shape} and {high.shape}")
        if not (np.all(np.isfinite(low)) and np.all(np.isfinite(high)) and np.all(high >= low)):
            raise ValueError(f"action quantiles must be finite with q99 >= q01, got q01={low.tolist()} q99={high.tolist()}")
        self.bins = bins
        # Not persistent: the quantiles live in config.json with the other statistics.
        self.register_buffer("low", torch.from_numpy(low), persistent=False)
        self.register_buffer("range", torch.from_numpy(np.maximum(high - low, MIN_RANGE)), persistent=False)

    @classmethod
    def from_stats(cls, action_stats: dict, bins: int) -> "ActionTokenizer":
        return cls(action_stats["q01"], action_stats["q99"], bins)

    @property
    def bin_width(self) -> torch.Tensor:
        """Width of one bin per dimension, in action units."""
        return self.range / self.bins

    def encode(self, actions: torch.Tensor) -> torch.Tensor:
        """float[..., 7] -> bins int64[..., 7] in 0..bins-1."""
        unit = ((actions - self.low) / self.range).clamp(0.0, 1.0)  # = (normalised + 1) / 2
        return (unit * self.bins).long().clamp(max=self.bins - 1)

    def decode(self, bins: torch.Tensor) -> torch.Tensor:
        """bins int[..., 7] -> float32[..., 7], the bin centres."""
        return self.low + (bins.float() + 0.5) / self.bins * self.range
