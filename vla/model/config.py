"""ModelConfig: everything needed to rebuild a VLA model's architecture (saved in config.json)."""
from __future__ import annotations

import re
from dataclasses import dataclass

from vla.contracts.action import ACTION_DIM
from vla.contracts.observation import IMAGE_SIZE, IMU_WINDOW, STATE_DIM, ObservationSpec

DECODERS = ("parallel", "autoregressive")
FILM_TEXT = ("mean", "conv")
FROM_SCRATCH_VISION = ("cnn", "vit", "keypoints")
VISION_ENCODERS = (*FROM_SCRATCH_VISION, "pretrained", "vlm")
# Upper bounds catch a damaged or mistyped config before it asks for terabytes.
SIZE_LIMITS = {"image_size": 1024, "state_dim": 1024, "imu_window": 1000, "max_text_tokens": 512, "patch_size": 256,
               "keypoints": 1024, "vision_width": 8192, "vision_layers": 64, "hidden_size": 16384, "num_layers": 256,
               "num_heads": 256, "intermediate_size": 65536, "text_vocab_size": 1 << 20, "chunk": 256,
               "gripper_open_steps": 100}
EXECUTIONS = ("ensemble", "chunk")  # how a policy plays the action chunks (ModelConfig.execution)
# Placeholders of the multimodal sentence; each is replaced by its sensor's projected tokens.
SENSOR_PLACEHOLDERS = {"image": "<image>", "wrist_image": "<wrist_image>", "state": "<state>", "imu": "<imu>"}
# Pretrained sentence encoders that can read the instruction (language_prior), and their width.
LANGUAGE_PRIORS = {"all-MiniLM-L6-v2": 384}


