"""Pretrained backbones (vla/model/vlm.py): a vision encoder, or a whole VLM, of every supported
family, random tiny ones saved with save_pretrained: the family's own image features and logits
from our sentence, bad directories refused in one line, LoRA on the LM alone and merged, a frozen
vision tower, gradient checkpointing."""
from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlavaConfig, LlavaForConditionalGeneration

from vla.model import ModelConfig, create
from vla.model.finetune import apply_lora, enable_gradient_checkpointing, merge_lora
from vla.model.random_backbones import TINY_VISION, save_random_vision_encoder, save_random_vlm
from vla.model.vlm import VLM_FAMILIES, BackboneError

TINY = dict(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, max_text_tokens=12, chunk=2,
            image_size=32, vision_film=False)
PATCH = {"idefics3": 16, "smolvlm": 16, "paligemma": 8, "qwen2_vl": 8, "qwen2_5_vl": 8}  # pixels per image token
CORPUS = ["touch the red cube", "reach the blue ball", "move to the green cylinder", "touch the yellow ball",
          "pick up the green cube"]


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    """backbone(name) -> the directory of a random tiny VLM or vision encoder (saved once per module)."""
    root, saved = tmp_path_factory.mktemp("backbones"), {}

    def get(name: str):
        if name not in saved:
            save = save_random_vlm if name in VLM_FAMILIES else save_random_vision_encoder
            saved[name] = save(name, root / name)
        return saved[name]

    return get


def config_for(backbone, name: str, **overrides) -> ModelConfig:
    if name in VLM_FAMILIES:
        values = dict(vision="vlm", pretrained=str(backbone(name)), patch_size=PATCH[name])
    else:
        values = dict(vision="pretrained", vision_pretrained=str(backbone(name)), patch_size=8)
    return ModelConfig(**{**TINY, **values, **overrides})


def make(backbone, name: str, stats, **overrides):
    torch.manual_seed(0)
    model, processor = create(config_for(backbone, name, **overrides), stats, CORPUS)
    return model.eval(), processor


# ---- the family's own results ------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:instruction cut")  # on purpose: no padding, which HF's positions would count
@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_our_sentence_gives_the_vlms_own_image_features_and_logits(backbone, stats, family):
    """Our static-shape image path equals get_image_features, and our sentence (positions, Qwen's
    M-RoPE, PaliGemma's prefix mask) equals the VLM's own forward on the same ids, exactly."""
    model, processor = make(backbone, family, stats, prompt="<image>{instruction}", max_text_tokens=3)  # no padding
    vlm, encoder = model.lm, model.image_encoder
    image = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    pixels = encoder.normalise(image)
    ids, mask = processor.prompt.encode(CORPUS[:2])
    hf_ids = torch.where(ids == processor.ids.placeholders["image"], vlm.config.image_token_id, ids)
    if family in ("idefics3", "smolvlm"):
        inputs = {"pixel_values": pixels[:, None]}
    elif family == "paligemma":  # token_type_ids 0: prefix-LM over the whole sequence, as ours (all prefix)
        inputs = {"pixel_values": pixels, "token_type_ids": torch.zeros_like(ids)}
    else:
        inputs = {"pixel_values": encoder.patchify(pixels).flatten(0, 1),
                  "image_grid_thw": torch.tensor([[1, encoder.side, encoder.side]] * 2),
                  "mm_token_type_ids": (hf_ids == vlm.config.image_token_id).int()}
    with torch.no_grad():
        grid = {key: inputs[key] for key in ("image_grid_thw",) if key in inputs}
        features = vlm.model.get_image_features(inputs["pixel_values"], **grid)
        theirs = torch.stack(list(features.pooler_output)).reshape(2, model.config.image_tokens, -1)
        assert torch.equal(encoder(image), theirs)
        embeds, mask, positions = model.embed_prefix(image, None, None, ids, mask)
        ours = vlm.get_output_embeddings()(model._run_lm(embeds, mask, positions)[0])
        assert torch.allclose(ours, vlm(input_ids=hf_ids, attention_mask=mask.long(), **inputs).logits, atol=1e-6)
    if family.startswith("qwen"):
        rope, _ = vlm.model.get_rope_index(hf_ids, mm_token_type_ids=inputs["mm_token_type_ids"],
                                           image_grid_thw=inputs["image_grid_thw"], attention_mask=mask.long())
        assert positions.shape == (3, 2, ids.shape[1]) and torch.equal(rope, positions)


