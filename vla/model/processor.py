"""The processor: the one pipeline between observations and the model's tensors, and between action
bins and actions. It is saved with the checkpoint (config.json: the model config and the dataset's
statistics; tokenizer.json: the text tokenizer; a language prior's encoder comes from its installed
package), so training, evaluation, export validation and the
ROS node all feed the model the same pixels and tokens and read the same actions back.

    observations (vla.contracts)   --inputs()-->   VLAModel.forward_parallel / generate_autoregressive
    training samples (vla.data)    --batch()-->    the same + target action bins, for VLAModel.forward
    action bins                    --actions()-->  float32[B, k, 7] inside the action limits

Each step happens here once: images are fitted to the model's size (vla.images.fit_image), state
and IMU readings are checked (finite and plausible: vla.contracts.observation), instructions are
normalised and tokenised (vla.model.text), actions are cut into bins with the dataset's quantiles
and bins become actions clipped to the limits. Normalising state and IMU with the dataset's mean
and std is the encoders' first layer, so that it is part of the exported graph.
"""
from __future__ import annotations

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from vla.contracts.action import ACTION_DIM, clip_action
from vla.contracts.observation import (
    IMU_CHANNELS,
    IMU_LIMITS,
    INSTRUCTION_MAX_LENGTH,
    MAX_IMAGE_SIDE,
    STATE_LIMIT,
    checked_reading,
)
from vla.images import fit_image
from vla.model.action_tokenizer import ActionTokenizer
from vla.model.config import ModelConfig
from vla.model.language_prior import LanguagePrior
from vla.model.text import PromptEncoder, TokenIds, normalize_instruction


