"""Sensor encoders, each ending in a projector to the LM's hidden size (PaLM-E): camera image ->
patch tokens, proprioceptive state -> one token, IMU window -> one token."""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from vla.model.config import ModelConfig

STD_FLOOR = 1e-2  # dimensions (nearly) constant in the data must not blow up when they do vary
NORMALISED_CLIP = 10.0


def projector(width: int, hidden: int) -> nn.Sequential:
    """Two-layer MLP into the LM's embedding space (LLaVA-1.5)."""
    return nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, hidden))


class ImageEncoder(nn.Module):
    """uint8[B, H, W, 3] -> [B, (H / patch)^2, hidden].

    "cnn": log2(patch) stride-2 3x3 convolutions, cheap and data-efficient for small images.
    "vit": a patch embedding followed by `vision_layers` transformer layers."""

    def __init__(self, config: ModelConfig, hidden: int):
        super().__init__()
        width, grid = config.vision_width, config.image_size // config.patch_size
        if config.vision == "cnn":
            n = int(math.log2(config.patch_size))
            channels = [3] + [max(16, width >> (n - 1 - i)) for i in range(n)]
            layers = []
            for c_in, c_out in zip(channels, channels[1:]):
                layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.GroupNorm(8, c_out), nn.GELU()]
            self.backbone = nn.Sequential(*layers, nn.Conv2d(channels[-1], width, 1))
            self.blocks = nn.Identity()
        else:
            self.backbone = nn.Conv2d(3, width, config.patch_size, stride=config.patch_size)
            layer = nn.TransformerEncoderLayer(width, max(1, width // 32), 4 * width, dropout=0.0,
                                               activation="gelu", batch_first=True, norm_first=True)
            self.blocks = nn.Sequential(nn.TransformerEncoder(layer, config.vision_layers, enable_nested_tensor=False),
                                        nn.LayerNorm(width))
        self.position = nn.Parameter(torch.randn(grid * grid, width) * 0.02)
        self.project = projector(width, hidden)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = image.permute(0, 3, 1, 2).float() / 127.5 - 1.0
        x = self.backbone(x).flatten(2).transpose(1, 2)  # [B, patches, width]
        return self.project(self.blocks(x + self.position))


class VectorEncoder(nn.Module):
    """A float sensor reading (state [D] or IMU window [W, C]) -> one token [B, 1, hidden]. It is
    normalised per channel with dataset statistics (mean/std of the last axis) first."""

    def __init__(self, shape: tuple[int, ...], mean, std, hidden: int):
        super().__init__()
        mean, std = np.asarray(mean, dtype=np.float32), np.asarray(std, dtype=np.float32)
        if mean.shape != (shape[-1],) or std.shape != (shape[-1],):
            raise ValueError(f"normalisation statistics must have shape ({shape[-1]},), got {mean.shape} and {std.shape}")
        self.shape = tuple(shape)
        # Not persistent: the statistics live in config.json.
        self.register_buffer("mean", torch.from_numpy(mean), persistent=False)
        self.register_buffer("std", torch.from_numpy(np.maximum(std, STD_FLOOR)), persistent=False)
        self.project = projector(int(np.prod(shape)), hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = ((x.float() - self.mean) / self.std).clamp(-NORMALISED_CLIP, NORMALISED_CLIP)
        return self.project(x.flatten(1)).unsqueeze(1)