@pytest.mark.parametrize("kind", ["siglip", "clip", "dinov2_with_registers", "vit"])
def test_vision_encoders_give_their_patch_features_normalised_as_their_processor(backbone, stats, kind):
    model, _ = make(backbone, kind, stats)
    tower = model.vision_tower
    assert type(tower).__name__.endswith(("VisionModel", "Dinov2WithRegistersModel", "ViTModel"))  # no text tower
    assert model.config.image_tokens == 16
    preprocessor = json.loads((backbone(kind) / "preprocessor_config.json").read_text())
    mean, std = torch.tensor(preprocessor["image_mean"]), torch.tensor(preprocessor["image_std"])
    image = torch.randint(0, 256, (1, 32, 32, 3), dtype=torch.uint8)
    expected = (image.permute(0, 3, 1, 2) / 255 - mean[:, None, None]) / std[:, None, None]  # what its processor gives
    assert torch.allclose(model.image_encoder.normalise(image), expected, atol=1e-5)
    with torch.no_grad():
        patches = tower(pixel_values=expected).last_hidden_state[:, -16:]  # after CLS (and register) tokens
        assert torch.allclose(model.image_encoder(image), model.image_encoder.project(patches), atol=1e-5)


def test_smaller_images_than_the_processors_interpolate_the_towers_positions(backbone, stats):
    """Fewer image tokens (a smaller dataset, a faster step): Idefics3's own tower gives the same
    features for the smaller image; SigLIP interpolates its position embeddings."""
    model, _ = make(backbone, "smolvlm", stats, image_size=16)
    image = torch.randint(0, 256, (2, 16, 16, 3), dtype=torch.uint8)
    with torch.no_grad():
        vlm = model.lm.model
        theirs = vlm.connector(vlm.vision_model(model.image_encoder.normalise(image)).last_hidden_state)
        assert model.config.image_tokens == 1 and torch.equal(model.image_encoder(image), theirs)
    for name in ("paligemma", "siglip"):
        model, _ = make(backbone, name, stats, image_size=16)
        assert model.image_encoder(image).shape[:2] == (2, 4)


def test_static_cache_with_paligemmas_explicit_mask(backbone, stats, observations):
    """The autoregressive decoder's mask spans a StaticCache's whole length (what CUDA graphs use)."""
    from transformers import StaticCache

    model, processor = make(backbone, "paligemma", stats, decoders=("autoregressive",))
    inputs = processor.inputs(observations(2, size=32))
    with torch.no_grad():
        expected = model.generate_autoregressive(**inputs)
        length = model.config.prefix_length + model.config.action_tokens
        cache = StaticCache(config=model.lm.config, max_cache_len=length)
        assert torch.equal(model.generate_autoregressive(**inputs, cache=cache), expected)
        assert torch.equal(model._teacher_forced_logits(model.embed_prefix(**inputs), expected).argmax(-1), expected)


# ---- refusals ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def other_models(tmp_path_factory):
    """Directories of models that are not supported backbones: a text-only Llama, a LLaVA, pickled weights."""
    root = tmp_path_factory.mktemp("others")
    text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=64)
    LlamaForCausalLM(LlamaConfig(**text)).save_pretrained(root / "llama")
    LlavaForConditionalGeneration(LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", **TINY_VISION, image_size=16, patch_size=8),
        text_config=dict(model_type="llama", **text), image_token_id=63)).save_pretrained(root / "llava")
    LlamaForCausalLM(LlamaConfig(**text)).save_pretrained(root / "pickled")
    weights = root / "pickled" / "model.safetensors"
    torch.save(safetensors.torch.load_file(weights), root / "pickled" / "pytorch_model.bin")
    weights.unlink()
    return root


