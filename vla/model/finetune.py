"""Fine-tuning a model with a pretrained LM: LoRA on the LM's attention and MLP layers (peft), merged
back into plain weights for saving and export, and gradient checkpointing. (Freezing the vision
tower is VLAModel.freeze_vision_tower.)"""
from __future__ import annotations

import copy

from vla.model.model import VLAModel

# The LM's decoder layers only: model.layers (a causal LM), model.text_model.layers (Idefics3,
# SmolVLM) or model.language_model.layers (PaliGemma, Qwen2-VL). Vision towers use the same layer
# names (SigLIP's q/k/v_proj, Qwen2.5's gate/up/down_proj), so names alone would adapt them too.
LORA_TARGETS = (r"model\.(text_model\.|language_model\.)?layers\.\d+\."
                r"(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)")


def apply_lora(model: VLAModel, rank: int, alpha: int) -> None:
    """Low-rank adapters on the LM's layers, whose weights and embedding table freeze except the rows
    of <act> and the action bins (peft's trainable tokens, new to the pretrained LM). Everything
    else trains as before: our encoders and action queries, a VLM's connector and its vision tower
    unless frozen."""
    from peft import LoraConfig, get_peft_model  # only LoRA needs peft

    lm = model.lm
    core = {id(p) for m in (lm.get_decoder(), lm.get_output_embeddings()) for p in m.parameters()}
    others = [p for p in model.parameters() if p.requires_grad and id(p) not in core]
    tokens = [model.ids.action_start, *range(model.action_offset, model.action_offset + model.config.action_bins)]
    tied = lm.get_output_embeddings().weight is lm.get_input_embeddings().weight
    rows = {"embed_tokens": tokens} | ({} if tied else {"lm_head": tokens})  # a tied head shares the rows
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=LORA_TARGETS,
                        trainable_token_indices=rows)
    model.lm = get_peft_model(lm, config)
    for p in others:  # peft froze the whole backbone
        p.requires_grad_(True)


def has_lora(model: VLAModel) -> bool:
    return hasattr(model.lm, "merge_and_unload")


def merge_lora(model: VLAModel) -> VLAModel:
    """The adapters folded into the LM's weights: a plain model again (changes logits by ~1e-7)."""
    if has_lora(model):
        model.lm = model.lm.merge_and_unload()
    return model


def merged_copy(model: VLAModel) -> VLAModel:
    """`model` itself, or with LoRA a merged copy to save while training goes on with the adapters."""
    return merge_lora(copy.deepcopy(model)) if has_lora(model) else model


def enable_gradient_checkpointing(model: VLAModel) -> None:
    """Recompute the activations of the LM's (and a pretrained vision tower's) layers in the backward
    pass instead of keeping them: less memory for a slower step. Non-reentrant, so that it works with
    frozen inputs (LoRA, a frozen tower)."""
    for module in (model.lm, model.vision_tower):
        if module is not None:
            module.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
