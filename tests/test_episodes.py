"""Episodes: sim -> rosbag2 (MCAP) -> independent readers, the training index, replay, crash safety,
and clear errors for bad input."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import yaml
from mcap.reader import make_reader
from mcap_ros2.decoder import DecoderFactory
from rosbags.highlevel import AnyReader
from rosbags.rosbag2 import Writer
from rosbags.rosbag2.enums import StoragePlugin

from policies import load_policy
from sim import SimConfig, make_env
from sim.contracts import clip_action
from sim.kinematics import state_from_joints
from vla.cli import main as vla
from vla.episodes import topics as T
from vla.episodes.index import CorruptEpisodeWarning, EpisodeIndex, compute_action_stats
from vla.episodes.messages import TYPESTORE, build, serialize
from vla.episodes.reader import EpisodeError, read_episode
from vla.episodes.replay import replay
from vla.episodes.writer import CUSTOM_DATA_KEY, EpisodeWriter

ROOT = Path(__file__).resolve().parents[1]
SEEDS = (0, 1, 2)  # `vla collect` gives episode i the seed i


def simulate(env, seed: int):
    """What the simulator produces for an expert episode: observations 0..T, actions 0..T-1, success."""
    policy = load_policy("expert", env)
    obs, _ = env.reset(seed=seed)
    policy.reset(obs["instruction"])
    observations, actions = [obs], []
    while True:
        actions.append(clip_action(policy.act(obs)))
        obs, _, terminated, truncated, info = env.step(actions[-1])
        observations.append(obs)
        if terminated or truncated:
            return observations, actions, info["success"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """3 expert reach episodes recorded by `vla collect`, and the simulator's own record of them."""
    root = tmp_path_factory.mktemp("data") / "reach"
    assert vla(["collect", "--task", "reach", "--episodes", "3", "--out", str(root)]) == 0
    env = make_env("reach", SimConfig())
    reference = [simulate(env, seed) for seed in SEEDS]
    env.close()
    return root, reference


def messages(bag: Path) -> dict:
    """topic -> [(log time, message)] read with rosbags' AnyReader (independent of our reader)."""
    out = {}
    with AnyReader([bag]) as reader:
        for connection, log_time, raw in reader.messages():
            out.setdefault(connection.topic, []).append((log_time, reader.deserialize(raw, connection.msgtype)))
    return out


# ---- topics and messages ----------------------------------------------------------------------
@pytest.mark.parametrize("encoding", ["rgb8", "bgr8", "rgba8", "mono8"])
def test_image_encodings_convert_to_rgb(encoding):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    if encoding == "mono8":
        rgb[:] = rgb[:, :, :1]
    data = {"rgb8": rgb, "bgr8": rgb[:, :, ::-1], "rgba8": np.dstack([rgb, np.full((5, 7), 9, np.uint8)]),
            "mono8": rgb[:, :, 0]}[encoding]
    channels = 1 if data.ndim == 2 else data.shape[2]
    # rows padded to 32 bytes, as some camera drivers send them
    padded = np.zeros((5, 32), np.uint8)
    padded[:, : 7 * channels] = data.reshape(5, -1)
    fields = T.image_fields(rgb, 123) | {"encoding": encoding, "step": 32, "data": padded.reshape(-1)}
    msg = TYPESTORE.deserialize_cdr(serialize(T.MSG_TYPES["image"], fields), T.MSG_TYPES["image"])
    assert np.array_equal(T.image_from_msg(msg), rgb)
    with pytest.raises(ValueError, match="unsupported image encoding '16UC1'"):
        T.image_from_msg(build(T.MSG_TYPES["image"], fields | {"encoding": "16UC1"}))


