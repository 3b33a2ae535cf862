"""The VLA model: PaLM-E multimodal sentences into a Hugging Face causal LM, RT-2 action tokens.

The sequence, always the same length for a given config:

    [prompt with sensor tokens at its placeholders] [padding] <act> [k * 7 action positions]
     "<image>x36 <state> <imu> touch the red cube"

Sensor tokens come from the encoders (encoders.py), text tokens from the LM's embedding table or,
with a language prior, from a frozen pretrained sentence encoder's states (one per <text> position,
computed by the processor, projected here: language_prior.py);
a from-scratch image encoder is also FiLM-conditioned on the instruction (RT-1: its mean text
embedding, or the mean of a convolution over its embeddings, film_text), which is what made
grounding "the red cube" in the image learnable from a few thousand demonstrations. The LM is a
causal LM, or a whole pretrained VLM whose vision tower and connector are then the image encoder
(vlm.py); the few ways its families differ (where positions start, Qwen's 3-D M-RoPE positions,
PaliGemma's attention mask) are settled in __init__.
Padding sits between the prompt and <act> and is masked out; position ids skip it. Action bin b
is the token id `action_offset + b`: reserved ids after the text vocabulary. The action positions
are filled either with the previous action tokens (autoregressive decoder, teacher-forced in
training, one token at a time with a KV cache at inference, as RT-2) or with k * 7 learned
action-query embeddings (parallel decoder, one forward pass, as OpenVLA-OFT; the mask stays
causal, which the LM supports natively). Logits are computed only over the action ids, which
restricts decoding to actions.

The model is tensors in, tensors out: turning observations into these tensors and bins into
actions is the processor's job (processor.py), saved with the checkpoint beside the weights.

Reads top to bottom: construction, the prefix, the decoders, the training loss, decoding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    DynamicCache,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    StaticCache,
)

from vla.contracts.action import ACTION_DIM
from vla.contracts.observation import GRIPPER_WIDTH_MAX, IMU_CHANNELS, STATE_SLICES
from vla.model.config import FROM_SCRATCH_VISION, LANGUAGE_PRIORS, ModelConfig
from vla.model.encoders import ImageEncoder, PretrainedImageEncoder, VectorEncoder
from vla.model.text import TokenIds, load_pretrained_tokenizer
from vla.model.vlm import MROPE_FAMILIES, VLM_FAMILIES, check_language_model, mrope_positions, vlm_image_encoder


def build_lm(config: ModelConfig, vocab_size: int, pad_id: int) -> PreTrainedModel:
    """A small causal LM of type `config.lm_type`, randomly initialised."""
    positions = 1 << (config.prefix_length + config.action_tokens - 1).bit_length()
    lm_config = AutoConfig.for_model(
        config.lm_type,
        vocab_size=vocab_size,
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        intermediate_size=config.intermediate_size,
        max_position_embeddings=positions,
        pad_token_id=pad_id,
        bos_token_id=None,
        eos_token_id=None,
    )
    return AutoModelForCausalLM.from_config(lm_config)


def load_backbone(config: ModelConfig) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    """A pretrained causal LM, or VLM (vision: vlm), and its tokenizer from a local directory; its
    embedding table grows by our special tokens and the action bins (vlm.BackboneError, one line,
    for a directory that does not hold what the config asks for)."""
    check_language_model(config)
    tokenizer = load_pretrained_tokenizer(config.pretrained)
    auto = AutoModelForImageTextToText if config.vision == "vlm" else AutoModelForCausalLM
    lm = auto.from_pretrained(config.pretrained, dtype=torch.float32)
    # Hub tables are often padded past the tokenizer (Qwen2-VL, PaliGemma): the bins go after both,
    # so action_offset = rows - action_bins (checkpoints store it: the table alone no longer tells).
    lm.resize_token_embeddings(max(len(tokenizer), lm.get_input_embeddings().num_embeddings) + config.action_bins)
    return tokenizer, lm


def lm_from_config(lm_config: PretrainedConfig) -> PreTrainedModel:
    """An LM (or VLM) of a saved transformers config, randomly initialised: a checkpoint's skeleton."""
    auto = AutoModelForImageTextToText if lm_config.model_type in VLM_FAMILIES else AutoModelForCausalLM
    return auto.from_config(lm_config, dtype=torch.float32)


