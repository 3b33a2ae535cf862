"""The processor: observations -> tensors (checked, resized, normalised text), action bins <->
actions (RT-2 tokens, always inside the limits), and the text tokenizer behind it."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sim import language
from vla.contracts.action import ACTION_HIGH, ACTION_LOW
from vla.model.action_tokenizer import ActionTokenizer
from vla.model.processor import Processor
from vla.model.text import build_tokenizer, normalize_instruction


# ---- action tokens ------------------------------------------------------------------------------
def test_action_tokenizer_round_trip_within_half_a_bin():
    tokenizer = ActionTokenizer(ACTION_LOW, ACTION_HIGH, bins=256)
    actions = np.random.default_rng(0).uniform(ACTION_LOW, ACTION_HIGH, (1000, 7)).astype(np.float32)
    bins = tokenizer.encode(actions)
    assert bins.dtype == np.int64 and bins.min() >= 0 and bins.max() <= 255
    error = np.abs(tokenizer.decode(bins) - actions)
    assert np.all(error <= tokenizer.bin_width / 2 + 1e-6)


def test_action_tokenizer_clips_and_handles_constant_dimensions():
    low, high = ACTION_LOW.copy(), ACTION_HIGH.copy()
    low[6] = high[6] = 1.0  # gripper always open in the data
    tokenizer = ActionTokenizer(low, high)
    bins = tokenizer.encode([[-1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0]])
    assert bins[0, 0] == 0 and bins[0, 1] == 255
    assert tokenizer.decode(bins)[0, 6] == pytest.approx(1.0, abs=1e-6)


def test_action_tokenizer_rejects_bad_quantiles():
    with pytest.raises(ValueError, match="q99 >= q01"):
        ActionTokenizer(ACTION_HIGH, ACTION_LOW)
    with pytest.raises(ValueError, match="shape"):
        ActionTokenizer([0.0] * 6, [1.0] * 6)


def test_actions_stay_inside_the_limits_whatever_the_statistics(tiny_model):
    """Statistics wider than the limits (a damaged or hand-edited checkpoint) cannot make the
    processor return a step beyond the limits."""
    _, processor = tiny_model()
    wide = {**processor.stats, "action": {"q01": [-10.0] * 7, "q99": [10.0] * 7}}
    processor = Processor(processor.config, wide, processor.tokenizer)
    bins = torch.tensor([[0] * 7 + [255] * 7])  # the extreme bins: -10 and +10 per axis
    actions = processor.actions(bins)
    assert actions.shape == (1, 2, 7)
    assert np.array_equal(actions[0, 0], ACTION_LOW) and np.array_equal(actions[0, 1], ACTION_HIGH)


# ---- text ---------------------------------------------------------------------------------------
def test_text_tokenizer_covers_the_corpus_and_unseen_words():
    corpus = language.corpus()
    tokenizer = build_tokenizer(corpus, 512)
    assert any("bin" in text for text in corpus) and any("scarlet" in text for text in corpus)
    for text in corpus[:200]:  # common words are single tokens
        assert len(tokenizer(text)["input_ids"]) <= len(text.split()) + 2, text
    unseen = "grab the turquoise pyramid quickly"
    ids = tokenizer(unseen)["input_ids"]
    assert tokenizer.unk_token_id not in ids and tokenizer.decode(ids) == unseen  # byte-level: nothing is lost


@pytest.mark.parametrize("typed, normal", [
    ("  Touch the RED ball!", "touch the red ball"),
    ("touch\tthe red   ball.", "touch the red ball"),
    ("Pick up the green cube, please", "pick up the green cube please"),
    ("don't push the block", "don't push the block"),
])
def test_instructions_are_normalised(typed, normal):
    assert normalize_instruction(typed) == normal


def test_prompt_layout(tiny_model):
    model, processor = tiny_model()
    c = model.config
    ids, mask = processor.prompt.encode(["touch the red cube", "put the gripper on the orange cylinder"])
    assert ids.shape == mask.shape == (2, c.prefix_length)
    image_id = processor.ids.placeholders["image"]
    assert (ids == image_id).sum(1).tolist() == [c.image_tokens] * 2
    assert torch.all(ids[:, -1] == processor.ids.action_start) and torch.all(mask[:, -1])
    assert mask[0].sum() < mask[1].sum()  # the shorter instruction is padded
    shouted, _ = processor.prompt.encode(["TOUCH THE RED CUBE!"])
    assert torch.equal(shouted[0], ids[0])  # what people type reads as the same instruction
    with pytest.warns(UserWarning, match="cut"):
        long_ids, _ = processor.prompt.encode(["touch the red cube " * 10])
    assert long_ids.shape == (1, c.prefix_length)
    with pytest.raises(ValueError, match="special token"):
        processor.prompt.encode(["touch the <image>"])


# ---- observations -> tensors --------------------------------------------------------------------
def test_inputs_are_resized(tiny_model, observations):
    _, processor = tiny_model()
    obs = observations(1)[0]
    inputs = processor.inputs({**obs, "image": np.zeros((120, 160, 3), np.uint8)})
    assert inputs["image"].shape == (1, 96, 96, 3) and inputs["image"].dtype == torch.uint8
    assert inputs["state"].dtype == torch.float32 and inputs["imu"].shape == (1, 12, 6)


@pytest.mark.parametrize("change, message", [
    (lambda o: o | {"image": o["image"].astype(np.float32)}, "'image' must be a uint8"),
    (lambda o: {k: v for k, v in o.items() if k != "image"}, "'image' must be a uint8 .* got nothing"),
    (lambda o: o | {"image": np.zeros((0, 0, 3), np.uint8)}, "unusable size 0x0"),
    (lambda o: o | {"image": "a picture"}, "'image' must be a uint8"),
    (lambda o: o | {"state": np.zeros(7, np.float32)}, "'state' must have shape"),
    (lambda o: o | {"state": np.full(15, np.nan, np.float32)}, "'state' contains NaN or inf"),
    (lambda o: o | {"state": np.full(15, 1e6, np.float32)}, "'state' has an implausible value"),
    (lambda o: o | {"state": ["a"] * 15}, "'state' is not numeric"),
    (lambda o: o | {"state": ["0.1"] * 15}, "'state' is not numeric"),
    (lambda o: o | {"state": np.ones(15, complex)}, "'state' is not numeric: ndarray complex128"),
    (lambda o: o | {"imu": [[0.0] * 6] * 11 + [[0.0] * 5]}, "'imu' is not numeric"),
    (lambda o: o | {"imu": np.full((12, 6), 1e300)}, "'imu' has an implausible value"),
    (lambda o: o | {"imu": np.full((12, 6), np.inf)}, "'imu' contains NaN or inf"),
    (lambda o: o | {"instruction": 3}, "'instruction' must be a str"),
    (lambda o: o | {"instruction": " ?! "}, "instruction is empty"),
    (lambda o: o | {"instruction": "touch " * 100}, "characters long"),
])
def test_unusable_observations_are_clear_errors(tiny_model, observations, change, message):
    _, processor = tiny_model()
    with pytest.raises(ValueError, match=message):
        processor.inputs(change(observations(1)[0]))


@pytest.mark.parametrize("observations, message", [
    (42, "observations must be a dict or a non-empty list of dicts, got int"),
    ([], "non-empty list"),
    ([None], r"each observation must be a dict, got \['NoneType'\]"),
    ("obs", "got str"),
])
def test_observations_that_are_not_dicts_are_clear_errors(tiny_model, observations, message):
    _, processor = tiny_model()
    with pytest.raises(ValueError, match=message):
        processor.inputs(observations)


def test_words_the_model_was_not_trained_on(tiny_model, stats, tmp_path):
    from vla.model import ModelConfig, create
    from vla.model.checkpoint import load_checkpoint, save_checkpoint

    model, processor = create(ModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                                          vision_width=16, chunk=2), stats, [], ["touch the red cube", "Lift the BALL"])
    assert processor.unknown_words("TOUCH the red ball!") == []
    assert processor.unknown_words("hoist the crimson cube, hoist it") == ["hoist", "crimson", "it"]
    _, loaded = load_checkpoint(save_checkpoint(tmp_path / "ckpt", model, processor))
    assert loaded.vocabulary == processor.vocabulary
    assert tiny_model()[1].unknown_words("anything at all") == []  # no instructions given: nothing to say