def test_joint_states_twist_and_imu_fields_round_trip():
    rng = np.random.default_rng(1)
    arm, fingers = rng.uniform(-1, 1, 7), rng.uniform(0, 0.04, 2)
    fields = T.joint_state_fields(np.r_[arm, fingers], np.zeros(9), T.step_stamp(3, 10))
    order = rng.permutation(9)  # a robot may publish the joints in any order
    fields |= {"name": [fields["name"][i] for i in order], "position": fields["position"][order]}
    msg = build(T.MSG_TYPES["joint_states"], fields)
    assert np.array_equal(T.state_from_msg(msg), state_from_joints(arm, fingers))
    assert T.stamp_from_header(msg.header) == T.EPOCH_NS + 300_000_000
    renamed = [n.replace("joint4", "jointX") for n in fields["name"]]
    with pytest.raises(ValueError, match="panda_joint4"):
        T.state_from_msg(build(T.MSG_TYPES["joint_states"], fields | {"name": renamed}))

    action = np.array([0.01, -0.02, 0.03, 0.1, -0.2, 0.05, 0.7], np.float32)
    twist = build(T.MSG_TYPES["cmd_twist"], T.twist_fields(action, 10, 5))
    assert twist.twist.linear.y == pytest.approx(-0.2) and twist.header.frame_id == T.BASE_FRAME
    assert np.allclose(T.action_from_twist(twist, T.gripper_fields(action)["data"], 10), action)
    assert np.array_equal(T.action_from_msg(build(T.MSG_TYPES["action"], T.action_fields(action))), action)

    imu = build(T.MSG_TYPES["imu"], T.imu_fields(np.arange(6.0), 0))
    assert imu.orientation_covariance[0] == -1 and imu.header.frame_id == "panda_hand"
    assert np.array_equal(T.imu_sample_from_msg(imu), np.arange(6.0))
    stamps = T.imu_stamps(T.step_stamp(1, 10), 12, 120)
    assert stamps[-1] == T.step_stamp(1, 10) and np.allclose(np.diff(stamps), 1e9 / 120, atol=1)


# ---- round trip -------------------------------------------------------------------------------
def test_bags_read_by_rosbags_match_the_simulator(dataset):
    root, reference = dataset
    manifest = json.loads((root / "manifest.json").read_text())["episodes"]
    assert [e["path"] for e in manifest] == ["episode_000000", "episode_000001", "episode_000002"]
    for entry, (observations, actions, success) in zip(manifest, reference):
        bag = root / entry["path"]
        msgs = messages(bag)
        steps = len(actions)
        stamps = [T.EPOCH_NS + t * 100_000_000 for t in range(steps + 1)]
        images = msgs[T.TOPICS["image"]]
        assert [t for t, _ in images] == stamps
        for obs, (log_time, msg) in zip(observations, images):
            assert msg.encoding == "rgb8" and T.stamp_from_header(msg.header) == log_time
            assert np.array_equal(msg.data.reshape(96, 96, 3), obs["image"])
        joints = msgs[T.TOPICS["joint_states"]]
        assert [t for t, _ in joints] == stamps
        for obs, (_, msg) in zip(observations, joints):
            assert list(msg.name) == list(T.JOINT_NAMES) and len(msg.velocity) == 9
            assert np.array_equal(state_from_joints(msg.position[:7], msg.position[7:]), obs["state"])
        imu = msgs[T.TOPICS["imu"]]
        assert len(imu) == 12 * (steps + 1)  # 120 Hz, each sample its own message
        imu_times = np.array([t for t, _ in imu])
        assert np.allclose(np.diff(imu_times), 1e9 / 120, atol=1)
        for t, obs in enumerate(observations):
            window = [T.imu_sample_from_msg(m) for s, m in imu if s <= stamps[t]][-12:]
            assert np.array_equal(np.float32(window), obs["imu"])
        recorded = [np.asarray(m.data) for _, m in msgs[T.TOPICS["action"]]]
        assert np.array_equal(recorded, actions) and [t for t, _ in msgs[T.TOPICS["action"]]] == stamps[:-1]
        twists = [m.twist.linear for _, m in msgs[T.TOPICS["cmd_twist"]]]
        assert np.allclose([[v.x, v.y, v.z] for v in twists], np.array(actions)[:, :3] * 10)
        assert [m.data for _, m in msgs[T.TOPICS["gripper"]]] == [float(a[6]) for a in actions]
        assert [m.data for _, m in msgs[T.TOPICS["instruction"]]] == [observations[0]["instruction"]]
        info = json.loads(msgs[T.TOPICS["episode_info"]][0][1].data)
        meta = yaml.safe_load((bag / "metadata.yaml").read_text())["rosbag2_bagfile_information"]
        assert json.loads(meta["custom_data"][CUSTOM_DATA_KEY]) == info
        assert meta["storage_identifier"] == "mcap"
        assert (info["seed"], info["steps"], info["success"], info["task"]) == (entry["seed"], steps, success, "reach")
        assert info["instruction"] == observations[0]["instruction"] and info["versions"]["pybullet"]