class Processor:
    """`vocabulary`: the words of the instructions the model was trained on (None: not known, as for
    checkpoints from before it was kept)."""

    def __init__(self, config: ModelConfig, stats: dict, tokenizer: PreTrainedTokenizerBase,
                 vocabulary: frozenset[str] | None = None):
        self.config, self.stats, self.tokenizer, self.vocabulary = config, stats, tokenizer, vocabulary
        self.prior = LanguagePrior(config.language_prior, config.max_text_tokens) if config.language_prior else None
        self.prompt = PromptEncoder(tokenizer, config, self.prior)
        self.action_tokenizer = ActionTokenizer.from_stats(stats["action"], config.action_bins)

    def unknown_words(self, instruction: str) -> list[str]:
        """The words of `instruction` that no training instruction used, in order (the model still
        acts on it: what it makes of them is its guess)."""
        if self.vocabulary is None:
            return []
        return list(dict.fromkeys(w for w in normalize_instruction(instruction).split() if w not in self.vocabulary))

    @property
    def ids(self) -> TokenIds:
        return self.prompt.ids

    # ---- inference -----------------------------------------------------------------------------
    def inputs(self, observations: dict | list[dict], device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """Observations (images of any size) -> the model's input tensors on `device`; ValueError
        naming the key for anything unusable (missing, wrong type or shape, NaN/inf, implausible)."""
        observations = _observation_list(observations)
        c = self.config
        inputs = {"image": self._images(observations, "image")}
        if c.wrist_camera:
            inputs["wrist_image"] = self._images(observations, "wrist_image")
        inputs["state"] = torch.from_numpy(np.stack(
            [checked_reading("state", obs.get("state"), (c.state_dim,), STATE_LIMIT) for obs in observations]))
        inputs["imu"] = torch.from_numpy(np.stack(
            [checked_reading("imu", obs.get("imu"), (c.imu_window, IMU_CHANNELS), IMU_LIMITS) for obs in observations]))
        inputs.update(self._text([instruction(obs) for obs in observations]))
        return {name: tensor.to(device) for name, tensor in inputs.items()}

    def _images(self, observations: list[dict], key: str) -> torch.Tensor:
        images = []
        for obs in observations:
            image = obs.get(key)
            image = image if isinstance(image, np.ndarray) else None
            if image is None or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
                got = (
                    "nothing"
                    if obs.get(key) is None
                    else f"{getattr(image, 'dtype', type(obs.get(key)).__name__)} {getattr(image, 'shape', '')}"
                )
                raise ValueError(f"observation {key!r} must be a uint8 [H, W, 3] RGB array, got {got}")
            if not (0 < image.shape[0] <= MAX_IMAGE_SIDE and 0 < image.shape[1] <= MAX_IMAGE_SIDE):
                raise ValueError(f"observation {key!r} has an unusable size {image.shape[1]}x{image.shape[0]}")
            images.append(fit_image(image, self.config.image_size))
        return torch.from_numpy(np.stack(images))

    def actions(self, bins: torch.Tensor) -> np.ndarray:
        """Action bins int[B, k * 7] -> action chunks float32[B, k, 7] inside the action limits,
        whatever the statistics say."""
        bins = bins.detach().cpu().numpy().reshape(len(bins), self.config.chunk, ACTION_DIM)
        return clip_action(self.action_tokenizer.decode(bins))

    # ---- training -----------------------------------------------------------------------------
    def batch(self, samples: dict) -> dict[str, torch.Tensor]:
        """Training samples (vla.data.index.EpisodeIndex.batch: images already at the model's
        size) -> the keyword arguments of VLAModel.forward, on the CPU."""
        c = self.config
        images = ["image"] + (["wrist_image"] if c.wrist_camera else [])
        missing = [k for k in images + ["state", "imu", "actions", "action_mask", "instruction"] if k not in samples]
        if missing:
            raise ValueError(f"the dataset's samples lack {missing}")
        batch = {k: torch.as_tensor(np.asarray(samples[k])) for k in images + ["state", "imu", "action_mask"]}
        for key in images:
            if tuple(batch[key].shape[1:]) != (c.image_size, c.image_size, 3):
                raise ValueError(
                    f"training {key!r} must be {c.image_size}x{c.image_size} (the index's image_size), "
                    f"got {tuple(batch[key].shape[1:])}"
                )
        batch["action_bins"] = torch.from_numpy(self.action_tokenizer.encode(samples["actions"]))
        batch.update(self._text(list(samples["instruction"])))
        return batch

    def _text(self, instructions: list[str]) -> dict[str, torch.Tensor]:
        """text_ids, text_mask and, with a language prior, its states (text_features)."""
        text = dict(zip(("text_ids", "text_mask"), self.prompt.encode(instructions)))
        if self.prior is not None:
            text["text_features"] = self.prior.encode([normalize_instruction(t) for t in instructions])
        return text


def _observation_list(observations) -> list[dict]:
    if isinstance(observations, dict):
        return [observations]
    if not isinstance(observations, (list, tuple)) or not observations:
        raise ValueError(f"observations must be a dict or a non-empty list of dicts, got {_kind(observations)}")
    others = sorted({_kind(obs) for obs in observations if not isinstance(obs, dict)})
    if others:
        raise ValueError(f"each observation must be a dict, got {others}")
    return list(observations)


def _kind(value) -> str:
    return f"{type(value).__name__} {getattr(value, 'dtype', '')}".strip()


def vocabulary(instructions) -> frozenset[str]:
    """The words of `instructions`, as the processor normalises them."""
    return frozenset(word for text in instructions for word in normalize_instruction(text).split())


def instruction(observation: dict) -> str:
    """The observation's instruction, checked: a str that still says something once normalised."""
    text = observation.get("instruction")
    if not isinstance(text, str):
        raise ValueError(f"observation 'instruction' must be a str, got {type(text).__name__}")
    if len(text) > INSTRUCTION_MAX_LENGTH:
        raise ValueError(f"instruction is {len(text)} characters long (at most {INSTRUCTION_MAX_LENGTH})")
    if not normalize_instruction(text):
        raise ValueError(f"instruction is empty: {text!r}")
    return text
