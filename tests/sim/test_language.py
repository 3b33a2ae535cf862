"""Instructions as people write them: a rich grammar for training, held-out phrasings kept apart for
evaluation, both naming the episode's objects."""
import itertools

import numpy as np
import pytest

from sim import SimConfig, language, make_env
from sim.language import FRAMES, NAMES, SPLITS, VERBS
from vla.contracts.observation import INSTRUCTION_CHARSET, INSTRUCTION_MAX_LENGTH

WORDS = {"colour": "red", "shape": "ball", "bin_colour": "blue", "direction": "left"}


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("task", ["reach", "pick", "push", "place"])
def test_instructions_are_valid_and_name_the_objects(task, split):
    rng = np.random.default_rng(0)
    texts = {language.instruction(task, WORDS, split, rng) for _ in range(300)}
    assert len(texts) > 50  # far more than a few templates
    for text in texts:
        assert set(text) <= set(INSTRUCTION_CHARSET) and len(text) <= INSTRUCTION_MAX_LENGTH
        assert len(text.split()) <= 20, text
        colours = NAMES[split][0]
        assert any(word in text for word in colours["red"]), text
        if task == "place":
            assert any(word in text.split("the")[-1] for word in colours["blue"]), text  # the bin's colour


def test_held_out_requests_are_never_trained_on():
    for task in VERBS["train"]:
        assert not set(VERBS["heldout"][task]) & set(VERBS["train"][task])
    assert not set(FRAMES["heldout"]) & set(FRAMES["train"])
    train = set(language.corpus("train", per_task=500))
    assert not train & set(language.corpus("heldout", per_task=500))
    assert language.vocabulary("heldout") - language.vocabulary("train")  # new words too ("hoist", ...)


def test_the_synonyms_split_names_objects_in_words_training_never_uses():
    said = {w.strip(",?") for text in language.corpus("synonyms", per_task=500) for w in text.split()}
    colours, shapes, bins = NAMES["synonyms"]
    for word in (*sum(colours.values(), ()), *sum(shapes.values(), ()), *bins):
        assert word not in language.vocabulary("train") and word in said
    assert not said & {w for words in NAMES["train"][0].values() for w in words}  # no training colour word


@pytest.mark.parametrize("split", SPLITS)
def test_every_request_is_traced_back_to_its_verb_phrase(split):
    colours, shapes, bins = NAMES[split]
    for verb in itertools.chain(*VERBS[split].values()):
        act = verb.format(obj=f"{colours['red'][-1]} {shapes['ball'][-1]}", direction="towards you",
                          bin=f"{colours['blue'][0]} {bins[-1]}")
        for frame in FRAMES[split]:
            assert language.verb_of(frame.format(act=act), split) == verb
    assert language.verb_of("dance the red ball", split) is None


def test_the_env_draws_from_the_configured_phrasings_on_a_stream_of_its_own():
    train_env, heldout_env = make_env("place"), make_env("place", SimConfig(phrasing="heldout"))
    for seed in (0, 1, 2):
        a, b = train_env.reset(seed=seed)[0], heldout_env.reset(seed=seed)[0]
        assert np.array_equal(a["image"], b["image"]) and a["instruction"] != b["instruction"]  # the same scene
        assert a["instruction"] == train_env.reset(seed=seed)[0]["instruction"]  # and the same words per seed
    train_env.close()
    heldout_env.close()
    with pytest.raises(ValueError, match="phrasing must be one of"):
        SimConfig(phrasing="shouting")
