"""VLAPolicy: executing action chunks (temporal ensembling, open-loop chunks) behind the Policy API."""
from __future__ import annotations

import json

import numpy as np
import pytest

from policies import Policy, load_policy
from policies.vla_policy import VLAPolicy
from sim import make_env
from vla.model.checkpoint import save_checkpoint
from test_model import tiny_model


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


def test_checkpoint_policy_runs_closed_loop_in_sim(tmp_path):
    path = save_checkpoint(tiny_model(), tmp_path / "ckpt")
    with pytest.raises(ValueError, match="was not trained"):
        load_policy(str(path), decoder="autoregressive")
    env = make_env("reach")
    try:
        policy = load_policy(str(path), env)
        assert isinstance(policy, Policy) and isinstance(policy, VLAPolicy)
        obs, _ = env.reset(seed=0)
        policy.reset(obs["instruction"])
        for _ in range(3):
            action = policy.act(obs)
            assert action.shape == (7,) and action.dtype == np.float32
            obs, *_ = env.step(action)
    finally:
        env.close()


def test_vla_eval_reports_the_same_episodes_with_torch_and_onnx(tmp_path, capsys):
    """`vla eval` on the shipped checkpoint: a report of held-out episodes whose rates follow from
    them, a readable video, and the same outcome of every episode with either backend (same bins)."""
    import cv2

    from policies import CHECKPOINT_DIR
    from vla.cli import main as vla_main
    from vla.rollout import EVAL_SEED_OFFSET

    checkpoint = CHECKPOINT_DIR / "default"
    if not (checkpoint / "model.onnx").is_file():
        pytest.skip(f"no shipped checkpoint with its ONNX export at {checkpoint}")
    reports = {}
    for backend in ("torch", "onnx"):
        out = tmp_path / backend
        argv = ["eval", "--checkpoint", str(checkpoint), "--task", "reach", "--episodes", "3", "--backend", backend,
                "--device", "cpu", "--out", str(out), "--video-episodes", str(int(backend == "torch"))]
        assert vla_main(argv) == 0
        reports[backend] = json.loads((out / "report.json").read_text())
    report = reports["torch"]
    episodes = report["episodes"]
    assert [e["seed"] for e in episodes] == [EVAL_SEED_OFFSET + i for i in range(3)]
    assert report["success"]["reach"] == pytest.approx(np.mean([e["success"] for e in episodes]))
    assert "onnxruntime" in reports["onnx"]["runtime"] and "torch" in report["runtime"]
    assert [(e["success"], e["steps"], e["touched"]) for e in episodes] == \
        [(e["success"], e["steps"], e["touched"]) for e in reports["onnx"]["episodes"]]
    video = cv2.VideoCapture(str(tmp_path / "torch" / "rollouts.mp4"))
    assert video.read()[0] and not (tmp_path / "onnx" / "rollouts.mp4").exists()
    assert "reach" in capsys.readouterr().out  # the success table
    assert vla_main(["eval", "--checkpoint", str(checkpoint), "--episodes", "0"]) == 2
    assert "--episodes must be positive" in capsys.readouterr().err