def test_bags_read_by_the_mcap_library(dataset):
    root, reference = dataset
    with open(root / "episode_000001" / "episode_000001.mcap", "rb") as f:
        reader = make_reader(f, decoder_factories=[DecoderFactory()])
        assert reader.get_header().profile == "ros2"
        counts = {}
        for schema, channel, message, decoded in reader.iter_decoded_messages():
            assert schema.encoding == "ros2msg" and channel.message_encoding == "cdr"
            counts[channel.topic] = counts.get(channel.topic, 0) + 1
            if channel.topic == T.TOPICS["action"]:
                last_action = np.array(decoded.data, np.float32)
    steps = len(reference[1][1])
    assert counts == {T.TOPICS["image"]: steps + 1, T.TOPICS["joint_states"]: steps + 1, T.TOPICS["imu"]: 12 * (steps + 1),
                      T.TOPICS["instruction"]: 1, T.TOPICS["action"]: steps, T.TOPICS["cmd_twist"]: steps,
                      T.TOPICS["gripper"]: steps, T.TOPICS["episode_info"]: 1}
    assert np.array_equal(last_action, reference[1][1][-1])


def test_replay_reproduces_the_recording(dataset, tmp_path):
    root, reference = dataset
    report = replay(root / "episode_000002", video=tmp_path / "replay.gif")
    assert report.steps == len(reference[2][1])
    assert report.max_state_error == 0 and report.max_image_error == 0
    assert report.recorded_success == report.replayed_success
    import imageio.v2 as imageio

    assert len(imageio.mimread(tmp_path / "replay.gif")) == report.steps + 1


# ---- the training index -------------------------------------------------------------------------
def test_index_samples_match_the_simulator(dataset):
    root, reference = dataset
    index = EpisodeIndex(root, image_size=96, chunk=3, progress=False)
    assert len(index) == sum(len(actions) for _, actions, _ in reference)
    assert [e["seed"] for e in index.episodes] == list(SEEDS)
    i = 0
    for episode, (observations, actions, _) in enumerate(reference):
        for t, obs in enumerate(observations[:-1]):
            s = index[i]
            assert (s["episode"], s["step"], s["task"]) == (episode, t, "reach")
            assert np.array_equal(s["image"], obs["image"]) and np.array_equal(s["state"], obs["state"])
            assert np.array_equal(s["imu"], obs["imu"]) and s["instruction"] == obs["instruction"]
            future = [actions[min(t + k, len(actions) - 1)] for k in range(3)]  # padded with the last
            assert np.array_equal(s["actions"], future)
            assert s["action_mask"].tolist() == [t + k < len(actions) for k in range(3)]
            i += 1
    batch = index.batch([4, 0, len(index) - 1])
    for row, j in enumerate([4, 0, len(index) - 1]):
        single = index[j]
        for key in ("image", "state", "imu", "actions", "action_mask", "episode", "step"):
            assert np.array_equal(batch[key][row], single[key]), key
        assert batch["instruction"][row] == single["instruction"] and batch["task"][row] == single["task"]
    all_actions = np.concatenate([actions for _, actions, _ in reference])
    expected = compute_action_stats(all_actions)
    assert np.allclose(index.action_stats["q99"], np.quantile(all_actions, 0.99, axis=0))
    stored = json.loads((root / "action_stats.json").read_text())
    assert stored["count"] == len(all_actions) == index.action_stats["count"]
    assert np.allclose(stored["mean"], expected["mean"]) and np.allclose(stored["std"], all_actions.std(0))


