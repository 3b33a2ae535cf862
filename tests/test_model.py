"""The VLA model: action and text tokenizers, both decoders (overfitting a few samples), inputs."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sim.contracts import ACTION_HIGH, ACTION_LOW
from vla.config import ConfigError, from_dict
from vla.model import ActionTokenizer, ModelConfig, VLAModel
from vla.model.text_tokenizer import build_tokenizer, instruction_corpus

STATS = {
    "action": {"q01": ACTION_LOW.tolist(), "q99": ACTION_HIGH.tolist()},
    "state": {"mean": [0.0] * 15, "std": [1.0] * 15},
    "imu": {"mean": [0.0] * 6, "std": [1.0] * 6},
}
TINY = dict(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128, vision_width=32, max_text_tokens=8, chunk=2)
INSTRUCTIONS = ["touch the red cube", "reach the blue ball", "move to the green cylinder", "touch the yellow ball"]


def tiny_model(**overrides) -> VLAModel:
    torch.manual_seed(0)
    return VLAModel.create(ModelConfig(**{**TINY, **overrides}), STATS)


def random_batch(model: VLAModel, n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    c = model.config
    low, high = torch.from_numpy(ACTION_LOW), torch.from_numpy(ACTION_HIGH)
    ids, mask = model.prompt.encode([INSTRUCTIONS[i % len(INSTRUCTIONS)] for i in range(n)])
    return {
        "image": torch.randint(0, 256, (n, c.image_size, c.image_size, 3), dtype=torch.uint8, generator=g),
        "state": torch.randn(n, 15, generator=g), "imu": torch.randn(n, c.imu_window, 6, generator=g),
        "text_ids": ids, "text_mask": mask,
        "actions": low + (high - low) * torch.rand(n, c.chunk, 7, generator=g),
        "action_mask": torch.ones(n, c.chunk, dtype=torch.bool),
    }


def observations(batch: dict) -> list[dict]:
    return [{"image": batch["image"][i].numpy(), "state": batch["state"][i].numpy(), "imu": batch["imu"][i].numpy(),
             "instruction": INSTRUCTIONS[i % len(INSTRUCTIONS)]} for i in range(len(batch["image"]))]


# ---- action tokens ------------------------------------------------------------------------------
def test_action_tokenizer_round_trip_within_half_a_bin():
    tokenizer = ActionTokenizer(ACTION_LOW, ACTION_HIGH, bins=256)
    actions = torch.from_numpy(np.random.default_rng(0).uniform(ACTION_LOW, ACTION_HIGH, (1000, 7)).astype(np.float32))
    bins = tokenizer.encode(actions)
    assert bins.dtype == torch.long and bins.min() >= 0 and bins.max() <= 255
    error = (tokenizer.decode(bins) - actions).abs()
    assert torch.all(error <= tokenizer.bin_width / 2 + 1e-6)


def test_action_tokenizer_clips_and_handles_constant_dimensions():
    low, high = ACTION_LOW.copy(), ACTION_HIGH.copy()
    low[6] = high[6] = 1.0  # gripper always open in the data
    tokenizer = ActionTokenizer(low, high)
    outside = torch.tensor([[-1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0]])
    bins = tokenizer.encode(outside)
    assert bins[0, 0] == 0 and bins[0, 1] == 255
    assert tokenizer.decode(bins)[0, 6].item() == pytest.approx(1.0, abs=1e-6)


def test_action_tokenizer_rejects_bad_quantiles():
    with pytest.raises(ValueError, match="q99 >= q01"):
        ActionTokenizer(ACTION_HIGH, ACTION_LOW)
    with pytest.raises(ValueError, match="shape"):
        ActionTokenizer([0.0] * 6, [1.0] * 6)


# ---- text ---------------------------------------------------------------------------------------
def test_text_tokenizer_covers_templates_and_unseen_words():
    tokenizer = build_tokenizer(512)
    corpus = instruction_corpus()
    assert "touch the red cube" in corpus and any("bin" in text for text in corpus)
    assert max(len(tokenizer(text)["input_ids"]) for text in corpus) <= 8  # common words are single tokens
    unseen = "Grab the turquoise pyramid, quickly!"
    ids = tokenizer(unseen)["input_ids"]
    assert tokenizer.unk_token_id not in ids and tokenizer.decode(ids) == unseen  # byte-level: nothing is lost


def test_prompt_encoder_layout():
    model = tiny_model()
    c = model.config
    ids, mask = model.prompt.encode(["touch the red cube", "put the gripper on the orange cylinder"])
    assert ids.shape == mask.shape == (2, c.prefix_length)
    image_id = model.prompt.placeholder_ids["image"]
    assert (ids == image_id).sum(1).tolist() == [c.image_tokens] * 2
    assert torch.all(ids[:, -1] == model.prompt.action_start_id) and torch.all(mask[:, -1])
    assert mask[0].sum() < mask[1].sum()  # the shorter instruction is padded
    with pytest.warns(UserWarning, match="cut"):
        long_ids, _ = model.prompt.encode(["touch the red cube " * 10])
    assert long_ids.shape == (1, c.prefix_length)
    with pytest.raises(ValueError, match="special token"):
        model.prompt.encode(["touch the <image>"])


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
    with pytest.raises(ConfigError, match="unknown key"):
        from_dict(ModelConfig, {"hiden_size": 64})


# ---- the model ----------------------------------------------------------------------------------
def test_tiny_model_overfits_with_both_decoders():
    """Both decoders train on the same weights and tokens; after overfitting, greedy decoding
    (parallel: one pass; autoregressive: KV cache) reproduces the training actions."""
    model = tiny_model(decoders=("parallel", "autoregressive"))
    batch = random_batch(model, 8)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(80):
        out = model(**batch)
        out["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
    assert out["accuracy_parallel"] > 0.95 and out["accuracy_autoregressive"] > 0.95, out
    model.eval()
    obs = observations(batch)
    tolerance = model.action_tokenizer.bin_width.numpy() / 2 + 1e-6
    for decoder in ("parallel", "autoregressive"):
        predicted = model.predict(obs, decoder)
        assert predicted.shape == (8, 2, 7) and predicted.dtype == np.float32
        close = np.abs(predicted - batch["actions"].numpy()) <= tolerance
        assert close.mean() > 0.95, decoder


def test_masked_chunk_steps_do_not_count():
    model = tiny_model()
    batch = random_batch(model, 4)
    full = model(**batch)["loss"]
    batch["action_mask"][:, 1] = False
    batch["actions"][:, 1] = 1e3  # garbage past the episode end must not matter
    assert not torch.isclose(model(**batch)["loss"], full)
    batch["actions"][:, 1] = -1e3
    first = model(**batch)["loss"]
    batch["actions"][:, 1] = 1e3
    assert torch.isclose(model(**batch)["loss"], first)


def test_autoregressive_cache_matches_full_forward():
    model = tiny_model(decoders=("autoregressive",)).eval()
    inputs = model.preprocess(observations(random_batch(model, 3)))
    with torch.no_grad():
        bins = model.generate_autoregressive(**inputs)
        prefix = model.embed_prefix(**inputs)
        assert torch.equal(model._teacher_forced_logits(prefix, bins).argmax(-1), bins)


def test_parallel_decoder_is_a_pure_tensor_function():
    model = tiny_model().eval()
    inputs = model.preprocess(observations(random_batch(model, 2)))
    with torch.no_grad():
        logits = model.forward_parallel(inputs["image"], inputs["state"], inputs["imu"], inputs["text_ids"], inputs["text_mask"])
    assert logits.shape == (2, model.config.action_tokens, model.config.action_bins)


def test_instruction_changes_the_prediction_through_film():
    """FiLM starts as the identity; once trained it must make the image features depend on text."""
    model = tiny_model()
    with torch.no_grad():
        for film in model.image_encoder.convs.films:
            film.weight.normal_(0, 0.5)
    inputs = model.preprocess([{**observations(random_batch(model, 1))[0], "instruction": text} for text in INSTRUCTIONS[:2]])
    inputs["image"] = inputs["image"][:1].expand(2, -1, -1, -1)
    features = model.image_encoder(inputs["image"], model.lm.get_input_embeddings()(inputs["text_ids"]).mean(1))
    assert not torch.allclose(features[0], features[1])


def test_sensors_follow_the_prompt():
    model = tiny_model(prompt="{instruction}<state><image>")  # no IMU, text first
    assert model.imu_encoder is None and model.config.sensor_order == ["state", "image"]
    out = model(**random_batch(model, 2))
    assert torch.isfinite(out["loss"])


@pytest.mark.parametrize("vision", ["vit", "keypoints"])
def test_other_vision_encoders(vision):
    model = tiny_model(vision=vision, vision_film=vision == "keypoints", keypoints=8)
    out = model(**random_batch(model, 2))
    assert torch.isfinite(out["loss"])
    assert model.predict(observations(random_batch(model, 1))).shape == (1, 2, 7)


def test_any_transformers_causal_lm_from_config():
    model = tiny_model(lm_type="gpt2")
    assert type(model.lm).__name__ == "GPT2LMHeadModel"
    assert model.predict(observations(random_batch(model, 1))).shape == (1, 2, 7)


def test_preprocess_validates_and_resizes():
    model = tiny_model().eval()
    obs = observations(random_batch(model, 1))[0]
    big = {**obs, "image": np.zeros((120, 160, 3), np.uint8)}
    assert model.preprocess(big)["image"].shape == (1, 96, 96, 3)
    with pytest.raises(ValueError, match="'image' must be uint8"):
        model.preprocess({**obs, "image": obs["image"].astype(np.float32)})
    with pytest.raises(ValueError, match="'state' must have shape"):
        model.preprocess({**obs, "state": np.zeros(7, np.float32)})
    with pytest.raises(ValueError, match="'image' must be uint8"):
        model.preprocess({k: v for k, v in obs.items() if k != "image"})
    with pytest.raises(ValueError, match="was not trained"):
        model.predict(obs, decoder="autoregressive")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_prediction_matches_cpu():
    model = tiny_model().eval()
    obs = observations(random_batch(model, 4))
    on_cpu = model.predict(obs)
    on_gpu = model.to("cuda").predict(obs)  # bf16 autocast: allow a few bins of difference
    assert np.abs(on_gpu - on_cpu).max() <= 4 * model.action_tokenizer.bin_width.max().item()
