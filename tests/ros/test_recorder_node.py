"""recorder_node: following a sim's episodes it stores what was published, one bag per episode; with
~/record it records a robot's episode that the dataset tools read."""
from __future__ import annotations

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy")
from pathlib import Path  # noqa: E402

from geometry_msgs.msg import TwistStamped  # noqa: E402
from rclpy.serialization import deserialize_message  # noqa: E402
from rosbags.highlevel import AnyReader  # noqa: E402
from sensor_msgs.msg import Image  # noqa: E402
from std_msgs.msg import Float32MultiArray, String  # noqa: E402
from std_srvs.srv import SetBool  # noqa: E402

from vla.contracts.topics import TOPICS  # noqa: E402
from vla.data import messages as M  # noqa: E402
from vla.data.dataset import load_manifest  # noqa: E402
from vla.data.reader import read_episode  # noqa: E402
from vla_ros import qos  # noqa: E402

CONFIG = Path(__file__).resolve().parents[2] / "ros2_ws" / "src" / "vla_ros" / "config"
STEPS = 8  # the recorded closed loop's episode length (conftest: sim_loop)
RELIABLE_TOPICS = {TOPICS[k] for k in ("action", "cmd_twist", "gripper")}


def test_recorder_stores_what_was_published(sim_loop):
    ros, received, _infos, dataset = sim_loop
    published = {topic: {data for _, data in messages} for topic, messages in received.messages.items()}
    episodes = [e for e in load_manifest(dataset) if e["seed"] in ros.started]
    assert len(episodes) >= 2
    for listed in episodes:
        messages: dict[str, list[bytes]] = {}
        with AnyReader([dataset / listed["path"]]) as reader:  # rosbags opens it
            for connection, _, data in reader.messages():
                messages.setdefault(connection.topic, []).append(bytes(data))
        count = {topic: len(m) for topic, m in messages.items()}
        # commands reached this process reliably; it may lose a few best-effort sensor messages when busy
        for topic, recorded in messages.items():
            if topic not in (TOPICS["instruction"], TOPICS["episode_info"]):  # (written by the recorder)
                missing = sum(data not in published[topic] for data in recorded)
                allowed = 0 if topic in RELIABLE_TOPICS else 0.05 * count[topic]
                assert missing <= allowed, (
                    f"{listed['path']}: {missing} of {count[topic]} {topic} messages not as published"
                )
        # the bag begins with the episode's instruction (not the previous episode's, latched before it)
        assert [deserialize_message(d, String).data for d in messages[TOPICS["instruction"]]] == [listed["instruction"]]
        # an observation per step (one more each time the lockstep sim published one again), with 12
        # IMU samples each (best effort, so the recorder too may lose a few: the allowance above);
        # an action per step, and a twist stamped with each step's camera frame (besides the zero
        # twists of the watchdog, stamped otherwise, if the policy node held)
        frames = {M.stamp_from_header(deserialize_message(d, Image).header) for d in messages[TOPICS["image"]]}
        twists = [
            M.stamp_from_header(deserialize_message(d, TwistStamped).header) for d in messages[TOPICS["cmd_twist"]]
        ]
        assert count[TOPICS["joint_states"]] == len(frames) >= STEPS
        assert 0.95 * 12 * len(frames) <= count[TOPICS["imu"]] <= 12 * len(frames), listed["path"]
        assert count[TOPICS["action"]] == sum(stamp in frames for stamp in twists) == STEPS
        assert count[TOPICS["episode_info"]] == 1


def test_recorder_service_records_a_robot_episode(ros, policy_with_robot, tmp_path):
    """~/record true ... false around a policy driving a (fake) robot gives an episode that the
    dataset tools read."""
    dataset = tmp_path / "dataset"
    actions = []
    ros.node.create_subscription(Float32MultiArray, TOPICS["action"], actions.append, qos.RELIABLE)
    ros.start("recorder_node", CONFIG / "recorder.yaml", output_dir=dataset, task="touch")
    assert ros.call(SetBool, "/recorder_node/record", SetBool.Request(data=False)).message == "not recording"
    ros.start_recording()
    start = len(actions)
    ros.spin_for(2.0)
    assert ros.call(SetBool, "/recorder_node/record", SetBool.Request(data=False)).success
    published = len(actions) - start  # ~20 at 10 Hz; fewer when the machine is busy
    ros.spin_until(lambda: load_manifest(dataset), 10, "the episode listed")
    [listed] = load_manifest(dataset)
    episode = read_episode(dataset / listed["path"])
    assert episode.info["source"] == "recorder_node" and episode.info["task"] == "touch"
    assert episode.info["instruction"] == "touch the red cube" and episode.info["success"] is None
    # At most the actions published while recording (give or take those in flight at start and stop);
    # fewer when the recorder lags, as ~/record starts the bag when the recorder serves the request.
    assert len(episode) == episode.info["steps"] and 5 <= len(episode) <= published + 2, published
    steps = episode.steps(imu_window=12)  # an observation for every action
    assert steps["images"].shape == (len(episode), 96, 96, 3) and steps["instructions"][0] == "touch the red cube"


def test_recorder_keeps_a_robot_episode_with_more_actions_than_frames(ros, tmp_path):
    """A timer-triggered policy faster than its camera (40 Hz over 20 Hz frames, as on a busy robot)
    answers frames twice: the episode is kept whole, each action with the latest frame before it."""
    dataset = tmp_path / "dataset"
    # max_input_age 0.5 s: a frame 50 ms old is not stale at 40 Hz (the default, two periods, would hold)
    ros.start("policy_node", policy="random", trigger="timer", control_rate_hz=40.0, max_input_age=0.5)
    robot = ros.fake_robot()
    twists = ros.twists()
    robot.instruction.publish(String(data="touch the red cube"))
    ros.moving_again(twists, "the policy's first commands", timeout=30)
    ros.start("recorder_node", CONFIG / "recorder.yaml", output_dir=dataset)
    ros.start_recording()
    ros.spin_for(2.0)
    assert ros.call(SetBool, "/recorder_node/record", SetBool.Request(data=False)).success
    ros.spin_until(lambda: load_manifest(dataset), 10, "the episode listed")
    [listed] = load_manifest(dataset)
    episode = read_episode(dataset / listed["path"])
    assert len(episode) == listed["steps"] > len(np.unique(episode.image_stamps)), ros.log("recorder_node")
    assert episode.steps(imu_window=12)["images"].shape == (len(episode), 96, 96, 3)