@dataclass
class ModelConfig:
    # ---- inputs ----
    image_size: int = IMAGE_SIZE  # square camera images are resized to this
    wrist_camera: bool = False  # needs <wrist_image> in the prompt
    state_dim: int = STATE_DIM
    imu_window: int = IMU_WINDOW
    # PaLM-E multimodal sentence. "<image>" etc. are replaced by sensor tokens, "{instruction}" by
    # the instruction's text tokens; an action-start token is appended. The model reads only the
    # sensors named here (<image> is required; <state>, <imu>, <wrist_image> are optional).
    prompt: str = "<image><state><imu>{instruction}"
    max_text_tokens: int = 12  # text tokens of the prompt; longer instructions are cut at the end
    # ---- vision ----
    # From scratch: "cnn": strided convolutions; "vit": patch embedding + transformer layers; both give
    # (image_size / patch_size)^2 patch tokens (96 / 16 -> 36). "keypoints": `keypoints` tokens,
    # the expected image position of each channel of a convolutional feature map (spatial softmax).
    # Pretrained: "pretrained": the transformers vision encoder (SigLIP, CLIP, DINOv2, ViT) in the local
    # directory `vision_pretrained`, its patch features projected to the LM's hidden size; "vlm": the
    # vision tower and connector of the VLM in `pretrained`. Both take images of the size their image
    # processor config names (set image_size to it) and give (image_size / patch_size)^2 tokens, with
    # patch_size the pixels per token side (SigLIP-B/16: 16; SmolVLM: 16 x pixel shuffle 4 = 64;
    # Qwen2-VL: 14 x merge 2 = 28); a mismatch is refused with the values to set.
    vision: str = "cnn"
    vision_pretrained: str = ""
    patch_size: int = 16
    keypoints: int = 32
    vision_width: int = 64
    vision_layers: int = 2  # transformer layers of the "vit" encoder
    # "cnn": merge each m x m block of patches into one token, their features concatenated (Qwen2-VL's
    # patch merger): m^2 times fewer image tokens for the LM, which is most of the compute.
    token_merge: int = 1
    vision_film: bool = True  # condition the convolutions on the instruction (FiLM, RT-1)
    # The FiLM condition: "mean", the mean text embedding (a bag of words: "red cube in the blue bin"
    # = "blue cube in the red bin"); "conv", the mean of a width-3 convolution over the text
    # embeddings (a bag of word triples: "red cube" and "blue bin" stay apart).
    film_text: str = "mean"
    # The FiLM condition also holds the gripper's width (from the state: open, holding a cube, or
    # closed on nothing), so that the convolutions can look for the object while the hand is empty
    # and for the destination once it holds it (place's phases).
    film_gripper: bool = False
    # How: False adds an MLP of the width to the instruction's summary; True scales the summary by
    # (1 + MLP), so that the width can re-weight what the instruction asks for but never stand in
    # for it (added, it let some seeds learn the phase before the words, and never ground them).
    film_gripper_gate: bool = False
    # In training, the share of samples whose FiLM condition leaves the width out (modality dropout):
    # the convolutions must then find the object from the words alone, so the width cannot stand in
    # for them (as it did, added, for seeds 1 and 2 of all-tasks-cpu.yaml: the instruction's share of
    # the FiLM condition fell to nothing and the policy never grounded its words).
    film_gripper_dropout: float = 0.0
    # ---- language model ----
    # Built from a transformers config of this model type and trained from scratch, unless
    # `pretrained` names a local directory holding a causal LM or, with vision: vlm, a VLM
    # (Idefics3/SmolVLM, PaliGemma, Qwen2-VL, Qwen2.5-VL), and its tokenizer.
    lm_type: str = "llama"
    pretrained: str = ""
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 384
    text_vocab_size: int = 512  # byte-level BPE trained on the task instructions (from scratch only)
    # "" (the instruction's tokens are the LM's own, learned from scratch) or a pretrained sentence
    # encoder of LANGUAGE_PRIORS: its states per word piece, projected, take the text tokens' places
    # (vla.model.language_prior; max_text_tokens counts its word pieces).
    language_prior: str = ""
    # ---- actions ----
    chunk: int = 4  # predict this many future actions per step (more supervision per sample, too)
    action_bins: int = 256
    decoders: tuple[str, ...] = ("parallel",)  # trained decoders; the first is the default at inference
    # How a policy executes the chunks (policies.vla_policy): "ensemble", a chunk every step, their
    # predictions for now averaged (ACT); "chunk", a chunk played open-loop, then the next. Part of
    # the checkpoint because the better one depends on the model: the all-task model picks 83 % with
    # "chunk", 43 % with "ensemble" (docs/all-tasks-cpu.md).
    execution: str = "ensemble"
    # A closed gripper opens only after this many consecutive steps asking to (policies.gripper;
    # 1: at once). Part of the checkpoint for the same reason: chosen on validation seeds per model.
    gripper_open_steps: int = 1

    def __post_init__(self):
        for name, most in SIZE_LIMITS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= most:
                raise ValueError(f"ModelConfig.{name} must be an integer in 1..{most}, got {value!r}")
        ObservationSpec(self.image_size, self.imu_window, self.wrist_camera)  # the observation contract's bounds
        if self.vision not in VISION_ENCODERS:
            raise ValueError(f"ModelConfig.vision must be one of {VISION_ENCODERS}, got {self.vision!r}")
        if bool(self.vision_pretrained) != (self.vision == "pretrained"):
            raise ValueError("ModelConfig.vision_pretrained (a directory) goes with vision: pretrained, only with it")
        if self.vision == "vlm" and not self.pretrained:
            raise ValueError("ModelConfig.vision: vlm needs pretrained: the directory of a VLM")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"ModelConfig.image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})"
            )
        if self.vision == "cnn" and self.patch_size & (self.patch_size - 1):
            raise ValueError(
                f"the cnn encoder halves the image per layer: patch_size must be a power of 2, got {self.patch_size}"
            )
        grid = self.image_size // self.patch_size
        if not isinstance(self.token_merge, int) or self.token_merge < 1 or grid % self.token_merge:
            raise ValueError(f"ModelConfig.token_merge must be a positive divisor of the patch grid ({grid}), "
                             f"got {self.token_merge!r}")
        if self.token_merge > 1 and self.vision != "cnn":
            raise ValueError("ModelConfig.token_merge needs vision: cnn")
        if self.language_prior not in ("", *LANGUAGE_PRIORS):
            raise ValueError(f"ModelConfig.language_prior must be '' or one of {list(LANGUAGE_PRIORS)}, "
                             f"got {self.language_prior!r}")
        if self.language_prior and self.pretrained:
            raise ValueError("ModelConfig.language_prior is for a from-scratch LM (a pretrained one reads text itself)")
        if self.film_text not in FILM_TEXT:
            raise ValueError(f"ModelConfig.film_text must be one of {FILM_TEXT}, got {self.film_text!r}")
        if self.film_gripper and not (self.vision_film and "state" in self.sensors):
            raise ValueError("ModelConfig.film_gripper needs vision_film and the state in the prompt")
        if (self.film_gripper_gate or self.film_gripper_dropout) and not self.film_gripper:
            raise ValueError("ModelConfig.film_gripper_gate and film_gripper_dropout need film_gripper")
        if not 0 <= self.film_gripper_dropout < 1:
            raise ValueError(f"ModelConfig.film_gripper_dropout must be in [0, 1), got {self.film_gripper_dropout}")
        if self.vision_film and self.vision not in ("cnn", "keypoints"):
            raise ValueError("ModelConfig.vision_film needs a convolutional encoder (vision: cnn or keypoints)")
        if self.execution not in EXECUTIONS:
            raise ValueError(f"ModelConfig.execution must be one of {EXECUTIONS}, got {self.execution!r}")
        if not 2 <= self.action_bins <= 4096:
            raise ValueError(f"ModelConfig.action_bins must be in 2..4096, got {self.action_bins}")
        self.decoders = tuple(self.decoders)
        if (
            not self.decoders
            or any(d not in DECODERS for d in self.decoders)
            or len(set(self.decoders)) < len(self.decoders)
        ):
            raise ValueError(f"ModelConfig.decoders must be distinct names from {DECODERS}, got {list(self.decoders)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"ModelConfig.hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})"
            )
        self.validate_prompt()

    def validate_prompt(self) -> None:
        if self.prompt.count("{instruction}") != 1:
            raise ValueError(f"ModelConfig.prompt must contain '{{instruction}}' once: {self.prompt!r}")
        unknown = set(re.findall(r"<[a-z_]+>", self.prompt)) - set(SENSOR_PLACEHOLDERS.values())
        if unknown:
            raise ValueError(
                f"ModelConfig.prompt: unknown placeholder(s) {sorted(unknown)}; "
                f"known: {list(SENSOR_PLACEHOLDERS.values())}"
            )
        repeated = [p for p in SENSOR_PLACEHOLDERS.values() if self.prompt.count(p) > 1]
        if repeated or "image" not in self.sensors:
            raise ValueError(
                f"ModelConfig.prompt must contain <image> once and each other placeholder at most once: {self.prompt!r}"
            )
        if self.wrist_camera != ("wrist_image" in self.sensors):
            raise ValueError(
                f"ModelConfig.prompt must contain <wrist_image> exactly when wrist_camera is true: {self.prompt!r}"
            )

    @property
    def spec(self) -> ObservationSpec:
        """The observations the model takes."""
        return ObservationSpec(self.image_size, self.imu_window, self.wrist_camera)

    @property
    def sensors(self) -> tuple[str, ...]:
        """The sensors the model reads: those whose placeholder is in the prompt."""
        return tuple(s for s, placeholder in SENSOR_PLACEHOLDERS.items() if placeholder in self.prompt)

    @property
    def sensor_order(self) -> list[str]:
        """Sensors in the order their placeholders appear in the prompt."""
        return sorted(self.sensors, key=lambda s: self.prompt.index(SENSOR_PLACEHOLDERS[s]))

    @property
    def image_tokens(self) -> int:
        if self.vision == "keypoints":
            return self.keypoints
        return (self.image_size // self.patch_size // self.token_merge) ** 2

    @property
    def sensor_tokens(self) -> dict[str, int]:
        return {s: self.image_tokens if s.endswith("image") else 1 for s in self.sensors}

    @property
    def prefix_length(self) -> int:
        """Sensor tokens + text tokens (padded) + the action-start token: fixed for every input."""
        return sum(self.sensor_tokens.values()) + self.max_text_tokens + 1

    @property
    def action_tokens(self) -> int:
        return self.chunk * ACTION_DIM