def gripper_condition(hidden: int) -> nn.Sequential:
    """The gripper's width [B, 1] -> an addition to the FiLM condition [B, hidden], zero at first."""
    mlp = nn.Sequential(nn.Linear(1, 32), nn.GELU(), nn.Linear(32, hidden))
    nn.init.zeros_(mlp[2].weight)
    nn.init.zeros_(mlp[2].bias)
    return mlp


def text_projection(width: int, hidden: int) -> nn.Sequential:
    """The language prior's states [.., width] -> the LM's width. Its states are ~13x the size of the
    LM's own text embeddings (per-dimension std 0.46 through a default Linear: 0.26, against 0.02):
    LayerNorm and a small first projection let them start as loud as the text tokens they replace."""
    layer = nn.Linear(width, hidden)
    nn.init.normal_(layer.weight, std=0.02 / width**0.5)
    nn.init.zeros_(layer.bias)
    return nn.Sequential(nn.LayerNorm(width), layer)


class VLAModel(nn.Module):
    """`stats`: the state, IMU (and, for a pretrained image encoder, image) normalisation statistics
    (mean, std per channel); `ids`: the special token ids of the tokenizer the model was built with;
    `lm`: a causal LM, or the VLM of vision: vlm; `vision`: the vision encoder of vision: pretrained."""

    def __init__(
        self, config: ModelConfig, stats: dict, ids: TokenIds, lm: PreTrainedModel, vision: nn.Module | None = None
    ):
        super().__init__()
        self.config, self.ids, self.lm = config, ids, lm
        self.action_offset = ids.action_offset
        vocab = lm.get_input_embeddings().num_embeddings
        if vocab != self.action_offset + config.action_bins:
            raise ValueError(
                f"LM vocabulary has {vocab} ids; expected {self.action_offset} text tokens "
                f"+ {config.action_bins} action bins"
            )
        hidden = lm.get_input_embeddings().embedding_dim
        if config.vision == "pretrained":
            self.image_encoder = PretrainedImageEncoder(config, vision, stats.get("image"), hidden)
        elif config.vision == "vlm":
            self.image_encoder = vlm_image_encoder(lm, config, stats.get("image"))
        else:
            self.image_encoder = ImageEncoder(config, hidden)
        # a pretrained encoder also reads the wrist camera; a from-scratch one is trained per camera
        from_scratch = "wrist_image" in config.sensors and config.vision in FROM_SCRATCH_VISION
        self.wrist_encoder = ImageEncoder(config, hidden) if from_scratch else None
        self.vision_frozen = False
        self.state_encoder = (
            VectorEncoder((config.state_dim,), stats["state"]["mean"], stats["state"]["std"], hidden)
            if "state" in config.sensors
            else None
        )
        self.imu_encoder = (
            VectorEncoder((config.imu_window, IMU_CHANNELS), stats["imu"]["mean"], stats["imu"]["std"], hidden)
            if "imu" in config.sensors
            else None
        )
        prior = LANGUAGE_PRIORS.get(config.language_prior)
        self.text_projection = text_projection(prior, hidden) if prior else None
        film_conv = config.vision_film and config.film_text == "conv"
        self.text_condition = nn.Conv1d(hidden, hidden, 3, padding=1) if film_conv else None
        self.gripper_condition = gripper_condition(hidden) if config.film_gripper else None
        if "parallel" in config.decoders:
            self.action_queries = nn.Parameter(torch.randn(config.action_tokens, hidden) * 0.02)
        # how the LM's family takes positions and masks (VLMs as they were pretrained)
        family = lm.config.model_type
        self.first_position = 1 if family == "paligemma" else 0  # PaliGemma counts positions from 1
        self.mrope_side = config.image_size // config.patch_size if family in MROPE_FAMILIES else 0
        self.prefix_attention = family == "paligemma"  # see _attention

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def vision_tower(self) -> nn.Module | None:
        """The pretrained vision tower (vision: pretrained or vlm), without its projector or connector."""
        return getattr(self.image_encoder, "tower", None)

    def freeze_vision_tower(self) -> None:
        """Keep the pretrained vision tower as it is; its projector or connector still trains."""
        self.vision_tower.requires_grad_(False)
        connector = getattr(self.image_encoder, "connector", None)
        if connector is not None:  # Qwen's merger sits inside its tower
            connector.requires_grad_(True)
        self.vision_frozen = True
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.vision_frozen:  # no dropout or drop-path in a frozen tower: it stays as pretrained
            self.vision_tower.eval()
        return self

    # ---- the prefix: multimodal sentence -> embeddings ----------------------------------------
    def embed_prefix(self, image, state, imu, text_ids, text_mask, wrist_image=None, text_features=None):
        """-> (embeddings [B, L, D], attention mask [B, L], position ids [B, L] (Qwen: [3, B, L]))."""
        embeds = self.lm.get_input_embeddings()(text_ids)
        if self.text_projection is not None:  # the i-th <text> of a row takes the prior's i-th state
            embeds = _fill(embeds, text_ids == self.ids.prior_text, self.text_projection(text_features))
        is_sensor = torch.zeros_like(text_mask)
        for token_id in self.ids.placeholders.values():
            is_sensor = is_sensor | (text_ids == token_id)
        film = ()
        if self.config.vision_film:  # the instruction's summary: mean over its text tokens
            is_text = (text_mask & ~is_sensor & (text_ids != self.ids.action_start)).unsqueeze(-1).to(embeds.dtype)
            words = embeds * is_text
            if self.text_condition is not None:  # [B, L, D] -> word triples [B, L, D]
                words = F.gelu(self.text_condition(words.transpose(1, 2))).transpose(1, 2) * is_text
            condition = words.sum(1) / is_text.sum(1).clamp(min=1.0)
            if self.gripper_condition is not None:  # 1 open, ~0.5 holding a cube, 0 closed on nothing
                width = state[:, STATE_SLICES["gripper_width"]].float() / GRIPPER_WIDTH_MAX
                gripper = self.gripper_condition(width)
                if self.training and self.config.film_gripper_dropout:
                    gripper = gripper * (torch.rand_like(width) >= self.config.film_gripper_dropout)
                condition = condition * (1 + gripper) if self.config.film_gripper_gate else condition + gripper
            film = (condition,)
        encoders = {
            "image": lambda: self.image_encoder(image, *film),
            "wrist_image": lambda: (self.wrist_encoder or self.image_encoder)(wrist_image, *film),
            "state": lambda: self.state_encoder(state),
            "imu": lambda: self.imu_encoder(imu),
        }
        # Sensors the prompt does not name are ignored; the others in placeholder order.
        tokens = torch.cat([encoders[s]() for s in self.config.sensor_order], dim=1)
        return _fill(embeds, is_sensor, tokens), text_mask, self._positions(text_ids, text_mask)

    def _positions(self, text_ids, mask) -> torch.Tensor:
        """Position ids [B, L] (padding does not shift them), or Qwen's M-RoPE ids [3, B, L]."""
        if self.mrope_side:
            is_image = torch.zeros_like(mask)
            for sensor in ("image", "wrist_image"):
                if sensor in self.ids.placeholders:
                    is_image = is_image | (text_ids == self.ids.placeholders[sensor])
            return mrope_positions(mask, is_image, self.mrope_side)
        return (mask.long().cumsum(1) - 1).clamp(min=0) + self.first_position

    def _attention(self, mask, queries: int, cache):
        """The LM's attention mask for the last `queries` of the positions in `mask` [B, L]: that mask
        itself (padding), which the LM makes causal; for PaliGemma an explicit [B, 1, queries, keys]
        mask, bidirectional over the prefix (sensors and instruction) and causal after it, as it was
        pretrained. Its Gemma is not causal by itself: given [B, L], its ONNX export lost causality."""
        if not self.prefix_attention:
            return mask.long()
        length = mask.shape[1]
        keys = max(length, cache.get_max_length(0)) if cache is not None else length  # static: all slots
        j = torch.arange(keys, device=mask.device)
        i = j[length - queries : length, None]
        allowed = (j <= i) | (j < self.config.prefix_length)
        return (allowed & F.pad(mask, (0, keys - length))[:, None, :])[:, None]

    def _run_lm(self, embeds, mask, positions, cache=None):
        out = self.lm.get_decoder()(
            inputs_embeds=embeds,
            attention_mask=self._attention(mask, embeds.shape[1], cache),
            position_ids=positions,
            cache=cache,
            use_cache=cache is not None,
        )
        return out.last_hidden_state, out.cache

    def _action_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM head restricted to the action ids: [..., D] -> [..., bins]."""
        head = self.lm.get_output_embeddings()
        rows = slice(self.action_offset, self.action_offset + self.config.action_bins)
        # under LoRA (finetune.py) peft keeps the trained action rows beside the frozen table
        adapter = getattr(head, "token_adapter", None)
        weight = head.weight if adapter is None else adapter.get_merged_weights(adapter.active_adapters)
        bias = getattr(head, "bias", None)
        return F.linear(hidden, weight[rows], None if bias is None else bias[rows])

    def _append(self, prefix, extra: torch.Tensor):
        """Prefix (embeds, mask, positions) followed by `extra` embeddings at the next positions."""
        embeds, mask, positions = prefix
        n = extra.shape[1]
        new_positions = positions[..., -1:] + 1 + torch.arange(n, device=positions.device)
        return (
            torch.cat([embeds, extra.to(embeds.dtype)], 1),
            torch.cat([mask, mask.new_ones(mask.shape[0], n)], 1),
            torch.cat([positions, new_positions], -1),
        )

    # ---- the decoders ---------------------------------------------------------------------------
    def _parallel_logits(self, prefix) -> torch.Tensor:
        queries = self.action_queries.unsqueeze(0).expand(prefix[0].shape[0], -1, -1)
        hidden, _ = self._run_lm(*self._append(prefix, queries))
        return self._action_logits(hidden[:, -self.config.action_tokens :])

    def _teacher_forced_logits(self, prefix, bins: torch.Tensor) -> torch.Tensor:
        """Autoregressive training: position <act> predicts bin 0, action token i predicts bin i+1."""
        previous = self.lm.get_input_embeddings()(self.action_offset + bins[:, :-1])
        hidden, _ = self._run_lm(*self._append(prefix, previous))
        return self._action_logits(hidden[:, -self.config.action_tokens :])

    def forward_parallel(
        self, image, state, imu, text_ids, text_mask, wrist_image=None, text_features=None
    ) -> torch.Tensor:
        """Pure tensor function: -> logits [B, k * 7, bins] of all action tokens in one pass."""
        return self._parallel_logits(
            self.embed_prefix(image, state, imu, text_ids, text_mask, wrist_image, text_features)
        )

    def generate_autoregressive(
        self, image, state, imu, text_ids, text_mask, wrist_image=None, text_features=None, cache=None
    ) -> torch.Tensor:
        """Greedy RT-2 decoding: one pass over the prefix, then one token at a time with the KV
        cache (a fresh DynamicCache, or a preallocated StaticCache that is rewound and reused,
        which keeps every shape static for CUDA graphs). -> bins int64[B, k * 7]."""
        if cache is None:
            cache = DynamicCache()
        elif isinstance(cache, StaticCache):
            for layer in cache.layers:
                if layer.is_initialized:
                    layer.cumulative_length.zero_()  # rewind in place: no host sync, graph-safe
        embeds, mask, positions = self.embed_prefix(image, state, imu, text_ids, text_mask, wrist_image, text_features)
        hidden, cache = self._run_lm(embeds, mask, positions, cache=cache)
        bins = []
        for i in range(self.config.action_tokens):
            bins.append(self._action_logits(hidden[:, -1]).argmax(-1))
            if i + 1 == self.config.action_tokens:
                break
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
            positions = positions[..., -1:] + 1
            token = self.lm.get_input_embeddings()(self.action_offset + bins[-1]).unsqueeze(1)
            hidden, cache = self._run_lm(token, mask, positions, cache)
        return torch.stack(bins, 1)

    # ---- training ---------------------------------------------------------------------------
    def forward(
        self, image, state, imu, text_ids, text_mask, action_bins, action_mask, wrist_image=None, text_features=None
    ) -> dict:
        """Teacher-forced losses of the configured decoders. action_bins int64[B, k, 7] (the target
        action tokens), action_mask bool[B, k] (False past the end of an episode). -> dict of scalar
        tensors: loss (their sum), loss_<decoder> and accuracy_<decoder> (of the argmax bins). Callers
        that train trim the text first (drop_padding): the same losses, less work."""
        prefix = self.embed_prefix(image, state, imu, text_ids, text_mask, wrist_image, text_features)
        targets = action_bins.flatten(1)  # [B, k * 7]
        weights = action_mask.repeat_interleave(ACTION_DIM, dim=1).float()
        total = weights.sum().clamp(min=1.0)
        out = {}
        for decoder in self.config.decoders:
            logits = (
                self._parallel_logits(prefix) if decoder == "parallel" else self._teacher_forced_logits(prefix, targets)
            )
            losses = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
            out[f"loss_{decoder}"] = (losses * weights.flatten()).sum() / total
            out[f"accuracy_{decoder}"] = ((logits.argmax(-1) == targets).float() * weights).sum().detach() / total
        out["loss"] = sum(out[f"loss_{d}"] for d in self.config.decoders)
        return out

    # ---- decoding ------------------------------------------------------------------------------
    def resolve_decoder(self, decoder: str | None) -> str:
        """`decoder`, or the model's first when None; ValueError for one the model was not trained with."""
        decoder = decoder or self.config.decoders[0]
        if decoder not in self.config.decoders:
            raise ValueError(
                f"decoder {decoder!r} was not trained for this model (trained: {list(self.config.decoders)})"
            )
        return decoder

    def decode_bins(self, inputs: dict[str, torch.Tensor], decoder: str | None = None) -> torch.Tensor:
        """Action bins int64[B, k * 7] from preprocessed inputs with the chosen decoder."""
        if self.resolve_decoder(decoder) == "parallel":
            return self.forward_parallel(**inputs).argmax(-1)
        return self.generate_autoregressive(**inputs)


def _fill(embeds: torch.Tensor, where: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """embeds [B, L, D] with the i-th True position of each row of `where` [B, L] taking tokens[:, i]
    (gather, not boolean indexing: static shapes for ONNX export and CUDA graphs)."""
    slot = (where.long().cumsum(1) - 1).clamp(min=0)
    gathered = tokens.gather(1, slot.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
    return torch.where(where.unsqueeze(-1), gathered.to(embeds.dtype), embeds)


def drop_padding(ids: torch.Tensor, mask: torch.Tensor, multiple: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the columns that are padding in every row, keeping a multiple of `multiple` columns
    (a compiled model then meets a few lengths, not every one). Padding shifts no position and is
    attended by nothing, so the outputs are the same; training pays for the batch's longest
    instruction, not for max_text_tokens. (Inference keeps the fixed length: static shapes for ONNX
    and CUDA graphs.) Done before forward, not in it: a data-dependent shape splits a compiled graph."""
    keep = mask.any(0)
    spare = (-int(keep.sum())) % multiple
    keep[(~keep).nonzero()[:spare, 0]] = True
    return (ids, mask) if bool(keep.all()) else (ids[:, keep], mask[:, keep])
