"""The VLA model: both decoders (overfitting a few samples), the KV cache, sensors and encoders,
any transformers causal LM. Tensors in, tensors out."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from vla.contracts.observation import STATE_SLICES
from vla.model import ModelConfig
from vla.model.model import drop_padding
from vla.runtime import torch_runtime


def test_model_config_validation():
    with pytest.raises(ValueError, match="instruction"):
        ModelConfig(prompt="<image><state>")
    with pytest.raises(ValueError, match="unknown placeholder"):
        ModelConfig(prompt="<image><depth>{instruction}")
    with pytest.raises(ValueError, match="wrist_camera"):
        ModelConfig(prompt="<image><wrist_image>{instruction}")
    with pytest.raises(ValueError, match="decoders"):
        ModelConfig(decoders=("beam",))
    with pytest.raises(ValueError, match="multiple of patch_size"):
        ModelConfig(image_size=100)
    with pytest.raises(ValueError, match=r"image_size must be an integer in 1\.\.1024"):
        ModelConfig(image_size=1_000_000)  # a damaged config must not ask for terabytes
    with pytest.raises(ValueError, match="hidden_size"):
        ModelConfig(hidden_size=True)
    with pytest.raises(ValueError, match="token_merge"):
        ModelConfig(token_merge=4)  # 96 / 16 = 6 patches a side
    with pytest.raises(ValueError, match="token_merge needs vision: cnn"):
        ModelConfig(vision="vit", vision_film=False, token_merge=2)
    with pytest.raises(ValueError, match="film_text"):
        ModelConfig(film_text="lstm")
    with pytest.raises(ValueError, match="film_gripper needs vision_film"):
        ModelConfig(vision="vit", vision_film=False, film_gripper=True)
    with pytest.raises(ValueError, match="film_gripper_gate and film_gripper_dropout need film_gripper"):
        ModelConfig(film_gripper_gate=True)


def test_tiny_model_overfits_with_both_decoders(tiny_model, training_batch):
    """Both decoders train on the same weights and tokens; after overfitting, greedy decoding
    (parallel: one pass; autoregressive: KV cache) reproduces the training actions."""
    model, processor = tiny_model(decoders=("parallel", "autoregressive"))
    batch, obs, actions = training_batch(processor, 8)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(80):
        out = model(**batch)
        out["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
    assert out["accuracy_parallel"] > 0.95 and out["accuracy_autoregressive"] > 0.95, out
    tolerance = processor.action_tokenizer.bin_width / 2 + 1e-6
    for decoder in ("parallel", "autoregressive"):
        predicted = torch_runtime(model, processor, decoder).predict(obs)
        assert predicted.shape == (8, 2, 7) and predicted.dtype == np.float32
        close = np.abs(predicted - actions) <= tolerance
        assert close.mean() > 0.95, decoder


def test_masked_chunk_steps_do_not_count(tiny_model, training_batch):
    model, processor = tiny_model()
    batch, _, _ = training_batch(processor, 4)
    full = model(**batch)["loss"]
    batch["action_mask"][:, 1] = False
    batch["action_bins"][:, 1] = 255  # garbage past the episode end must not matter
    assert not torch.isclose(model(**batch)["loss"], full)
    batch["action_bins"][:, 1] = 0
    first = model(**batch)["loss"]
    batch["action_bins"][:, 1] = 255
    assert torch.isclose(model(**batch)["loss"], first)


def test_autoregressive_cache_matches_full_forward(tiny_model, observations):
    model, processor = tiny_model(decoders=("autoregressive",))
    inputs = processor.inputs(observations(3))
    with torch.no_grad():
        bins = model.eval().generate_autoregressive(**inputs)
        prefix = model.embed_prefix(**inputs)
        assert torch.equal(model._teacher_forced_logits(prefix, bins).argmax(-1), bins)


def test_parallel_decoder_is_a_pure_tensor_function(tiny_model, observations):
    model, processor = tiny_model()
    inputs = processor.inputs(observations(2))
    with torch.no_grad():
        logits = model.eval().forward_parallel(inputs["image"], inputs["state"], inputs["imu"], inputs["text_ids"],
                                               inputs["text_mask"])
    assert logits.shape == (2, model.config.action_tokens, model.config.action_bins)


def test_instruction_changes_the_prediction_through_film(tiny_model, observations):
    """FiLM starts as the identity; once trained it must make the image features depend on text."""
    model, processor = tiny_model()
    with torch.no_grad():
        for film in model.image_encoder.convs.films:
            film.weight.normal_(0, 0.5)
    obs = observations(2)
    inputs = processor.inputs(
        [{**obs[0], "instruction": text} for text in ("touch the red cube", "reach the blue ball")]
    )
    inputs["image"] = inputs["image"][:1].expand(2, -1, -1, -1)
    features = model.image_encoder(inputs["image"], model.lm.get_input_embeddings()(inputs["text_ids"]).mean(1))
    assert not torch.allclose(features[0], features[1])


@pytest.mark.parametrize("film_text", ["mean", "conv"])
def test_film_condition_sees_word_order_only_when_convolved(tiny_model, observations, film_text):
    """The mean embedding cannot tell which colour names the cube and which the bin; a convolution
    over the embeddings can."""
    model, processor = tiny_model(film_text=film_text)
    with torch.no_grad():
        for film in model.image_encoder.convs.films:
            film.weight.normal_(0, 0.5)
    obs = observations(1)[0]
    texts = ("put the red cube in the blue bin", "put the blue cube in the red bin")
    inputs = processor.inputs([{**obs, "instruction": text} for text in texts])
    with torch.no_grad():
        embeds = model.embed_prefix(**inputs)[0]
    image = inputs["text_ids"][0] == model.ids.placeholders["image"]  # the image tokens, FiLM-conditioned
    assert image.sum() == model.config.image_tokens
    assert torch.allclose(embeds[0, image], embeds[1, image], atol=1e-6) == (film_text == "mean")


@pytest.mark.parametrize("gripper", [{}, {"film_gripper": True}, {"film_gripper": True, "film_gripper_gate": True}],
                         ids=["off", "added", "gate"])
def test_film_gripper_conditions_the_image_on_the_gripper_width(tiny_model, observations, gripper):
    """Open fingers and fingers holding a cube give different image tokens with film_gripper (once
    trained: FiLM starts as the identity), added to the instruction's summary or scaling it; the
    same without it (the width then reaches the LM through the state token alone)."""
    film_gripper = bool(gripper)
    model, processor = tiny_model(**gripper)
    with torch.no_grad():
        for film in model.image_encoder.convs.films:
            film.weight.normal_(0, 0.5)
        if film_gripper:
            model.gripper_condition[2].weight.normal_(0, 0.5)
    obs = observations(1)[0]
    states = [obs["state"].copy() for _ in range(2)]
    states[0][STATE_SLICES["gripper_width"]], states[1][STATE_SLICES["gripper_width"]] = 0.08, 0.04
    inputs = processor.inputs([{**obs, "state": state} for state in states])
    with torch.no_grad():
        embeds = model.embed_prefix(**inputs)[0]
    image = inputs["text_ids"][0] == model.ids.placeholders["image"]
    assert torch.allclose(embeds[0, image], embeds[1, image], atol=1e-6) != film_gripper


def test_film_gripper_dropout_leaves_the_width_out_of_some_training_samples_only(tiny_model, observations):
    """With film_gripper_dropout, about that share of training samples gets image tokens as if the
    width were not in the FiLM condition; at inference every sample has it."""
    model, processor = tiny_model(film_gripper=True, film_gripper_dropout=0.5)
    with torch.no_grad():
        for film in model.image_encoder.convs.films:
            film.weight.normal_(0, 0.5)
        model.gripper_condition[2].weight.normal_(0, 0.5)
    inputs = processor.inputs([observations(1)[0]] * 64)
    image = inputs["text_ids"][0] == model.ids.placeholders["image"]
    with torch.no_grad():
        with_width = model.eval().embed_prefix(**inputs)[0][:, image]
        training = model.train().embed_prefix(**inputs)[0][:, image]
        model.gripper_condition = None  # the condition without the width
        without = model.embed_prefix(**inputs)[0][:, image]
    assert torch.allclose(with_width, with_width[:1].expand_as(with_width), atol=1e-6)
    dropped = torch.tensor([torch.allclose(t, without[0], atol=1e-6) for t in training])
    kept = torch.tensor([torch.allclose(t, with_width[0], atol=1e-6) for t in training])
    assert not torch.allclose(with_width[0], without[0], atol=1e-6)
    assert torch.all(dropped ^ kept) and 16 <= int(dropped.sum()) <= 48


def test_sensors_follow_the_prompt(tiny_model, training_batch):
    model, processor = tiny_model(prompt="{instruction}<state><image>")  # no IMU, text first
    assert model.imu_encoder is None and model.config.sensor_order == ["state", "image"]
    out = model(**training_batch(processor, 2)[0])
    assert torch.isfinite(out["loss"])


def test_merged_image_tokens(tiny_model, training_batch, observations):
    model, processor = tiny_model(token_merge=2)
    assert model.config.image_tokens == 9 and model.image_encoder.position.shape == (9, 4 * 32)
    assert torch.isfinite(model(**training_batch(processor, 2)[0])["loss"])
    assert torch_runtime(model, processor).predict(observations(1)).shape == (1, 2, 7)


def test_dropping_common_padding_leaves_the_loss(tiny_model, training_batch):
    """Columns that are padding in every row cost compute and change nothing: the loss is the same
    with max_text_tokens 40, trimmed to the longest instruction, or to a multiple of 8 columns."""
    model, processor = tiny_model(max_text_tokens=40)
    model.eval()
    batch = training_batch(processor, 3)[0]
    longest = int(batch["text_mask"].any(0).sum())
    losses = {}
    for multiple in (None, 1, 8):
        ids, mask = (batch["text_ids"], batch["text_mask"]) if multiple is None else drop_padding(
            batch["text_ids"], batch["text_mask"], multiple)
        assert ids.shape == mask.shape and ids.shape[1] == (
            batch["text_ids"].shape[1] if multiple is None else -(-longest // multiple) * multiple)
        with torch.no_grad():
            losses[multiple] = model(**(batch | {"text_ids": ids, "text_mask": mask}))["loss"].item()
    assert losses[1] == pytest.approx(losses[None], rel=1e-5) and losses[8] == pytest.approx(losses[None], rel=1e-5)
    assert longest % 8, "the example should need padding to the multiple"


@pytest.mark.parametrize("vision", ["vit", "keypoints"])
def test_other_vision_encoders(tiny_model, training_batch, observations, vision):
    model, processor = tiny_model(vision=vision, vision_film=vision == "keypoints", keypoints=8)
    out = model(**training_batch(processor, 2)[0])
    assert torch.isfinite(out["loss"])
    assert torch_runtime(model, processor).predict(observations(1)).shape == (1, 2, 7)


def test_any_transformers_causal_lm_from_config(tiny_model, observations):
    model, processor = tiny_model(lm_type="gpt2")
    assert type(model.lm).__name__ == "GPT2LMHeadModel"
    assert torch_runtime(model, processor).predict(observations(1)).shape == (1, 2, 7)


def test_untrained_decoder_is_refused(tiny_model):
    model, processor = tiny_model()
    with pytest.raises(ValueError, match="was not trained"):
        torch_runtime(model, processor, "autoregressive")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_prediction_matches_cpu(tiny_model, observations):
    model, processor = tiny_model()
    obs = observations(4)
    on_cpu = torch_runtime(model.eval(), processor).predict(obs)
    on_gpu = torch_runtime(model.to("cuda"), processor).predict(obs)  # bf16 autocast: allow a few bins of difference
    assert np.abs(on_gpu - on_cpu).max() <= 4 * processor.action_tokenizer.bin_width.max()
