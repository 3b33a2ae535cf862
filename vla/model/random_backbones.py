"""Random-weight backbones of every supported family, saved like hub checkpoints (config.json,
model.safetensors, tokenizer, preprocessor_config.json): what the tests and the latency benchmark
use, since no pretrained weights can be downloaded here. Built from each family's config classes,
at "tiny" sizes (tests) or, for SmolVLM, the shapes of SmolVLM-256M and -500M (benchmarks).

    save_random_vlm("qwen2_vl", path)              # idefics3, smolvlm, paligemma, qwen2_vl, qwen2_5_vl
    save_random_vision_encoder("siglip", path)     # siglip(_vision_model), clip(_vision_model), dinov2(...), vit
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, PreTrainedTokenizerFast

from vla.model.vlm import VLM_FAMILIES

CORPUS = ["touch the red cube", "pick up the blue ball", "push the green cube to the left",
          "put the purple cube in the orange bin", "move to the yellow cylinder", "reach the block"]
# the special tokens each family's processor writes
SPECIALS = {"idefics3": ["<|endoftext|>", "<image>", "<fake_token_around_image>", "<global-img>"],
            "paligemma": ["<pad>", "<eos>", "<bos>", "<unk>", "<image>"],
            "qwen2_vl": ["<|endoftext|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]}
SPECIALS |= {"smolvlm": SPECIALS["idefics3"], "qwen2_5_vl": SPECIALS["qwen2_vl"]}
TABLE_PADDING = 13  # rows past the tokenizer, as hub tables have (Qwen2-VL, PaliGemma)
TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2)
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
TINY_IMAGE = 32
SIGLIP_B16 = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
SMOLVLM = {  # SigLIP-B/16 at 512 px, pixel shuffle 4 (64 tokens), SmolLM2-135M / -360M
    "250m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3),
    "500m": dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
                 num_key_value_heads=5),
}
HALF = [0.5] * 3
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def tokenizer(family: str) -> PreTrainedTokenizerFast:
    """A byte-level BPE with the family's special tokens."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS[family], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token=SPECIALS[family][0])


def save_random_vlm(family: str, path: str | Path, scale: str = "tiny") -> Path:
    """A random VLM of `family` in directory `path`; scale "tiny", or "250m" / "500m" (smolvlm, idefics3)."""
    torch.manual_seed(0)
    path, tok = Path(path), tokenizer(family)
    config, processor = _vlm_config(family, tok, scale)
    AutoModelForImageTextToText.from_config(config).save_pretrained(path)
    tok.save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps(processor, indent=1))
    return path