@pytest.mark.parametrize("values, message", [
    (dict(vision="vlm", pretrained="{root}/missing"), "has no config.json"),
    (dict(vision="vlm", pretrained="{root}/pickled"), r"no \*.safetensors weights \(pickled .bin weights are refused"),
    (dict(vision="vlm", pretrained="{root}/llama"), "is a text-only model, not a VLM of a supported family"),
    (dict(vision="vlm", pretrained="{root}/llava"), "'llava'.* is an unsupported VLM, not a VLM of a supported family"),
    (dict(pretrained="{smolvlm}"), "is a VLM: set model.vision: vlm"),
    (dict(pretrained="{siglip}"), "is a vision encoder, not a language model: give it as model.vision_pretrained"),
    (dict(vision="pretrained", vision_pretrained="{root}/llama"), "'llama'.* is not a supported vision encoder"),
    (dict(vision="pretrained", vision_pretrained="{smolvlm}"), "is a VLM .smolvlm.: give it as model.pretrained"),
    (dict(vision="vlm", pretrained="{smolvlm}", image_size=64), "takes images of at most 32 x 32"),
    (dict(vision="vlm", pretrained="{qwen2_vl}", image_size=80), "multiples of 8 pixels, 256..4096 pixels"),
    (dict(vision="vlm", pretrained="{smolvlm}", patch_size=8), "covers 16 x 16 pixels: set model.patch_size: 16"),
    (dict(vision="pretrained", vision_pretrained="{dinov2}", patch_size=16), "set model.patch_size: 8"),
])
def test_unusable_backbones_are_refused_in_one_line(backbone, other_models, stats, values, message):
    values = {k: v.format(root=other_models, smolvlm=backbone("smolvlm"), siglip=backbone("siglip"),
                          qwen2_vl=backbone("qwen2_vl"), dinov2=backbone("dinov2")) if isinstance(v, str) else v
              for k, v in values.items()}
    with pytest.raises(BackboneError, match=message) as error:
        create(ModelConfig(**{**TINY, "patch_size": 16, **values}), stats, CORPUS)
    assert "\n" not in str(error.value)
    if "supported" in message:
        assert ", ".join(VLM_FAMILIES) in str(error.value) or "siglip" in str(error.value)


def test_config_fields_go_together():
    with pytest.raises(ValueError, match="vision_pretrained"):
        ModelConfig(vision_pretrained="somewhere", vision_film=False)
    with pytest.raises(ValueError, match="vision: vlm needs pretrained"):
        ModelConfig(vision="vlm", vision_film=False)
    with pytest.raises(ValueError, match="vision_film needs a convolutional encoder"):
        ModelConfig(vision="vlm", pretrained="somewhere")


# ---- fine-tuning ------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated")  # peft's call
@pytest.mark.parametrize("family", ["smolvlm", "qwen2_5_vl"])
def test_lora_adapts_the_lm_only_trains_and_merges(backbone, stats, training_batch, observations, family):
    """LoRA on the LM's layers alone (the vision towers use the same layer names), the new token rows
    trained, a frozen tower untouched while the loss falls; merged, a plain model again."""
    model, processor = make(backbone, family, stats, decoders=("parallel", "autoregressive"))
    enable_gradient_checkpointing(model)
    apply_lora(model, rank=4, alpha=8)
    model.freeze_vision_tower()
    adapted = [name for name, _ in model.named_modules() if name.endswith("lora_A")]
    assert len(adapted) == 2 * 7 and not any("vision" in name or "visual" in name for name in adapted)
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    assert any("trainable_tokens_delta" in name for name in trained) and "action_queries" in trained
    assert any("connector" in name or "merger" in name for name in trained)
    tower = {name: p.clone() for name, p in model.vision_tower.named_parameters() if not p.requires_grad}
    batch, obs, _ = training_batch(processor, 4)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    assert not model.vision_tower.training  # a frozen tower stays in eval mode
    losses = []
    for _ in range(4):
        out = model(**batch)
        out["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(out["loss"].item())
    assert losses[-1] < losses[0]
    assert all(torch.equal(p, tower[name]) for name, p in model.vision_tower.named_parameters() if name in tower)
    inputs = processor.inputs(obs)
    with torch.no_grad():
        before = model.eval().forward_parallel(**inputs)
        merge_lora(model)
        assert torch.allclose(model.forward_parallel(**inputs), before, atol=1e-5)
    assert not any("lora" in name or "token_adapter" in name for name, _ in model.named_parameters())


def test_gradient_checkpointing_gives_the_same_gradients(backbone, stats, training_batch):
    model, processor = make(backbone, "paligemma", stats, decoders=("parallel", "autoregressive"))
    batch, _, _ = training_batch(processor, 2)
    model.train()
    gradients = []
    for checkpointing in (False, True):
        if checkpointing:
            enable_gradient_checkpointing(model)
        model.zero_grad()
        model(**batch)["loss"].backward()
        gradients.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert model.lm.is_activation_checkpointing and torch.allclose(gradients[0], gradients[1], atol=1e-6)
