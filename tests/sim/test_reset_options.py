"""`env.reset(options={"instruction": ...})`: another instruction for one episode, literal or a
template filled from the episode's scene, with the scene and the goal unchanged; bad options fail
with one clear line."""
import gymnasium as gym
import numpy as np
import pytest

from sim import ENV_IDS, make_env


def test_instruction_option_replaces_the_words_for_one_episode_only():
    env = make_env("reach")
    own, info = env.reset(seed=4)
    told, told_info = env.reset(seed=4, options={"instruction": "Touch the thing, please!"})
    assert told["instruction"] == env.instruction == "Touch the thing, please!" != own["instruction"]
    assert np.array_equal(told["image"], own["image"]) and np.array_equal(told["state"], own["state"])
    assert told_info["target"] == info["target"]  # the goal stays the task's
    obs, *_ = env.step(env.action_space.sample())
    assert obs["instruction"] == "Touch the thing, please!"  # for the whole episode
    assert env.reset(seed=4)[0]["instruction"] == own["instruction"]  # and only for it
    env.close()


@pytest.mark.parametrize("task, template", [
    ("reach", "grab the {colour} {shape}"),
    ("pick", "lift the {colour} {shape} up"),
    ("push", "shove the {colour} block {place}"),
    ("place", "the {colour} cube goes in the {bin_colour} bin"),
])
def test_instruction_templates_are_filled_from_the_scene(task, template):
    env = make_env(task)
    for seed in (0, 1, 2):
        own = env.reset(seed=seed)[0]["instruction"]
        obs, info = env.reset(seed=seed, options={"instruction": template})
        target = env.task.target
        words = {"colour": target.colour, "shape": target.shape}
        if task == "push":  # the direction of the goal, in plain words
            words["place"] = {"left": "to the left", "right": "to the right"}.get(*[env.task.words["direction"]] * 2)
        if task == "place":
            words["bin_colour"] = env.task.bin.colour
        assert obs["instruction"] == template.format(**words) != own
        assert info["target"] == target.name
    env.close()


def test_options_pass_through_gymnasium_make():
    env = gym.make(ENV_IDS["pick"])
    obs, _ = env.reset(seed=1, options={"instruction": "lift the {colour} one"})
    assert obs["instruction"] == f"lift the {env.unwrapped.task.target.colour} one"
    env.close()


@pytest.mark.parametrize("options, message", [
    ({"phrasing": "x"}, r"unknown reset option\(s\) \['phrasing'\]; known: \['instruction'\]"),
    ("touch it", "reset options must be a dict"),
    ({"instruction": 3}, "'instruction' must be a str"),
    ({"instruction": "touch the {size} ball"}, r"unknown field\(s\) \['size'\]; the reach task fills"),
    ({"instruction": "touch the {colour"}, "touch the {colour"),
    ({"instruction": "   "}, "expected 1 to 256 characters"),
    ({"instruction": "x" * 257}, "expected 1 to 256 characters"),
    ({"instruction": "touch the {colour} ball @ once"}, "characters '@' are not allowed"),
])
def test_bad_options_fail_clearly(options, message):
    env = make_env("reach")
    with pytest.raises(ValueError, match=message):
        env.reset(seed=0, options=options)
    assert env.reset(seed=0)[0]["instruction"]  # the env is still usable
    env.close()
