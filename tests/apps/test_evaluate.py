"""`vla eval` and `vla demo`: closed-loop evaluation on held-out seeds, its report and video."""
from __future__ import annotations

import json
import warnings

import cv2
import numpy as np
import pytest
import torch

from policies import CHECKPOINT_DIR
from sim.language import VERBS
from vla.apps.rollout import EVAL_SEED_OFFSET
from vla.cli import main as vla_main
from vla.model.checkpoint import ensemble_members, trained_tasks


def test_vla_eval_reports_the_same_episodes_with_torch_and_onnx(tmp_path, capsys):
    """`vla eval` on the shipped checkpoint: a report of held-out episodes whose rates follow from
    them, a readable video, and the same outcome of every episode with either backend (same bins)."""
    checkpoint = CHECKPOINT_DIR / "default"
    if not all((member / "model.onnx").is_file() for member in ensemble_members(checkpoint) or [checkpoint]):
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


def test_vla_demo_runs_the_shipped_checkpoint_on_its_tasks(tmp_path):
    """The README's main command, shrunk to one episode per task."""
    checkpoint = CHECKPOINT_DIR / "default"
    if not checkpoint.is_dir():
        pytest.skip(f"no shipped checkpoint at {checkpoint}")
    video, report = tmp_path / "demo.mp4", tmp_path / "demo.json"
    assert vla_main(["demo", "--episodes", "1", "--video", str(video), "--report", str(report)]) == 0
    episodes = json.loads(report.read_text())
    assert [e["task"] for e in episodes] == trained_tasks(checkpoint) == ["reach", "pick", "push", "place"]
    assert all(e["seed"] == EVAL_SEED_OFFSET for e in episodes) and cv2.VideoCapture(str(video)).read()[0]


def test_vla_eval_under_randomisation_with_other_words(tmp_path):
    """`vla eval --randomize ... --instruction ... --threads N`: the same held-out scenes (targets)
    as a plain evaluation, told in the given words, and the settings in the report."""
    checkpoint = CHECKPOINT_DIR / "default"
    if not checkpoint.is_dir():
        pytest.skip(f"no shipped checkpoint at {checkpoint}")
    common = ["eval", "--checkpoint", str(checkpoint), "--task", "reach", "--episodes", "2", "--device", "cpu",
              "--video-episodes", "0"]
    threads = torch.get_num_threads()
    try:
        assert vla_main([*common, "--out", str(tmp_path / "plain")]) == 0
        assert vla_main([*common, "--out", str(tmp_path / "varied"), "--randomize", "all,jitter=0.01",
                         "--instruction", "move to the {colour} {shape}", "--threads", "2"]) == 0
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    plain, varied = (json.loads((tmp_path / name / "report.json").read_text()) for name in ("plain", "varied"))
    assert varied["settings"] == {"randomize_lighting": True, "randomize_shades": True, "camera_jitter": 0.01,
                                  "phrasing": "train"}
    assert varied["instruction"] == "move to the {colour} {shape}" and varied["threads"] == 2
    assert plain["settings"] == {"phrasing": "train"} and plain["instruction"] is None and plain["threads"] == 1
    assert [e["target"] for e in varied["episodes"]] == [e["target"] for e in plain["episodes"]]
    assert [e["instruction"] for e in varied["episodes"]] == [f"move to the {e['target']}" for e in plain["episodes"]]


def test_vla_eval_compares_held_out_phrasings_with_the_training_ones(tmp_path, capsys):
    checkpoint = CHECKPOINT_DIR / "default"
    if not checkpoint.is_dir():
        pytest.skip(f"no shipped checkpoint at {checkpoint}")
    argv = ["eval", "--checkpoint", str(checkpoint), "--task", "reach", "--episodes", "2", "--device", "cpu",
            "--video-episodes", "0", "--phrasings", "heldout", "--out", str(tmp_path)]
    assert vla_main(argv) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report["phrasings"]) == {"train", "heldout"} and report["settings"]["phrasing"] == "heldout"
    assert report["success"] == report["phrasings"]["heldout"]["success"]
    verbs = report["verbs"]["heldout"]["reach"]
    assert set(verbs) <= set(VERBS["heldout"]["reach"]) and sum(v["episodes"] for v in verbs.values()) == 2
    # both tables, the one side by side and a row per verb phrase
    assert capsys.readouterr().out.count("│ reach ") == 3 + len(verbs)


def test_vla_eval_warns_about_words_the_model_was_not_trained_on(tmp_path, capsys, stats):
    from vla.model import ModelConfig, create
    from vla.model.checkpoint import save_checkpoint

    config = ModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, vision_width=16, chunk=2)
    model, processor = create(config, stats, [], ["touch the red ball", "reach the blue cube"])
    checkpoint = save_checkpoint(tmp_path / "ckpt", model, processor)
    argv = ["eval", "--checkpoint", str(checkpoint), "--task", "reach", "--episodes", "2", "--video-episodes", "0",
            "--instruction", "poke the {colour} {shape}", "--out", str(tmp_path / "eval")]
    assert vla_main(argv) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    assert lines and all("poke" in line for line in lines)
    # Python's warnings (an instruction cut, a damaged cache) print as one line too, not with their source line
    warnings.showwarning("cut", UserWarning, "text.py", 94)
    assert capsys.readouterr().err == "warning: cut\n"


def test_vla_eval_reports_the_stages_a_policy_reached(tmp_path, capsys):
    """Where a multi-stage task fails: the share of episodes that reached each stage, from the
    episodes' own stages, printed and in the report (pick)."""
    checkpoint = CHECKPOINT_DIR / "default"
    if not checkpoint.is_dir():
        pytest.skip(f"no shipped checkpoint at {checkpoint}")
    argv = ["eval", "--checkpoint", str(checkpoint), "--task", "pick", "--episodes", "2", "--device", "cpu",
            "--video-episodes", "0", "--out", str(tmp_path)]
    assert vla_main(argv) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    episodes = report["episodes"]
    assert list(report["stages"]["pick"]) == ["touched", "lifted"]
    for stage, share in report["stages"]["pick"].items():
        assert share == pytest.approx(np.mean([stage in e["stages"] for e in episodes]))
    closes = report["first_close"]["pick"]  # where the gripper first closed: shares of the episodes
    assert sum(closes.values()) == pytest.approx(1.0)
    assert closes["never"] == pytest.approx(np.mean([e["first_close"] is None for e in episodes]))
    assert report["closed_again"]["pick"] == pytest.approx(np.mean([e["closures"] >= 2 for e in episodes]))
    assert all((e["closures"] == 0) == (e["first_close"] is None) for e in episodes)
    out = capsys.readouterr().out
    assert "stages reached" in out and "gripper first closed at" in out and "closed again" in out
