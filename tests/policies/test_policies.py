"""Policies behind one interface; VLAPolicy executing action chunks (temporal ensembling, open-loop
chunks)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from policies import Policy, RandomPolicy, load_policy
from policies.ensemble import temporal_ensemble
from policies.vla_policy import VLAPolicy
from sim import make_env
from sim.expert import ScriptedExpert
from vla.contracts.observation import ObservationSpec
from vla.model.checkpoint import save_checkpoint


class ScriptedModel:
    """Stands in for a Runtime: the chunk predicted at call n is n * 0.01 + 0.001 * (index in chunk)."""

    def __init__(self, chunk: int):
        self.chunk = chunk
        self.calls = 0

    def predict(self, obs):
        chunk = np.zeros((1, self.chunk, 7), np.float32)
        chunk[0, :, 0] = self.calls * 0.01 + 0.001 * np.arange(self.chunk)
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
    """The execution trained and measured with travels in the checkpoint; old checkpoints, saved
    without it, keep the temporal ensemble they were measured with; an explicit one overrides."""
    path = save_checkpoint(tmp_path / "chunk", *tiny_model(execution="chunk"))
    assert VLAPolicy.from_checkpoint(path).execution == "chunk"
    assert VLAPolicy.from_checkpoint(path, execution="ensemble").execution == "ensemble"
    meta = json.loads((path / "config.json").read_text())
    del meta["model"]["execution"]
    (path / "config.json").write_text(json.dumps(meta))
    assert VLAPolicy.from_checkpoint(path).execution == "ensemble"
    with pytest.raises(ValueError, match=r"ModelConfig\.execution"):
        tiny_model(execution="sometimes")


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
