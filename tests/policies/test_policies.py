"""Policies behind one interface; VLAPolicy executing action chunks (temporal ensembling, open-loop
chunks)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from policies import Policy, RandomPolicy, load_policy
from policies.ensemble import temporal_ensemble
from policies.gripper import GripperLatch
from policies.vla_policy import VLAPolicy
from sim import make_env
from sim.expert import ScriptedExpert
from vla.contracts.observation import ObservationSpec
from vla.model.checkpoint import save_checkpoint
from vla.model.config import ModelConfig


class ScriptedModel:
    """Stands in for a Runtime: the chunk predicted at call n is n * 0.01 + 0.001 * (index in chunk),
    its gripper openings the next of `openings` (open throughout when none are given)."""

    def __init__(self, chunk: int, openings: list[float] | None = None, gripper_open_steps: int = 1):
        self.chunk, self.openings = chunk, list(openings or [])
        self.config = ModelConfig(chunk=chunk, execution="chunk", gripper_open_steps=gripper_open_steps)
        self.calls = 0

    def predict(self, obs):
        chunk = np.ones((1, self.chunk, 7), np.float32)
        chunk[0, :, :6] = 0.0
        chunk[0, :, 0] = self.calls * 0.01 + 0.001 * np.arange(self.chunk)
        for i in range(self.chunk):
            chunk[0, i, 6] = self.openings.pop(0) if self.openings else 1.0
        self.calls += 1
        return chunk


OBS = {"instruction": "touch the red cube"}


def test_chunk_execution_replans_after_execute_steps():
    model = ScriptedModel(chunk=4)
    policy = VLAPolicy(model, execution="chunk", execute_steps=2)
    policy.reset("touch the red cube")
    xs = [policy.act(OBS)[0] for _ in range(5)]
    np.testing.assert_allclose(xs, [0.0, 0.001, 0.01, 0.011, 0.02], atol=1e-7)
    assert model.calls == 3


def test_temporal_ensembling_weights_newer_chunks_more():
    model = ScriptedModel(chunk=3)
    policy = VLAPolicy(model, execution="ensemble", ensemble_decay=0.5)
    policy.reset("touch the red cube")
    xs = [policy.act(OBS)[0] for _ in range(3)]
    # step 2 combines chunk 2 (index 0, age 0), chunk 1 (index 1, age 1) and chunk 0 (index 2, age 2)
    weights = np.exp(-0.5 * np.arange(3))
    expected = (weights * np.array([0.02, 0.011, 0.002])).sum() / weights.sum()
    assert xs[2] == pytest.approx(expected, abs=1e-6)
    assert model.calls == 3


def test_the_gripper_follows_the_newest_chunk_not_a_mean():
    """Chunks disagreeing on the gripper (open 1, closed 0) must not give half-open fingers."""
    predictions = np.zeros((3, 7))
    predictions[:, 0] = [0.03, 0.02, 0.01]
    predictions[:, 6] = [0.0, 1.0, 1.0]  # the newest (age 0) closes
    action = temporal_ensemble(predictions, np.array([0, 1, 2]), 0.5)
    weights = np.exp(-0.5 * np.arange(3))
    assert action[0] == pytest.approx((weights * predictions[:, 0]).sum() / weights.sum(), abs=1e-7)
    assert action[6] == 0.0 and action.dtype == np.float32


def test_a_closed_gripper_opens_only_on_a_steady_request():
    """Open (1) after closing (0.2) passes on the third request in a row; closing is never delayed;
    the rest of the action passes untouched."""
    latch = GripperLatch(open_steps=3)
    openings = [1.0, 0.2, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.8, 0.1]
    out = []
    for i, opening in enumerate(openings):
        action = np.full(7, 0.01 * i, np.float32)
        action[6] = opening
        played = latch(action)
        assert np.array_equal(played[:6], action[:6]) and action[6] == opening  # no change in place
        out.append(float(played[6]))
    assert out == pytest.approx([1.0, 0.2, 0.2, 0.2, 0.0, 0.0, 0.0, 1.0, 0.8, 0.1])
    assert GripperLatch(1)(np.array([0, 0, 0, 0, 0, 0, 1.0]))[6] == 1.0


def test_vla_policy_plays_its_chunks_through_the_gripper_latch():
    """The latch sits after chunk execution and counts control steps, across chunk boundaries; a new
    instruction starts it afresh."""
    openings = [0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    policy = VLAPolicy(ScriptedModel(4, openings, gripper_open_steps=3))
    policy.reset("pick up the red cube")
    assert [float(policy.act(OBS)[6]) for _ in range(6)] == [0, 0, 0, 0, 1, 0]
    assert policy.act({"instruction": "pick up the blue cube"})[6] == 1.0  # not held: a new episode
    assert VLAPolicy(ScriptedModel(4, openings, 3), gripper_open_steps=1).gripper.open_steps == 1


def test_new_instruction_restarts_execution():
    model = ScriptedModel(chunk=4)
    policy = VLAPolicy(model, execution="chunk")
    policy.reset("touch the red cube")
    policy.act(OBS)
    policy.act({"instruction": "touch the blue ball"})
    assert model.calls == 2 and policy.instruction == "touch the blue ball"


def test_bad_settings():
    with pytest.raises(ValueError, match="execution"):
        VLAPolicy(ScriptedModel(2), execution="sometimes")
    with pytest.raises(ValueError, match="execute_steps"):
        VLAPolicy(ScriptedModel(2), execution="chunk", execute_steps=3)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="gripper_open_steps"):
            VLAPolicy(ScriptedModel(2), gripper_open_steps=bad)


def test_checkpoint_policy_runs_closed_loop_in_sim(tmp_path, tiny_model):
    path = save_checkpoint(tmp_path / "ckpt", *tiny_model())
    with pytest.raises(ValueError, match="was not trained"):
        load_policy(str(path), decoder="autoregressive")
    env = make_env("reach")
    try:
        policy = load_policy(str(path), env)
        assert isinstance(policy, Policy) and isinstance(policy, VLAPolicy)
        assert policy.spec == ObservationSpec(96, 12, False)
        obs, _ = env.reset(seed=0)
        policy.reset(obs["instruction"])
        for _ in range(3):
            action = policy.act(obs)
            assert action.shape == (7,) and action.dtype == np.float32
            obs, *_ = env.step(action)
    finally:
        env.close()


def test_a_checkpoint_names_how_its_chunks_are_executed(tmp_path, tiny_model):
    """The execution trained and measured with (and the gripper latch) travels in the checkpoint; old
    checkpoints, saved without them, keep the temporal ensemble and the gripper that opens at once
    they were measured with; an explicit one overrides."""
    path = save_checkpoint(tmp_path / "chunk", *tiny_model(execution="chunk", gripper_open_steps=3))
    assert VLAPolicy.from_checkpoint(path).execution == "chunk"
    assert VLAPolicy.from_checkpoint(path).gripper.open_steps == 3
    assert VLAPolicy.from_checkpoint(path, execution="ensemble").execution == "ensemble"
    assert VLAPolicy.from_checkpoint(path, gripper_open_steps=1).gripper.open_steps == 1
    meta = json.loads((path / "config.json").read_text())
    del meta["model"]["execution"], meta["model"]["gripper_open_steps"]
    (path / "config.json").write_text(json.dumps(meta))
    assert VLAPolicy.from_checkpoint(path).execution == "ensemble"
    assert VLAPolicy.from_checkpoint(path).gripper.open_steps == 1
    with pytest.raises(ValueError, match=r"ModelConfig\.execution"):
        tiny_model(execution="sometimes")
    with pytest.raises(ValueError, match=r"ModelConfig\.gripper_open_steps"):
        tiny_model(gripper_open_steps=0)


def test_every_policy_says_what_it_observes():
    env = make_env("reach", image_size=64)
    try:
        expert = load_policy("expert", env)
        assert isinstance(expert, ScriptedExpert) and isinstance(expert, Policy) and expert.spec.image_size == 64
    finally:
        env.close()
    assert isinstance(RandomPolicy(), Policy) and RandomPolicy().spec == ObservationSpec()
    with pytest.raises(ValueError, match="needs the simulator env"):
        load_policy("expert")
    with pytest.raises(ValueError, match="unknown policy"):
        load_policy("/no/such/checkpoint")