def _vlm_config(family: str, tok, scale: str):
    """(the VLM's config, its image processor config)."""
    assert family in VLM_FAMILIES, family
    text = dict(TINY_TEXT) if scale == "tiny" else dict(SMOLVLM[scale])
    vocab = len(tok) + TABLE_PADDING if scale == "tiny" else 49280
    ids = lambda *tokens: [tok.convert_tokens_to_ids(t) for t in tokens]
    if family in ("idefics3", "smolvlm"):
        size, patch = (TINY_IMAGE, 8) if scale == "tiny" else (512, 16)
        vision = dict(TINY_VISION if scale == "tiny" else SIGLIP_B16, image_size=size, patch_size=patch)
        config = AutoConfig.for_model(
            family, vision_config=vision, scale_factor=2 if scale == "tiny" else 4, image_token_id=ids("<image>")[0],
            text_config=dict(model_type="llama", vocab_size=vocab, tie_word_embeddings=True, **text,
                             pad_token_id=tok.pad_token_id, bos_token_id=None, eos_token_id=None),
            tie_word_embeddings=True)
        processor = dict(image_processor_type="Idefics3ImageProcessor", do_resize=True, size={"longest_edge": size},
                         max_image_size={"longest_edge": size}, do_image_splitting=False, resample=1, do_rescale=True,
                         rescale_factor=1 / 255, do_normalize=True, image_mean=HALF, image_std=HALF)
    elif family == "paligemma":
        head = text["hidden_size"] // text["num_attention_heads"]
        text |= dict(num_key_value_heads=1, head_dim=head)
        vision = dict(model_type="siglip_vision_model", **TINY_VISION, image_size=TINY_IMAGE, patch_size=8,
                      vision_use_head=False, projection_dim=text["hidden_size"])
        config = AutoConfig.for_model(
            family, vision_config=vision, projection_dim=text["hidden_size"], image_token_index=ids("<image>")[0],
            text_config=dict(model_type="gemma", vocab_size=vocab, **text, pad_token_id=tok.pad_token_id,
                             bos_token_id=ids("<bos>")[0], eos_token_id=ids("<eos>")[0]))
        processor = dict(image_processor_type="SiglipImageProcessor", do_resize=True,
                         size={"height": TINY_IMAGE, "width": TINY_IMAGE}, resample=3, do_rescale=True,
                         rescale_factor=1 / 255, do_normalize=True, image_mean=HALF, image_std=HALF)
    else:
        half = text["hidden_size"] // text["num_attention_heads"] // 2  # rotary frequencies split over t, h, w
        sections = [half - 2 * (3 * half // 8)] + [3 * half // 8] * 2
        rope = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": sections}
        vision = dict(depth=2, num_heads=2, patch_size=4, spatial_merge_size=2, temporal_patch_size=2)
        if family == "qwen2_vl":
            vision |= dict(embed_dim=32, hidden_size=text["hidden_size"], mlp_ratio=2)
        else:
            vision |= dict(hidden_size=32, intermediate_size=64, out_hidden_size=text["hidden_size"], window_size=16,
                           fullatt_block_indexes=[1])
        image, video, start, end = ids("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
        config = AutoConfig.for_model(
            family, vision_config=vision, tie_word_embeddings=True, image_token_id=image, video_token_id=video,
            vision_start_token_id=start, vision_end_token_id=end,
            text_config=dict(vocab_size=vocab, **text, rope_parameters=rope, pad_token_id=tok.pad_token_id,
                             bos_token_id=None, eos_token_id=None))
        processor = dict(image_processor_type="Qwen2VLImageProcessor", do_resize=True, resample=3, do_rescale=True,
                         rescale_factor=1 / 255, do_normalize=True, image_mean=CLIP_MEAN, image_std=CLIP_STD,
                         patch_size=4, merge_size=2, temporal_patch_size=2, min_pixels=16 * 16, max_pixels=64 * 64)
    return config, processor


def save_random_vision_encoder(kind: str, path: str | Path) -> Path:
    """A random vision encoder in directory `path`: kind is a model_type of vlm.VISION_ENCODERS, or
    "siglip" / "clip" for a whole text + vision checkpoint."""
    torch.manual_seed(0)
    path = Path(path)
    vision = dict(TINY_VISION, image_size=TINY_IMAGE, patch_size=8)
    if kind in ("siglip", "clip"):
        text = dict(TINY_VISION, vocab_size=100, max_position_embeddings=16)
        config = AutoConfig.for_model(kind, text_config=text, vision_config=vision)
    else:
        config = AutoConfig.for_model(kind, **vision, **({"num_register_tokens": 4} if "registers" in kind else {}))
    AutoModel.from_config(config).save_pretrained(path)
    common = dict(do_resize=True, resample=3, do_rescale=True, rescale_factor=1 / 255, do_normalize=True)
    if kind.startswith("siglip"):  # google/siglip-*: exact resize, 0.5 mean and std
        processor = dict(image_processor_type="SiglipImageProcessor", size={"height": TINY_IMAGE, "width": TINY_IMAGE},
                         image_mean=HALF, image_std=HALF)
    elif kind.startswith("clip"):  # openai/clip-*: shortest edge, centre crop
        processor = dict(image_processor_type="CLIPImageProcessor", size={"shortest_edge": TINY_IMAGE},
                         do_center_crop=True, crop_size={"height": TINY_IMAGE, "width": TINY_IMAGE},
                         image_mean=CLIP_MEAN, image_std=CLIP_STD)
    elif kind.startswith("dinov2"):  # facebook/dinov2-*: 256 -> crop 224, ImageNet statistics
        processor = dict(image_processor_type="BitImageProcessor", size={"shortest_edge": TINY_IMAGE * 8 // 7},
                         do_center_crop=True, crop_size={"height": TINY_IMAGE, "width": TINY_IMAGE},
                         image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)
    else:  # google/vit-*: exact resize, 0.5 mean and std
        processor = dict(image_processor_type="ViTImageProcessor", size={"height": TINY_IMAGE, "width": TINY_IMAGE},
                         image_mean=HALF, image_std=HALF, resample=2)
    (path / "preprocessor_config.json").write_text(json.dumps(common | processor, indent=1))
    return path
