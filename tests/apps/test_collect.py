"""`vla collect`, `vla dataset` and `vla replay`: crash-safe collection that resumes, inspection,
and replay of recorded episodes; bad input is one line, no traceback."""
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import imageio.v2 as imageio

from policies import CHECKPOINT_DIR
from vla.apps.replay import replay
from vla.cli import main as vla
from vla.data.index import EpisodeIndex
from vla.data.reader import read_episode


def test_replay_reproduces_the_recording(expert_dataset, tmp_path):
    root, reference = expert_dataset
    report = replay(root / "episode_000002", video=tmp_path / "replay.gif")
    assert report.steps == len(reference[2][1])
    assert report.max_state_error == 0 and report.max_image_error == 0
    assert report.recorded_success == report.replayed_success
    assert len(imageio.mimread(tmp_path / "replay.gif")) == report.steps + 1


def test_cli_reports_bad_input_without_traceback(tmp_path, capsys):
    assert vla(["replay", str(tmp_path)]) == 2
    assert f"{tmp_path}: not a rosbag2 directory" in capsys.readouterr().err
    assert vla(["dataset", "info", str(tmp_path)]) == 2
    assert "no manifest.json" in capsys.readouterr().err


# ---- collection: crash safety, resume, append ---------------------------------------------------
def test_sigkill_mid_collection_then_rerun_completes_a_consistent_dataset(tmp_path, capsys, root):
    data, episodes = tmp_path / "crash", 40
    command = ["collect", "--task", "reach", "--episodes", str(episodes), "--out", str(data)]
    proc = subprocess.Popen([sys.executable, "-m", "vla.cli", *command, "--workers", "2"], cwd=root,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 90
        while len(_bags(data)) < 3 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert 3 <= len(_bags(data)) < episodes, "the kill should land mid-run"
        _wait_for_group_exit(proc.pid)  # the workers die with their parent
    finally:
        _kill_group(proc.pid)
    for entry in _listed(data):  # whatever was listed at the kill is complete and readable
        assert len(read_episode(data / entry["path"])) == entry["steps"]
    # also the two other crash windows: a bag half written, a bag renamed but not yet listed
    (data / ".partial" / "episode_000039").mkdir(parents=True, exist_ok=True)
    (data / ".partial" / "episode_000039" / "episode_000039.mcap").write_bytes(b"\x89MCAP0\r\n half")
    if (data / "manifest.json").is_file():
        manifest = json.loads((data / "manifest.json").read_text())
        manifest["episodes"] = manifest["episodes"][:-1]
        (data / "manifest.json").write_text(json.dumps(manifest))

    assert vla(command) == 0
    out = capsys.readouterr().out
    assert "discarding unfinished episode" in out and "repaired: " in out
    listed = _listed(data)
    assert [e["episode"] for e in listed] == [e["seed"] for e in listed] == list(range(episodes))
    assert _bags(data) == [e["path"] for e in listed]
    assert not (data / ".partial").exists()  # emptied, and removed at the end
    assert len(EpisodeIndex(data, progress=False).episodes) == sum(e["success"] for e in listed)

    assert vla(command) == 0 and "already recorded" in capsys.readouterr().out  # nothing left to do
    # a dataset recorded before a SimConfig setting existed (at its default) is still the same collection
    manifest = json.loads((data / "manifest.json").read_text())
    for entry in manifest["episodes"]:
        del entry["sim_config"]["disturbance"]
    (data / "manifest.json").write_text(json.dumps(manifest))
    assert vla(command) == 0 and "already recorded" in capsys.readouterr().out
    assert vla(["collect", "--task", "pick", "--episodes", "1", "--out", str(data)]) == 2
    assert "pass --append" in capsys.readouterr().err
    assert vla(["collect", "--task", "pick", "--episodes", "1", "--out", str(data), "--append"]) == 0
    assert [(e["episode"], e["task"], e["seed"]) for e in _listed(data)][-1] == (episodes, "pick", episodes)


def _bags(data: Path) -> list[str]:
    return sorted(p.name for p in data.glob("episode_*"))


def _listed(root: Path) -> list[dict]:
    try:
        return json.loads((root / "manifest.json").read_text())["episodes"]
    except FileNotFoundError:
        return []


def _wait_for_group_exit(pgid: int, timeout: float = 10) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    raise AssertionError("worker processes outlived the killed collector")


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


def test_dataset_info_video_and_plot(expert_dataset, tmp_path, capsys):
    root, reference = expert_dataset
    assert vla(["dataset", "info", str(root)]) == 0
    out = capsys.readouterr().out
    assert "reach" in out and "100.0 %" in out and f"steps: {sum(len(a) for _, a, _ in reference)}" in out
    assert vla(["dataset", "video", str(root / "episode_000000"), "--out", str(tmp_path / "e0.mp4")]) == 0
    with imageio.get_reader(tmp_path / "e0.mp4") as video:  # one frame per step, the last held 5 frames
        assert video.count_frames() == len(reference[0][1]) + 5 and video.get_data(0).shape[:2] == (384 + 128, 384)
    assert vla(["dataset", "plot", str(root), "--out", str(tmp_path / "actions.png")]) == 0
    assert (tmp_path / "actions.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert vla(["dataset", "stats", str(root)]) == 0 and "q99" in capsys.readouterr().out


# ---- DAgger-style corrections ----------------------------------------------------------------------
def test_expert_takeover_records_corrections_that_replay_and_train_from_the_takeover(tmp_path, capsys):
    checkpoint = CHECKPOINT_DIR / "default"
    data = tmp_path / "corrections"
    command = ["collect", "--task", "pick", "--episodes", "4", "--out", str(data), "--policy", str(checkpoint),
               "--expert-takeover", "30"]
    assert vla(command) == 0
    listed = _listed(data)
    takeovers = [e["expert_from"] for e in listed]
    assert all(0 <= k <= 30 for k in takeovers) and len(set(takeovers)) > 1  # drawn per episode
    assert sum(e["success"] for e in listed) >= 3  # the expert finishes what the checkpoint began
    for entry in listed:
        report = replay(data / entry["path"])  # what was executed is what was recorded
        assert report.max_state_error == 0 and report.replayed_success == entry["success"]
    index = EpisodeIndex(data, chunk=4, progress=False)
    kept = [e for e in listed if e["success"]]
    assert len(index) == sum(e["steps"] - min(e["expert_from"], e["steps"]) for e in kept)
    assert min(index.batch(range(len(index)))["step"]) == min(e["expert_from"] for e in kept
                                                              if e["expert_from"] < e["steps"])
    assert vla(command) == 0 and "already recorded" in capsys.readouterr().out  # resumes the same draws
    assert vla([*command[:-2], "--expert-takeover", "20"]) == 2 and "expert_from" in capsys.readouterr().err
    assert vla([*command[:-4], "--expert-takeover", "20"]) == 2
    assert "needs a checkpoint --policy" in capsys.readouterr().err


def test_missed_grasps_record_retries_that_train_from_the_miss(tmp_path, capsys):
    data = tmp_path / "retries"
    command = ["collect", "--task", "pick,reach", "--episodes", "3", "--out", str(data), "--missed-grasps", "1"]
    assert vla(command) == 0
    picks = [e for e in _listed(data) if e["task"] == "pick"]
    reaches = [e for e in _listed(data) if e["task"] == "reach"]
    assert all(0.03 <= e["miss"] <= 0.04 for e in picks) and not any("miss" in e for e in reaches)
    assert not any("expert_from" in e for e in reaches)  # nothing to miss: every step trains
    kept = [e for e in picks if e["success"]]
    assert len(kept) >= 2  # the expert tries again after the miss
    assert all(8 <= e["expert_from"] < e["steps"] - 8 for e in kept)  # a retry, after the miss
    index = EpisodeIndex(data, tasks=["pick"], chunk=4, progress=False)
    assert len(index) == sum(e["steps"] - e["expert_from"] for e in kept)
    assert min(index.batch(range(len(index)))["step"]) == min(e["expert_from"] for e in kept)
    assert vla(command) == 0 and "already recorded" in capsys.readouterr().out  # resumes the same draws
    assert vla(command[:-2]) == 2 and "miss" in capsys.readouterr().err  # recorded with misses
    assert vla([*command[:-1], "1.5"]) == 2 and "--missed-grasps" in capsys.readouterr().err


def test_push_tolerance_is_recorded_and_resuming_with_another_is_refused(tmp_path, capsys):
    data = tmp_path / "pushes"
    command = ["collect", "--task", "push", "--episodes", "1", "--out", str(data), "--push-tolerance", "0.02"]
    assert vla(command) == 0
    (episode,) = _listed(data)
    assert episode["success"] and episode["sim_config"]["push_tolerance"] == 0.02
    assert vla(command[:-2]) == 2 and "sim_config" in capsys.readouterr().err  # the default, 0.04: not these
    assert vla([*command[:-1], "0.5"]) == 2 and "push_tolerance" in capsys.readouterr().err