def test_index_resizes_and_pickles(dataset):
    import pickle

    root, reference = dataset
    index = EpisodeIndex(root, image_size=48, progress=False)
    sample = index[0]
    assert sample["image"].shape == (48, 48, 3)
    import cv2

    assert np.array_equal(sample["image"], cv2.resize(reference[0][0][0]["image"], (48, 48), interpolation=cv2.INTER_AREA))
    clone = pickle.loads(pickle.dumps(index))  # what DataLoader workers receive: no array content
    assert len(pickle.dumps(index)) < 100_000 and np.array_equal(clone[5]["image"], index[5]["image"])


def test_index_cache_is_reused_then_rebuilt_when_a_bag_changes(dataset, tmp_path, monkeypatch):
    root = tmp_path / "copy"
    shutil.copytree(dataset[0], root, ignore=shutil.ignore_patterns(".cache", ".lock"))
    first = EpisodeIndex(root, progress=False)
    import vla.episodes.index as index_module

    def no_parsing(path):
        raise AssertionError(f"parsed {path} again")

    monkeypatch.setattr(index_module, "read_episode", no_parsing)
    assert EpisodeIndex(root, progress=False).cache_dir == first.cache_dir
    monkeypatch.undo()
    mcap = root / "episode_000001" / "episode_000001.mcap"
    os.utime(mcap, ns=(time.time_ns(), time.time_ns() + 10**9))
    rebuilt = EpisodeIndex(root, progress=False)
    assert rebuilt.cache_dir != first.cache_dir and not first.cache_dir.exists()
    assert np.array_equal(rebuilt.batch(range(len(rebuilt)))["image"], first.batch(range(len(first)))["image"])


def test_index_memory_does_not_grow_with_epochs(dataset):
    index = EpisodeIndex(dataset[0], progress=False)
    order = np.random.default_rng(0).permutation(len(index))
    tracemalloc.start()
    used = []
    for epoch in range(4):
        for k in range(0, len(order), 4):
            index.batch(order[k:k + 4])
        for i in order:
            index[int(i)]
        used.append(tracemalloc.get_traced_memory()[0])
    tracemalloc.stop()
    assert used[-1] - used[0] < 20_000, used


