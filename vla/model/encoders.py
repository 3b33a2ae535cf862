"""Sensor encoders, each ending in a projector to the LM's hidden size (PaLM-E): camera image ->
patch tokens (from scratch, or a pretrained vision encoder's), proprioceptive state -> one token,
IMU window -> one token."""
from __future__ import annotations

import itertools
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vla.model.config import ModelConfig
from vla.model.vlm import Normalise, check_patch_size

STD_FLOOR = 1e-2  # dimensions (nearly) constant in the data must not blow up when they do vary
NORMALISED_CLIP = 10.0


def projector(width: int, hidden: int) -> nn.Sequential:
    """Two-layer MLP into the LM's embedding space (LLaVA-1.5)."""
    return nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, hidden))


class ImageEncoder(nn.Module):
    """uint8[B, H, W, 3] (+ the instruction's summary [B, hidden]) -> [B, config.image_tokens, hidden].

    "cnn": log2(patch) stride-2 3x3 convolutions, cheap and data-efficient for small images.
    "vit": a patch embedding followed by `vision_layers` transformer layers.
    "keypoints": convolutions to a quarter of the resolution, then a spatial softmax per channel:
    token k = (expected x, expected y, peak) of channel k, plus an embedding of k. Where things
    are is what a reaching policy needs, and keypoints give it directly (as robomimic does).
    All see two extra input channels with the pixel coordinates (CoordConv): convolutions alone are
    blind to absolute position, which decides the action. With `vision_film`, every convolution's
    output is modulated by the instruction (FiLM, as RT-1), so the encoder can pick out the named
    object itself instead of leaving that binding to attention, which learns it far more slowly."""

    def __init__(self, config: ModelConfig, hidden: int):
        super().__init__()
        self.vision, width = config.vision, config.vision_width
        axis = torch.linspace(-1.0, 1.0, config.image_size)
        self.register_buffer(
            "coordinates", torch.stack(torch.meshgrid(axis, axis, indexing="ij"))[None], persistent=False
        )
        if config.vision == "cnn":
            n = int(math.log2(config.patch_size))
            channels = [5] + [max(16, width >> (n - 1 - i)) for i in range(n)]
            self.convs = ConvStack(channels, hidden if config.vision_film else 0)
            self.head = nn.Conv2d(channels[-1], width, 1)
        elif config.vision == "keypoints":
            self.convs = ConvStack(
                [5, width // 2, width, width], hidden if config.vision_film else 0, strides=(2, 2, 1)
            )
            self.head = nn.Conv2d(width, config.keypoints, 1)
            self.keypoint = nn.Linear(3, width)
        else:
            self.convs = None
            self.head = nn.Conv2d(5, width, config.patch_size, stride=config.patch_size)
            layer = nn.TransformerEncoderLayer(
                width, max(1, width // 32), 4 * width, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
            )
            self.blocks = nn.Sequential(
                nn.TransformerEncoder(layer, config.vision_layers, enable_nested_tensor=False), nn.LayerNorm(width)
            )
        self.merge = config.token_merge if config.vision == "cnn" else 1
        token_width = width * self.merge**2
        self.position = nn.Parameter(torch.randn(config.image_tokens, token_width) * 0.02)  # patch or keypoint id
        self.project = projector(token_width, hidden)

    def forward(self, image: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        x = image.permute(0, 3, 1, 2).float() / 127.5 - 1.0
        x = torch.cat([x, self.coordinates.expand(x.shape[0], -1, -1, -1)], dim=1)
        x = self.head(x if self.convs is None else self.convs(x, condition))
        if self.vision == "keypoints":
            x = self.keypoint(spatial_softmax(x))
        else:
            if self.merge > 1:
                x = F.pixel_unshuffle(x, self.merge)  # [B, width * m^2, H / m, W / m]
            x = x.flatten(2).transpose(1, 2)  # [B, patches, width]
        x = x + self.position
        return self.project(self.blocks(x) if self.vision == "vit" else x)


# Pooling heads of vision encoders feed no patch feature: frozen, so that DDP waits for no gradient of theirs.
POOLING_HEADS = {"clip_vision_model": "vision_model.post_layernorm", "siglip_vision_model": "vision_model.head",
                 "vit": "pooler"}


class PretrainedImageEncoder(nn.Module):
    """uint8[B, H, W, 3] -> [B, config.image_tokens, hidden]: a pretrained transformers vision
    encoder (vlm.load_vision_encoder), normalised as its image processor does, its last layer's patch
    features (CLS and register tokens dropped) and a projector (LLaVA-1.5)."""

    def __init__(self, config: ModelConfig, tower: nn.Module, stats: dict | None, hidden: int):
        super().__init__()
        c = tower.config
        check_patch_size(config, c.patch_size, f"this {c.model_type} encoder")
        self.normalise, self.tower, self.tokens = Normalise(stats), tower, config.image_tokens
        pooling = dict(tower.named_modules()).get(POOLING_HEADS.get(c.model_type))
        if pooling is not None:
            pooling.requires_grad_(False)
        # a size other than the tower's own interpolates its position embeddings (DINOv2 always does)
        resize = not c.model_type.startswith("dinov2") and config.image_size != c.image_size
        self.options = {"interpolate_pos_encoding": True} if resize else {}
        self.project = projector(c.hidden_size, hidden)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        features = self.tower(pixel_values=self.normalise(image), **self.options).last_hidden_state
        return self.project(features[:, -self.tokens :])  # the patches follow the CLS and register tokens


class ConvStack(nn.Module):
    """3x3 convolutions (stride 2 unless told) with GroupNorm and GELU, optionally FiLM-modulated
    by a condition vector: x <- x * (1 + gamma) + beta, starting as the identity."""

    def __init__(self, channels: list[int], condition_size: int, strides: tuple[int, ...] | None = None):
        super().__init__()
        pairs = list(itertools.pairwise(channels))
        strides = strides or (2,) * len(pairs)
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, stride=s, padding=1) for (a, b), s in zip(pairs, strides))
        self.norms = nn.ModuleList(nn.GroupNorm(8, b) for _, b in pairs)
        self.films = nn.ModuleList(nn.Linear(condition_size, 2 * b) for _, b in pairs) if condition_size else None
        for film in self.films or ():
            nn.init.zeros_(film.weight)
            nn.init.zeros_(film.bias)

    def forward(self, x: torch.Tensor, condition: torch.Tensor | None) -> torch.Tensor:
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            x = conv(x)
            if self.films is None:
                x = norm(x)
            else:
                # GroupNorm's affine and FiLM folded into one per-sample scale and shift: the same
                # function as norm(x) * (1 + gamma) + beta, two fewer passes over the feature map.
                gamma, beta = self.films[i](condition).chunk(2, dim=1)
                scale, shift = norm.weight * (1 + gamma), norm.bias * (1 + gamma) + beta
                x = torch.addcmul(shift[:, :, None, None], F.group_norm(x, norm.num_groups, eps=norm.eps),
                                  scale[:, :, None, None])
            x = F.gelu(x)
        return x


def spatial_softmax(features: torch.Tensor) -> torch.Tensor:
    """[B, K, H, W] -> [B, K, 3]: each channel's softmax-weighted mean (x, y) in [-1, 1] and its peak."""
    b, k, h, w = features.shape
    weights = features.flatten(2).softmax(-1).view(b, k, h, w)
    ys = torch.linspace(-1.0, 1.0, h, device=features.device)
    xs = torch.linspace(-1.0, 1.0, w, device=features.device)
    x = (weights.sum(2) * xs).sum(-1)
    y = (weights.sum(3) * ys).sum(-1)
    return torch.stack([x, y, features.flatten(2).amax(-1)], dim=-1)


class VectorEncoder(nn.Module):
    """A float sensor reading (state [D] or IMU window [W, C]) -> one token [B, 1, hidden]. It is
    normalised per channel with dataset statistics (mean/std of the last axis) first."""

    def __init__(self, shape: tuple[int, ...], mean, std, hidden: int):
        super().__init__()
        mean, std = np.asarray(mean, dtype=np.float32), np.asarray(std, dtype=np.float32)
        if mean.shape != (shape[-1],) or std.shape != (shape[-1],):
            raise ValueError(
                f"normalisation statistics must have shape ({shape[-1]},), got {mean.shape} and {std.shape}"
            )
        self.shape = tuple(shape)
        # Not persistent: the statistics live in config.json.
        self.register_buffer("mean", torch.from_numpy(mean), persistent=False)
        self.register_buffer("std", torch.from_numpy(np.maximum(std, STD_FLOOR)), persistent=False)
        self.project = projector(int(np.prod(shape)), hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = ((x.float() - self.mean) / self.std).clamp(-NORMALISED_CLIP, NORMALISED_CLIP)
        return self.project(x.flatten(1)).unsqueeze(1)
