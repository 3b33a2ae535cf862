"""Pretrained backbones from local directories (saved with save_pretrained; no download): a vision
encoder for `vision: pretrained` (SigLIP, CLIP, DINOv2, ViT), or a whole vision-language model for
`vision: vlm` (Idefics3/SmolVLM, PaliGemma, Qwen2-VL, Qwen2.5-VL), whose vision tower and connector
become the image encoder while its language model reads our multimodal sentence.

Each VLM family's image path is rewritten here with static shapes (one image size per model, the
batch as the only free axis), so that it exports to ONNX and runs in CUDA graphs: transformers' own
get_image_features drops all-zero images with boolean indexing (Idefics3) or splits a packed batch
with Python loops over tensor values (Qwen). Each matches get_image_features exactly.

Images follow the backbone's own image processor config (preprocessor_config.json): its rescale and
mean/std, folded into the model (Normalise) so that the model's input stays uint8, and its size as
the largest image_size (a smaller one, a multiple of the pixels per token, interpolates the tower's
position embeddings: fewer image tokens, a smaller dataset; simulated cameras render it directly).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel
from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision
from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

from vla.model.config import ModelConfig

VLM_FAMILIES = ("idefics3", "smolvlm", "paligemma", "qwen2_vl", "qwen2_5_vl")
VISION_ENCODERS = ("siglip_vision_model", "clip_vision_model", "dinov2", "dinov2_with_registers", "vit")
DUAL_ENCODERS = ("siglip", "clip")  # text + vision checkpoints: only the vision tower is loaded
MROPE_FAMILIES = ("qwen2_vl", "qwen2_5_vl")


class BackboneError(ValueError):
    """A pretrained directory that cannot be used (one line: the problem and what is supported)."""


# ---- what a directory holds ------------------------------------------------------------------------
def _model_type(path: str, field: str) -> tuple[str, bool]:
    """(model_type, has a vision_config) of the checkpoint in `path`, given as model.`field`."""
    where = f"model.{field}: {path!r}"
    config = Path(path, "config.json")
    if not config.is_file():
        raise BackboneError(f"{where} has no config.json (expected a local directory saved with save_pretrained)")
    if not any(Path(path).glob("*.safetensors")):
        raise BackboneError(f"{where} has no *.safetensors weights (pickled .bin weights are refused)")
    try:
        raw = json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BackboneError(f"{where}: config.json is not valid JSON ({exc})") from None
    return str(raw.get("model_type")), "vision_config" in raw


def check_language_model(config: ModelConfig) -> None:
    """`config.pretrained` is a VLM of a supported family (vision: vlm) or a text-only causal LM."""
    kind, multimodal = _model_type(config.pretrained, "pretrained")
    where = f"model.pretrained: {config.pretrained!r} (model_type {kind!r})"
    vision_encoder = kind in VISION_ENCODERS + DUAL_ENCODERS
    if config.vision == "vlm" and kind not in VLM_FAMILIES:
        what = "a vision encoder" if vision_encoder else "an unsupported VLM" if multimodal else "a text-only model"
        raise BackboneError(f"{where} is {what}, not a VLM of a supported family ({', '.join(VLM_FAMILIES)})")
    if config.vision == "vlm":
        return
    if vision_encoder:
        raise BackboneError(f"{where} is a vision encoder, not a language model: give it as model.vision_pretrained")
    if kind in VLM_FAMILIES:
        raise BackboneError(f"{where} is a VLM: set model.vision: vlm to use its vision tower")
    if multimodal:
        raise BackboneError(f"{where} is an unsupported VLM; supported VLM families: {', '.join(VLM_FAMILIES)}")


def check_vision_encoder(path: str) -> str:
    """`path` holds a vision encoder of a supported type: -> its model_type."""
    kind, _ = _model_type(path, "vision_pretrained")
    if kind in VLM_FAMILIES:
        raise BackboneError(f"model.vision_pretrained: {path!r} is a VLM ({kind}): give it as model.pretrained "
                            "with vision: vlm")
    if kind not in VISION_ENCODERS + DUAL_ENCODERS:
        raise BackboneError(f"model.vision_pretrained: {path!r} (model_type {kind!r}) is not a supported vision "
                            f"encoder ({', '.join(VISION_ENCODERS + DUAL_ENCODERS)})")
    return kind


def load_vision_encoder(path: str) -> nn.Module:
    """The vision encoder in `path` (of a full CLIP/SigLIP checkpoint: its vision tower alone)."""
    kind = check_vision_encoder(path)
    config = AutoConfig.from_pretrained(path)
    config = config.vision_config if kind in DUAL_ENCODERS else config  # skips the text tower's weights
    tower, info = AutoModel.from_pretrained(path, config=config, dtype=torch.float32, output_loading_info=True)
    # never train on a silently random tower (pooling heads are not used: ViT classifiers ship none)
    missing = [k for k in info["missing_keys"] if not k.startswith(("pooler.", "head."))]
    if missing:
        raise BackboneError(f"model.vision_pretrained: {path!r} lacks {len(missing)} weights, e.g. {missing[:3]}")
    return tower


def image_statistics(config: ModelConfig) -> dict:
    """The normalisation of the pretrained image encoder's image processor, as mean and std per
    channel in pixel values (0..255), after checking the directory and that it takes images of
    config.image_size (before any weights are read)."""
    if config.vision == "pretrained":
        path = config.vision_pretrained
        check_vision_encoder(path)
    else:
        path = config.pretrained
        check_language_model(config)
    raw = _image_processor(path)
    _check_image_size(raw, path, config.image_size)
    rescale = raw.get("rescale_factor", 1 / 255) if raw.get("do_rescale", True) else 1.0
    if not raw.get("do_normalize", True):
        mean, std = 0.0, 1.0
    elif "image_mean" in raw and "image_std" in raw:
        mean, std = raw["image_mean"], raw["image_std"]
    else:
        raise BackboneError(f"{path!r}: the image processor config names no image_mean and image_std")
    # (x * rescale - mean) / std == (x - mean / rescale) / (std / rescale)
    return {"mean": (np.broadcast_to(mean, 3) / rescale).tolist(), "std": (np.broadcast_to(std, 3) / rescale).tolist()}


def _image_processor(path: str) -> dict:
    """preprocessor_config.json (hub layout), or the image_processor entry of processor_config.json
    (what transformers 5 writes); read as JSON: no processor class (nor torchvision) is needed."""
    files = (Path(path, "preprocessor_config.json"), Path(path, "processor_config.json"))
    for file in files:
        if file.is_file():
            try:
                raw = json.loads(file.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise BackboneError(f"{file}: not valid JSON ({exc})") from None
            raw = raw.get("image_processor", raw) if file.name == "processor_config.json" else raw
            if isinstance(raw, dict):
                return raw
    raise BackboneError(f"{path!r} has no preprocessor_config.json (its image processor config: size, mean, std)")


def _check_image_size(raw: dict, path: str, image_size: int) -> None:
    if "merge_size" in raw:  # Qwen: any multiple of patch x merge pixels within a pixel count
        factor = raw["patch_size"] * raw["merge_size"]
        low = raw.get("min_pixels", raw.get("size", {}).get("shortest_edge", 0))
        high = raw.get("max_pixels", raw.get("size", {}).get("longest_edge", image_size**2))
        if image_size % factor or not low <= image_size**2 <= high:
            raise BackboneError(f"model.image_size is {image_size}, but {path!r} takes sides that are multiples of "
                                f"{factor} pixels, {low}..{high} pixels per image")
        return
    side = min(_processor_size(raw))
    if image_size > side:
        raise BackboneError(f"model.image_size is {image_size}, but {path!r} takes images of at most {side} x {side} "
                            f"(its image processor config; smaller ones interpolate its position embeddings)")


def _processor_size(raw: dict) -> tuple[int, int]:
    """The (height, width) the network sees. A processor's centre crop (CLIP, DINOv2) is not copied:
    the whole camera image is resized (a crop would cut off the workspace's border)."""
    if raw.get("do_center_crop") and "crop_size" in raw:
        size = raw["crop_size"]
    else:  # Idefics3/SmolVLM: one tile of max_image_size (a robot camera is not split into tiles)
        size = raw.get("max_image_size", raw.get("size", {}))
    if isinstance(size, int):
        return size, size
    if "height" in size:
        return size["height"], size["width"]
    edge = size.get("shortest_edge", size.get("longest_edge", 0))  # of a square camera image: both sides
    return edge, edge


def check_patch_size(config: ModelConfig, pixels: int, what: str) -> None:
    """config.patch_size must be the backbone's pixels per image token side."""
    if config.patch_size != pixels:
        raise BackboneError(f"model.patch_size is {config.patch_size}, but each image token of {what} covers "
                            f"{pixels} x {pixels} pixels: set model.patch_size: {pixels}")


# ---- the model pieces ----------------------------------------------------------------------------
class Normalise(nn.Module):
    """uint8 [B, H, W, 3] -> float [B, 3, H, W], normalised as the backbone's image processor does.
    `stats`: mean and std per channel in pixel values (config.json's stats.image)."""

    def __init__(self, stats: dict | None):
        super().__init__()
        try:
            mean, std = (np.asarray(stats[k], dtype=np.float32) for k in ("mean", "std"))
        except (TypeError, KeyError, ValueError):
            mean = std = np.zeros(0, np.float32)
        if mean.shape != (3,) or std.shape != (3,) or not np.all(np.isfinite(mean)) or not np.all(std > 0):
            raise ValueError(f"stats.image must hold 3 finite means and 3 positive stds (the backbone's image "
                             f"normalisation), got {stats!r}")
        # Not persistent: the statistics live in config.json.
        self.register_buffer("scale", torch.from_numpy(1 / std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", torch.from_numpy(-mean / std).view(1, 3, 1, 1), persistent=False)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return image.permute(0, 3, 1, 2).float() * self.scale + self.shift


def vlm_image_encoder(vlm: nn.Module, config: ModelConfig, stats: dict | None) -> nn.Module:
    """The VLM's vision tower + connector: uint8 [B, H, W, 3] -> [B, config.image_tokens, hidden]."""
    family = vlm.config.model_type
    if family not in VLM_FAMILIES:
        raise ValueError(f"vision: vlm needs a VLM of a supported family ({', '.join(VLM_FAMILIES)}), got {family!r}")
    encoder = {"idefics3": IdeficsVision, "smolvlm": IdeficsVision, "paligemma": PaliGemmaVision,
               "qwen2_vl": QwenVision, "qwen2_5_vl": QwenVision}[family](vlm, config.image_size, Normalise(stats))
    check_patch_size(config, encoder.pixels_per_token, f"this {family} model")
    return encoder


class IdeficsVision(nn.Module):
    """Idefics3 / SmolVLM: SigLIP with bucketed positions, then pixel shuffle + linear (connector).
    One tile, as SmolVLA uses it. The position ids of an unpadded image are a constant here, computed
    with the tower's own rule."""

    def __init__(self, vlm, image_size: int, normalise: Normalise):
        super().__init__()
        self.normalise, self.tower, self.connector = normalise, vlm.model.vision_model, vlm.model.connector
        vision = vlm.config.vision_config
        self.pixels_per_token = vision.patch_size * vlm.config.scale_factor
        n, full = image_size // vision.patch_size, vision.image_size // vision.patch_size
        with torch.device("cpu"):  # also when the model is built on "meta" (checkpoint shape checks)
            boundaries = torch.arange(1 / full, 1.0, 1 / full)
            rows = torch.bucketize((torch.arange(n) / n).clamp(max=1 - 1e-6), boundaries, right=True)
            positions = (rows[:, None] * full + rows[None, :]).reshape(1, -1)
        self.register_buffer("position_ids", positions, persistent=False)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        embeddings = self.tower.embeddings
        x = embeddings.patch_embedding(self.normalise(image).to(embeddings.patch_embedding.weight.dtype))
        x = x.flatten(2).transpose(1, 2) + embeddings.position_embedding(self.position_ids)
        x = self.tower.encoder(inputs_embeds=x, attention_mask=None).last_hidden_state
        return self.connector(self.tower.post_layernorm(x))


class PaliGemmaVision(nn.Module):
    """PaliGemma: SigLIP's patch features, then a linear projector (connector)."""

    def __init__(self, vlm, image_size: int, normalise: Normalise):
        super().__init__()
        self.normalise, self.tower, self.connector = normalise, vlm.model.vision_tower, vlm.model.multi_modal_projector
        vision = vlm.config.vision_config
        self.pixels_per_token = vision.patch_size
        self.options = {"interpolate_pos_encoding": True} if image_size != vision.image_size else {}

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.connector(self.tower(self.normalise(image), **self.options).last_hidden_state)


class QwenVision(nn.Module):
    """Qwen2-VL / Qwen2.5-VL: the image processor's patchify in torch, then the ViT run batched as
    [B, N, D] with SDPA (transformers packs the batch into one sequence and splits it with Python
    loops over tensor values, which neither exports nor captures), Qwen2.5's windowed blocks with a
    constant block-diagonal mask, and the 2 x 2 patch merger (connector). Rotary tables, window
    order and mask are constants of the image size, built with transformers' own helpers."""

    def __init__(self, vlm, image_size: int, normalise: Normalise):
        super().__init__()
        self.normalise, self.tower = normalise, vlm.model.visual
        self.connector = self.tower.merger
        v = vlm.config.vision_config
        self.patch, self.merge, self.temporal = v.patch_size, v.spatial_merge_size, v.temporal_patch_size
        self.pixels_per_token = self.patch * self.merge
        self.side = image_size // self.patch  # patches per image side
        self.n = self.side**2
        with torch.device("cpu"):  # also when the model is built on "meta" (checkpoint shape checks)
            self._constants()

    def _constants(self) -> None:
        grid = torch.tensor([[1, self.side, self.side]])
        rotary = self.tower.rotary_pos_emb
        if rotary.inv_freq.is_meta:  # a skeleton for checking shapes: the tables' values do not matter
            rotary = copy.deepcopy(rotary).to_empty(device="cpu")
        cos, sin = rotary(torch.zeros(1), get_vision_position_ids(grid, self.merge))
        self.windowed = hasattr(self.tower, "fullatt_block_indexes")  # Qwen2.5-VL
        if self.windowed:
            order, bounds = get_vision_window_index(grid, self.merge, self.tower.window_size, self.patch)
            unit = self.merge**2
            cos = cos.view(-1, unit, cos.shape[-1])[order].reshape(self.n, -1)
            sin = sin.view(-1, unit, sin.shape[-1])[order].reshape(self.n, -1)
            window = torch.zeros(self.n, dtype=torch.long)
            for i, (start, end) in enumerate(zip(bounds[:-1].tolist(), bounds[1:].tolist())):
                window[start:end] = i
            self.register_buffer("window_order", order, persistent=False)
            self.register_buffer("restore_order", torch.argsort(order), persistent=False)
            self.register_buffer("window_mask", (window[:, None] == window[None, :])[None, None], persistent=False)
            self.full_blocks = set(self.tower.fullatt_block_indexes)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def patchify(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, N, 3 * T * P * P] in the processor's order (the still image T times)."""
        b, c = pixels.shape[:2]
        m, p, s = self.merge, self.patch, self.side
        x = pixels.reshape(b, c, s // m, m, p, s // m, m, p).permute(0, 2, 5, 3, 6, 1, 4, 7)
        x = x.unsqueeze(6).expand(-1, -1, -1, -1, -1, -1, self.temporal, -1, -1)
        return x.reshape(b, self.n, c * self.temporal * p * p)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        patches = self.patchify(self.normalise(image))
        b, unit = patches.shape[0], self.merge**2
        x = self.tower.patch_embed(patches.reshape(b * self.n, -1)).view(b, self.n, -1)
        if self.windowed:
            x = x.view(b, self.n // unit, unit, -1)[:, self.window_order].reshape(b, self.n, -1)
        for i, block in enumerate(self.tower.blocks):
            attention = block.attn
            q, k, v = attention.qkv(block.norm1(x)).view(b, self.n, 3, attention.num_heads, -1).unbind(2)
            q, k = apply_rotary_pos_emb_vision(q, k, self.cos, self.sin)
            mask = self.window_mask if self.windowed and i not in self.full_blocks else None
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 attn_mask=mask)
            x = x + attention.proj(out.transpose(1, 2).reshape(b, self.n, -1))
            x = x + block.mlp(block.norm2(x))
        merged = self.connector(x).view(b, self.n // unit, -1)
        return merged[:, self.restore_order] if self.windowed else merged


def mrope_positions(mask: torch.Tensor, is_image: torch.Tensor, side: int) -> torch.Tensor:
    """Qwen2-VL's M-RoPE position ids [3, B, L] (temporal, row, column) of a sequence where each run
    of side x side image tokens is one image, with static-shape tensor ops; the values of
    Qwen2VLModel.get_rope_index: a text token at p is (p, p, p), token k of an image starting at p is
    (p, p + k // side, p + k % side), and the text after an image resumes at p + side."""
    n = side * side
    index = mask.long().cumsum(1) - 1  # 1-D position, padding skipped
    image = is_image.long() & mask.long()
    before = image.cumsum(1) - image  # image tokens strictly before
    start = index - before + (before // n) * side  # of a text token: its position; of an image token: its image's
    k = before % n
    row = torch.where(image.bool(), start + k // side, start)
    column = torch.where(image.bool(), start + k % side, start)
    return torch.stack([start, row, column]).clamp(min=0)
