"""Every supported pretrained backbone family through the whole path: a random tiny one saved with
save_pretrained, built from the model config, trained a few steps, saved, reloaded without its
original directory to identical actions, exported to ONNX and run by onnxruntime with the same
bins as torch (CUDA graphs on a GPU)."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from vla.model import ModelConfig, create
from vla.model.checkpoint import load_checkpoint, save_checkpoint
from vla.model.random_backbones import save_random_vision_encoder, save_random_vlm
from vla.model.vlm import VLM_FAMILIES
from vla.runtime import load_runtime, torch_runtime
from vla.runtime.export import export_onnx

TINY = dict(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, max_text_tokens=12, chunk=2,
            image_size=32, vision_film=False, decoders=("parallel", "autoregressive"))
PATCH = {"idefics3": 16, "smolvlm": 16, "paligemma": 8, "qwen2_vl": 8, "qwen2_5_vl": 8}  # pixels per image token
# (backbone, image size, exported). An export takes ~20 s on 2 cores, so those of the same code path
# are left out: idefics3 runs smolvlm's graph; CLIP and ViT that of SigLIP and DINOv2 (transformers'
# own tower, then the last patch tokens), here with position interpolation (SigLIP at half its size)
# and prefix tokens (DINOv2's CLS).
FAMILIES = [("idefics3", 32, False), ("smolvlm", 32, True), ("paligemma", 32, True), ("qwen2_vl", 32, True),
            ("qwen2_5_vl", 32, True), ("siglip", 16, True), ("dinov2", 32, True), ("clip_vision_model", 32, False),
            ("vit", 32, False)]
CORPUS = ["touch the red cube", "reach the blue ball", "move to the green cylinder", "touch the yellow ball",
          "pick up the green cube"]


def save_backbone(name: str, path):
    return (save_random_vlm if name in VLM_FAMILIES else save_random_vision_encoder)(name, path)


def config_for(name: str, path, **overrides) -> ModelConfig:
    if name in VLM_FAMILIES:
        values = dict(vision="vlm", pretrained=str(path), patch_size=PATCH[name])
    else:
        values = dict(vision="pretrained", vision_pretrained=str(path), patch_size=8)
    return ModelConfig(**{**TINY, **values, **overrides})


def train_steps(model, batch, steps: int = 4) -> list[float]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    losses = []
    for _ in range(steps):
        out = model(**batch)
        out["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(out["loss"].item())
    return losses


@pytest.mark.slow
@pytest.mark.parametrize("name, size, exported", FAMILIES)
def test_train_save_reload_export(tmp_path, stats, training_batch, observations, name, size, exported):
    backbone = save_backbone(name, tmp_path / "backbone")
    torch.manual_seed(0)
    model, processor = create(config_for(name, backbone, image_size=size), stats, CORPUS)
    losses = train_steps(model, training_batch(processor, 4)[0])
    assert losses[-1] < losses[0], losses
    with torch.no_grad():  # sharper logits: decisive bins for the comparisons, not an untrained model's ties
        model.lm.get_output_embeddings().weight[model.action_offset :].mul_(20.0)
    checkpoint = save_checkpoint(tmp_path / "checkpoint", model.eval(), processor)
    shutil.rmtree(backbone)  # the checkpoint must not need the original directory
    loaded, loaded_processor = load_checkpoint(checkpoint)
    obs = observations(3, size=size)
    for decoder in ("parallel", "autoregressive"):
        np.testing.assert_array_equal(torch_runtime(loaded, loaded_processor, decoder).predict(obs),
                                      torch_runtime(model, processor, decoder).predict(obs))
    if not exported:
        return
    report = export_onnx(loaded, loaded_processor, checkpoint, checkpoint / "model.onnx", observations(4, 1, size=size))
    assert report["bins_disagreeing"] == 0 and report["max_abs_logit_error"] < 1e-4
    onnx, eager = load_runtime(checkpoint, "onnx", "cpu"), load_runtime(checkpoint, "torch", "cpu", "parallel")
    for batch in (1, 3):  # the batch axis stays dynamic
        inputs = eager.processor.inputs(observations(batch, 7, size=size))
        assert torch.equal(onnx.decode(inputs), eager.decode(inputs))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["smolvlm", "paligemma", "qwen2_5_vl", "siglip"])
def test_cuda_graphs_match_eager_cuda(tmp_path, stats, observations, training_batch, name):
    """bf16 weights, static KV cache (PaliGemma's explicit mask over its whole length), one graph.
    Trained first: an untrained VLM's action logits are near ties, which any bf16 rounding reorders
    (on an H200 graph and eager agreed on 40-67 % of the bins; on CPU, fp32 against bf16 autocast on
    0-5 % untrained and 90-100 % after these 8 steps)."""
    torch.manual_seed(0)
    model, processor = create(config_for(name, save_backbone(name, tmp_path / "backbone")), stats, CORPUS)
    train_steps(model, training_batch(processor, 4)[0], steps=8)
    checkpoint = save_checkpoint(tmp_path / "checkpoint", model.eval(), processor)
    obs = observations(3, 5, size=32)
    for decoder in ("parallel", "autoregressive"):
        graph = load_runtime(checkpoint, "torch", "cuda", decoder)
        eager = load_runtime(checkpoint, "torch", "cuda", decoder, cuda_graphs=False)
        assert "cuda-graph" in graph.name
        assert (graph.predict(obs) == eager.predict(obs)).mean() > 0.9  # bf16 graph vs bf16 autocast: rare ties