def test_corrupt_and_failed_episodes_are_skipped(dataset, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(dataset[0], root, ignore=shutil.ignore_patterns(".cache", ".lock"))
    # a failed episode: the expert gets 2 steps to reach
    assert vla(["collect", "--task", "reach", "--episodes", "1", "--max-steps", "2", "--append", "--out", str(root)]) == 0
    mcap = root / "episode_000001" / "episode_000001.mcap"
    mcap.write_bytes(mcap.read_bytes()[: mcap.stat().st_size // 2])
    with pytest.warns(CorruptEpisodeWarning, match=r"episode_000001\.mcap: truncated MCAP"):
        index = EpisodeIndex(root, progress=False)
    assert [e["episode"] for e in index.episodes] == [0, 2]
    with pytest.warns(CorruptEpisodeWarning):
        everything = EpisodeIndex(root, successful_only=False, progress=False)
    assert [e["episode"] for e in everything.episodes] == [0, 2, 3] and len(everything) == len(index) + 2
    assert not everything.episodes[-1]["success"]
    with pytest.warns(CorruptEpisodeWarning), pytest.raises(ValueError, match="no episodes match"):
        EpisodeIndex(root, tasks=["pick"], progress=False)


# ---- bad input ------------------------------------------------------------------------------------
INFO = {"task": "reach", "instruction": "touch the red ball", "seed": 0, "success": True, "steps": 2, "control_hz": 10}


def write_bag(path: Path, skip=(), encoding="rgb8", actions=2) -> Path:
    writer = EpisodeWriter(path)
    for t in range(actions + 1):
        stamp = T.step_stamp(t, 10)
        if "image" not in skip:
            writer.write("image", stamp, T.image_fields(np.zeros((8, 8, 3), np.uint8), stamp) | {"encoding": encoding})
        if "joint_states" not in skip:
            writer.write("joint_states", stamp, T.joint_state_fields(np.zeros(9), np.zeros(9), stamp))
        writer.write("imu", stamp, T.imu_fields(np.zeros(6), stamp))
        if t < actions:
            writer.write("action", stamp, T.action_fields(np.zeros(7)))
    writer.close(INFO)
    return path


def test_a_valid_handmade_bag_reads(tmp_path):
    episode = read_episode(write_bag(tmp_path / "ok"))
    assert len(episode) == 2 and episode.steps()["imu"].shape == (2, 12, 6)  # short IMU history is padded


def test_late_commands_pair_with_the_observation_their_twist_answers(tmp_path):
    """A recorder on a busy robot may log an action after the next observation: the twist published
    with it carries the stamp of the frame it answers, and pairs it; a holding node's lone twists
    (no action) are passed over."""
    writer = EpisodeWriter(tmp_path / "late")
    period = T.step_stamp(1, 10)
    for t in range(4):
        stamp = T.step_stamp(t, 10)
        writer.write("image", stamp, T.image_fields(np.full((8, 8, 3), t, np.uint8), stamp))
        writer.write("joint_states", stamp, T.joint_state_fields(np.full(9, 0.1 * t), np.zeros(9), stamp))
        writer.write("imu", stamp, T.imu_fields(np.zeros(6), stamp))
    for t in range(3):  # each command logged 1.5 periods after its frame, the next frame already logged
        logged, action = T.step_stamp(t, 10) + 3 * period // 2, np.full(7, 0.01 * t, np.float32)
        writer.write("action", logged, T.action_fields(action))
        writer.write("cmd_twist", logged + 1000, T.twist_fields(action, 10, T.step_stamp(t, 10)))
        writer.write("cmd_twist", logged + period // 3, T.twist_fields(np.zeros(7), 10, logged + period // 3))  # a hold
    writer.close(INFO | {"steps": 3})
    episode = read_episode(tmp_path / "late")
    steps = episode.steps()
    assert episode.action_stamps.tolist() == [T.step_stamp(t, 10) for t in range(3)]
    assert [image[0, 0, 0] for image in steps["images"]] == [0, 1, 2]
    np.testing.assert_array_equal(steps["states"], episode.states[:3])


@pytest.mark.parametrize("case, problem", [
    ("empty directory", "not a rosbag2 directory"),
    ("text file", "not a rosbag2 directory or .mcap file"),
    ("truncated", "truncated MCAP"),
    ("missing topic", r"missing topic\(s\) or no messages on \['/joint_states'\]"),
    ("wrong encoding", "unsupported image encoding '32FC1'"),
    ("empty episode", "empty episode: no /vla/action messages"),
    ("wrong type", "/camera/image_raw: type sensor_msgs/msg/CompressedImage, expected sensor_msgs/msg/Image"),
    ("not cdr", "message encoding 'json'"),
])
def test_bad_input_is_a_clear_error_naming_the_file(tmp_path, case, problem):
    path = tmp_path / "bag"
    if case == "empty directory":
        path.mkdir()
    elif case == "text file":
        path = tmp_path / "notes.txt"
        path.write_text("hello")
    elif case == "truncated":
        write_bag(path)
        mcap = path / "bag.mcap"
        mcap.write_bytes(mcap.read_bytes()[:-100])
        path = mcap
    elif case in ("missing topic", "wrong encoding", "empty episode"):
        write_bag(path, skip={"missing topic": ("joint_states",)}.get(case, ()),
                  encoding="32FC1" if case == "wrong encoding" else "rgb8", actions=0 if case == "empty episode" else 2)
    else:
        with Writer(path, version=9, storage_plugin=StoragePlugin.MCAP) as writer:
            if case == "wrong type":
                writer.add_connection(T.TOPICS["image"], "sensor_msgs/msg/CompressedImage", typestore=TYPESTORE)
            else:
                writer.add_connection(T.TOPICS["action"], T.MSG_TYPES["action"], typestore=TYPESTORE,
                                      serialization_format="json")
    with pytest.raises((EpisodeError, FileNotFoundError), match=problem) as error:
        read_episode(path)
    assert str(path) in str(error.value)


def test_cli_reports_bad_input_without_traceback(tmp_path, capsys):
    assert vla(["replay", str(tmp_path)]) == 2
    assert f"{tmp_path}: not a rosbag2 directory" in capsys.readouterr().err
    assert vla(["dataset", "info", str(tmp_path)]) == 2
    assert "no manifest.json" in capsys.readouterr().err


# ---- collection: crash safety, resume, append ---------------------------------------------------
def test_sigkill_mid_collection_then_rerun_completes_a_consistent_dataset(tmp_path, capsys):
    root = tmp_path / "crash"
    command = ["collect", "--task", "reach", "--episodes", "16", "--out", str(root)]
    proc = subprocess.Popen([sys.executable, "-m", "vla.cli", *command, "--workers", "2"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 90
        while len(_listed(root)) < 2 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert 2 <= len(_listed(root)) < 16, "the kill should land mid-run"
        _wait_for_group_exit(proc.pid)  # the workers die with their parent
    finally:
        _kill_group(proc.pid)
    for entry in _listed(root):  # whatever was listed at the kill is complete and readable
        assert len(read_episode(root / entry["path"])) == entry["steps"]
    # also the two other crash windows: a bag half written, a bag renamed but not yet listed
    (root / ".partial" / "episode_000015").mkdir(parents=True, exist_ok=True)
    (root / ".partial" / "episode_000015" / "episode_000015.mcap").write_bytes(b"\x89MCAP0\r\n half")
    manifest = json.loads((root / "manifest.json").read_text())
    unlisted = manifest["episodes"].pop()["path"]
    (root / "manifest.json").write_text(json.dumps(manifest))

    assert vla(command) == 0
    out = capsys.readouterr().out
    assert "discarding unfinished episode" in out and f"repaired: {root / unlisted}" in out
    listed = _listed(root)
    assert [e["episode"] for e in listed] == list(range(16)) and [e["seed"] for e in listed] == list(range(16))
    assert sorted(p.name for p in root.glob("episode_*")) == [e["path"] for e in listed]
    assert not any((root / ".partial").iterdir())
    assert len(EpisodeIndex(root, progress=False).episodes) == sum(e["success"] for e in listed)

    assert vla(command) == 0 and "already recorded" in capsys.readouterr().out  # nothing left to do
    assert vla(["collect", "--task", "pick", "--episodes", "1", "--out", str(root)]) == 2
    assert "pass --append" in capsys.readouterr().err
    assert vla(["collect", "--task", "pick", "--episodes", "1", "--out", str(root), "--append"]) == 0
    assert [(e["episode"], e["task"], e["seed"]) for e in _listed(root)][-1] == (16, "pick", 16)


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
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def test_dataset_info_video_and_plot(dataset, tmp_path, capsys):
    root, reference = dataset
    assert vla(["dataset", "info", str(root)]) == 0
    out = capsys.readouterr().out
    assert "reach" in out and "100.0 %" in out and f"steps: {sum(len(a) for _, a, _ in reference)}" in out
    assert vla(["dataset", "video", str(root / "episode_000000"), "--out", str(tmp_path / "e0.mp4")]) == 0
    import imageio.v2 as imageio

    with imageio.get_reader(tmp_path / "e0.mp4") as video:  # one frame per step, the last held 5 frames
        assert video.count_frames() == len(reference[0][1]) + 5 and video.get_data(0).shape[:2] == (384 + 128, 384)
    assert vla(["dataset", "plot", str(root), "--out", str(tmp_path / "actions.png")]) == 0
    assert (tmp_path / "actions.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert vla(["dataset", "stats", str(root)]) == 0 and "q99" in capsys.readouterr().out
