"""Episodes: sim -> rosbag2 (MCAP with CRCs) -> independent readers (rosbags, mcap), and clear
one-line errors naming the file for bad input: damaged bytes, metadata and values."""
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from mcap.reader import NonSeekingReader, make_reader
from mcap.records import Chunk, DataEnd, Footer
from mcap.stream_reader import StreamReader
from mcap_ros2.decoder import DecoderFactory
from rosbags.highlevel import AnyReader
from rosbags.rosbag2 import Writer
from rosbags.rosbag2.enums import StoragePlugin

from vla.contracts import JOINT_NAMES, state_from_joints
from vla.contracts.topics import EPOCH_NS, MSG_TYPES, TOPICS, step_stamp
from vla.data import messages as M
from vla.data import writer as writer_module
from vla.data.messages import TYPESTORE
from vla.data.reader import EpisodeError, read_episode
from vla.data.writer import CUSTOM_DATA_KEY, EpisodeWriter, _latched_qos


def messages(bag: Path) -> dict:
    """topic -> [(log time, message)] read with rosbags' AnyReader (independent of our reader)."""
    out = {}
    with AnyReader([bag]) as reader:
        for connection, log_time, raw in reader.messages():
            out.setdefault(connection.topic, []).append((log_time, reader.deserialize(raw, connection.msgtype)))
    return out


def test_bags_read_by_rosbags_match_the_simulator(expert_dataset):
    root, reference = expert_dataset
    manifest = json.loads((root / "manifest.json").read_text())["episodes"]
    assert [e["path"] for e in manifest] == ["episode_000000", "episode_000001", "episode_000002"]
    for entry, (observations, actions, success) in zip(manifest, reference):
        bag = root / entry["path"]
        msgs = messages(bag)
        steps = len(actions)
        stamps = [EPOCH_NS + t * 100_000_000 for t in range(steps + 1)]
        images = msgs[TOPICS["image"]]
        assert [t for t, _ in images] == stamps
        for obs, (log_time, msg) in zip(observations, images):
            assert msg.encoding == "rgb8" and M.stamp_from_header(msg.header) == log_time
            assert np.array_equal(msg.data.reshape(96, 96, 3), obs["image"])
        joints = msgs[TOPICS["joint_states"]]
        assert [t for t, _ in joints] == stamps
        for obs, (_, msg) in zip(observations, joints):
            assert list(msg.name) == list(JOINT_NAMES) and len(msg.velocity) == 9
            assert np.array_equal(state_from_joints(msg.position[:7], msg.position[7:]), obs["state"])
        imu = msgs[TOPICS["imu"]]
        assert len(imu) == 12 * (steps + 1)  # 120 Hz, each sample its own message
        imu_times = np.array([t for t, _ in imu])
        assert np.allclose(np.diff(imu_times), 1e9 / 120, atol=1)
        for t, obs in enumerate(observations):
            window = [M.imu_sample_from_msg(m) for s, m in imu if s <= stamps[t]][-12:]
            assert np.array_equal(np.float32(window), obs["imu"])
        recorded = [np.asarray(m.data) for _, m in msgs[TOPICS["action"]]]
        assert np.array_equal(recorded, actions) and [t for t, _ in msgs[TOPICS["action"]]] == stamps[:-1]
        twists = [m.twist.linear for _, m in msgs[TOPICS["cmd_twist"]]]
        assert np.allclose([[v.x, v.y, v.z] for v in twists], np.array(actions)[:, :3] * 10)
        assert [m.data for _, m in msgs[TOPICS["gripper"]]] == [float(a[6]) for a in actions]
        assert [m.data for _, m in msgs[TOPICS["instruction"]]] == [observations[0]["instruction"]]
        info = json.loads(msgs[TOPICS["episode_info"]][0][1].data)
        meta = yaml.safe_load((bag / "metadata.yaml").read_text())["rosbag2_bagfile_information"]
        assert json.loads(meta["custom_data"][CUSTOM_DATA_KEY]) == info
        assert meta["storage_identifier"] == "mcap"
        assert (info["seed"], info["steps"], info["success"], info["task"]) == (entry["seed"], steps, success, "reach")
        assert info["instruction"] == observations[0]["instruction"] and info["versions"]["pybullet"]


def test_bags_read_by_the_mcap_library(expert_dataset):
    root, reference = expert_dataset
    with open(root / "episode_000001" / "episode_000001.mcap", "rb") as f:
        reader = make_reader(f, decoder_factories=[DecoderFactory()], validate_crcs=True)
        assert reader.get_header().profile == "ros2"
        counts = {}
        for schema, channel, _, decoded in reader.iter_decoded_messages():
            assert schema.encoding == "ros2msg" and channel.message_encoding == "cdr"
            counts[channel.topic] = counts.get(channel.topic, 0) + 1
            if channel.topic == TOPICS["action"]:
                last_action = np.array(decoded.data, np.float32)
    steps = len(reference[1][1])
    assert counts == {TOPICS["image"]: steps + 1, TOPICS["joint_states"]: steps + 1, TOPICS["imu"]: 12 * (steps + 1),
                      TOPICS["instruction"]: 1, TOPICS["action"]: steps, TOPICS["cmd_twist"]: steps,
                      TOPICS["gripper"]: steps, TOPICS["episode_info"]: 1}
    assert np.array_equal(last_action, reference[1][1][-1])


# ---- bad input ------------------------------------------------------------------------------------
def test_a_valid_handmade_bag_reads(tmp_path, handmade):
    episode = read_episode(handmade(tmp_path / "ok"))
    assert len(episode) == 2 and episode.steps()["imu"].shape == (2, 12, 6)  # short IMU history is padded


def test_late_commands_pair_with_the_observation_their_twist_answers(tmp_path):
    """A recorder on a busy robot may log an action after the next observation: the twist published
    with it carries the stamp of the frame it answers, and pairs it; a holding node's lone twists
    (no action) are passed over."""
    writer = EpisodeWriter(tmp_path / "late")
    period = step_stamp(1, 10)
    for t in range(4):
        stamp = step_stamp(t, 10)
        writer.write("image", stamp, M.image_fields(np.full((8, 8, 3), t, np.uint8), stamp))
        writer.write("joint_states", stamp, M.joint_state_fields(np.full(9, 0.1 * t), np.zeros(9), stamp))
        writer.write("imu", stamp, M.imu_fields(np.zeros(6), stamp))
    for t in range(3):  # each command logged 1.5 periods after its frame, the next frame already logged
        logged, action = step_stamp(t, 10) + 3 * period // 2, np.full(7, 0.01 * t, np.float32)
        writer.write("action", logged, M.action_fields(action))
        writer.write("cmd_twist", logged + 1000, M.twist_fields(action, 10, step_stamp(t, 10)))
        writer.write("cmd_twist", logged + period // 3, M.twist_fields(np.zeros(7), 10, logged + period // 3))  # a hold
    writer.close({"task": "reach", "instruction": "touch the red ball", "seed": 0, "success": True, "steps": 3,
                  "control_hz": 10})
    episode = read_episode(tmp_path / "late")
    steps = episode.steps()
    assert episode.action_stamps.tolist() == [step_stamp(t, 10) for t in range(3)]
    assert [image[0, 0, 0] for image in steps["images"]] == [0, 1, 2]
    np.testing.assert_array_equal(steps["states"], episode.states[:3])


def test_commands_logged_in_a_burst_pair_with_the_twist_that_commands_the_same_motion(tmp_path):
    """A loaded recorder may receive a run of actions at once and their twists after them: the
    twist logged nearest to an action is then another's; the one commanding its motion is its own."""
    writer = EpisodeWriter(tmp_path / "burst")
    for t in range(4):
        stamp = step_stamp(t, 10)
        writer.write("image", stamp, M.image_fields(np.full((8, 8, 3), t, np.uint8), stamp))
        writer.write("joint_states", stamp, M.joint_state_fields(np.full(9, 0.1 * t), np.zeros(9), stamp))
        writer.write("imu", stamp, M.imu_fields(np.zeros(6), stamp))
    burst = step_stamp(3, 10) + 50_000_000
    actions = [np.array([0.01 * (t + 1), 0, 0, 0, 0, 0, 1], np.float32) for t in range(3)]
    for t, action in enumerate(actions):  # the actions, then the twists, each a microsecond apart
        writer.write("action", burst + t * 1000, M.action_fields(action))
        writer.write("cmd_twist", burst + (3 + t) * 1000, M.twist_fields(action, 10, step_stamp(t, 10)))
    writer.close({"task": "reach", "instruction": "touch the red ball", "seed": 0, "success": True, "steps": 3,
                  "control_hz": 10})
    episode = read_episode(tmp_path / "burst")
    assert episode.action_stamps.tolist() == [step_stamp(t, 10) for t in range(3)]
    assert [image[0, 0, 0] for image in episode.steps()["images"]] == [0, 1, 2]


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
def test_bad_input_is_a_clear_error_naming_the_file(tmp_path, handmade, case, problem):
    path = tmp_path / "bag"
    if case == "empty directory":
        path.mkdir()
    elif case == "text file":
        path = tmp_path / "notes.txt"
        path.write_text("hello")
    elif case == "truncated":
        handmade(path)
        mcap = path / "bag.mcap"
        mcap.write_bytes(mcap.read_bytes()[:-100])
        path = mcap
    elif case in ("missing topic", "wrong encoding", "empty episode"):
        handmade(path, skip={"missing topic": ("joint_states",)}.get(case, ()),
                  encoding="32FC1" if case == "wrong encoding" else "rgb8", actions=0 if case == "empty episode" else 2)
    else:
        with Writer(path, version=9, storage_plugin=StoragePlugin.MCAP) as writer:
            if case == "wrong type":
                writer.add_connection(TOPICS["image"], "sensor_msgs/msg/CompressedImage", typestore=TYPESTORE)
            else:
                writer.add_connection(TOPICS["action"], MSG_TYPES["action"], typestore=TYPESTORE,
                                      serialization_format="json")
    with pytest.raises((EpisodeError, FileNotFoundError), match=problem) as error:
        read_episode(path)
    assert str(path) in str(error.value) and "EpisodeError" not in str(error.value)  # not wrapped twice


# ---- damage: CRCs, metadata, values ----------------------------------------------------------------
def crcs(mcap: Path) -> list[int]:
    """The chunk CRCs, the data section CRC and the summary CRC of an MCAP file."""
    with open(mcap, "rb") as f:
        records = list(StreamReader(f, emit_chunks=True).records)
    return ([r.uncompressed_crc for r in records if isinstance(r, Chunk)]
            + [r.data_section_crc for r in records if isinstance(r, DataEnd)]
            + [r.summary_crc for r in records if isinstance(r, Footer)])


def test_bags_carry_crcs_that_the_mcap_library_verifies(tmp_path, handmade):
    mcap = handmade(tmp_path / "bag") / "bag.mcap"
    assert len(crcs(mcap)) == 3 and all(crcs(mcap))
    with open(mcap, "rb") as f:
        assert len(list(NonSeekingReader(f, validate_crcs=True).iter_messages())) == 12  # checks the data CRC


def test_a_damaged_byte_anywhere_is_an_episode_error(tmp_path, handmade):
    mcap = handmade(tmp_path / "bag") / "bag.mcap"
    original = mcap.read_bytes()
    for offset in range(0, len(original), 3):
        damaged = bytearray(original)
        damaged[offset] ^= 1 << offset % 8
        mcap.write_bytes(bytes(damaged))
        with pytest.raises(EpisodeError, match="MCAP"):
            read_episode(tmp_path / "bag")


def test_bags_written_without_crcs_still_read(tmp_path, handmade, monkeypatch):
    """Bags recorded before the writer filled in CRCs (or by tools that leave them at 0)."""
    monkeypatch.setattr(writer_module, "add_crcs", lambda path: None)
    bag = handmade(tmp_path / "bag")
    assert not any(crcs(bag / "bag.mcap")) and len(read_episode(bag)) == 2


def set_value(key: str, field: str, value, t: int = 1):
    """An `edit` for the hand-made bag: `field` of message `key` at step t set to `value`."""
    def edit(k, step, fields):
        if k != key or step != t:
            return fields
        if key == "imu":
            return fields | {"linear_acceleration": {"x": value, "y": 0.0, "z": 9.8}}
        if key in ("joint_states", "action"):
            array = np.array(fields[field], dtype=np.float64)
            array[3] = value
            return fields | {field: array}
        return fields | {field: value}
    return edit


def edit_metadata(bag: Path, change) -> None:
    file = bag / "metadata.yaml"
    meta = yaml.safe_load(file.read_text())
    change(meta["rosbag2_bagfile_information"])
    file.write_text(yaml.safe_dump(meta))


INFO = {"task": "reach", "instruction": "touch the red ball", "seed": 0, "success": True, "steps": 2, "control_hz": 10}


@pytest.mark.parametrize("options, problem", [
    ({"edit": set_value("joint_states", "position", np.nan)}, r"/joint_states: 1 message\(s\) with NaN"),
    ({"edit": set_value("joint_states", "position", 1e6)}, "/joint_states: .* beyond the limits"),
    ({"edit": set_value("imu", "", np.inf)}, r"/imu/data: 1 message\(s\) with NaN, inf"),
    ({"edit": set_value("imu", "", 1e300)}, "/imu/data: .* beyond the limits"),
    ({"edit": set_value("action", "data", np.nan)}, "/vla/action: .* NaN"),
    ({"edit": set_value("action", "data", 0.5)}, "/vla/action: .* beyond the limits"),
    ({"edit": set_value("image", "height", 0)}, "unusable image size 8x0"),
    ({"edit": set_value("image", "width", 1 << 30)}, "unusable image size 1073741824x8"),
    ({"edit": lambda k, t, f: M.image_fields(np.zeros((8, 8 + t, 3), np.uint8), 0) if k == "image" else f},
     "the image size changes within the episode"),
    ({"info": INFO | {"imu_window": 1_000_000}}, "imu_window must be at most 1000"),
    ({"info": INFO | {"steps": "2"}}, "steps='2' is not int"),
    ({"info": INFO | {"control_hz": float("nan")}}, "control_hz=nan.* is out of range"),
    ({"info": INFO | {"seed": -1}}, "seed=-1 is out of range"),
    ({"info": INFO | {"task": ""}}, "task='' .* is empty or too long"),
    ({"info": INFO | {"steps": 3}}, "the metadata says 3 steps, but the bag has 2 actions"),
    ({"info": INFO | {"success": "yes"}}, "success='yes' is not bool or NoneType"),
    ({"info": [1, 2]}, "episode metadata is a list, not a mapping"),
])
def test_bad_values_are_an_episode_error(tmp_path, handmade, options, problem):
    """Non-finite or implausible readings never reach training; absurd metadata is refused."""
    with pytest.raises(EpisodeError, match=problem) as error:
        read_episode(handmade(tmp_path / "bag", **options)).steps(96)
    assert str(tmp_path / "bag") in str(error.value)


@pytest.mark.parametrize("change, problem", [
    (lambda m: m["custom_data"].update({CUSTOM_DATA_KEY: json.dumps(INFO | {"task": "push"})}),
     "custom_data 'vla_episode' differs from the bag's /vla/episode_info"),
    (lambda m: m.update(relative_file_paths="bag.mcap"), "relative_file_paths is not a list"),
    (lambda m: m.update(custom_data=[1]), "custom_data is not a mapping of strings"),
    (lambda m: m.update(storage_identifier="x" * 100_000), r"storage 'xxxx.*\.\.\.$"),
])
def test_bad_metadata_is_a_one_line_episode_error(tmp_path, handmade, change, problem):
    bag = handmade(tmp_path / "bag", info=INFO)
    edit_metadata(bag, change)
    with pytest.raises(EpisodeError, match=problem) as error:
        read_episode(bag)
    assert "\n" not in str(error.value) and len(str(error.value)) < 500


def test_metadata_that_is_not_text_is_an_episode_error(tmp_path, handmade):
    bag = handmade(tmp_path / "bag")
    (bag / "metadata.yaml").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(EpisodeError, match="invalid rosbag2 metadata"):
        read_episode(bag)


def test_a_topic_on_two_channels_is_an_episode_error(tmp_path):
    writer = EpisodeWriter(tmp_path / "bag")
    writer._connections["second"] = writer._writer.add_connection(  # another publisher, another QoS
        TOPICS["joint_states"], MSG_TYPES["joint_states"], typestore=TYPESTORE, offered_qos_profiles=[_latched_qos()])
    for key in ("image", "joint_states", "imu", "action"):
        writer.write(key, step_stamp(0, 10), {"image": M.image_fields(np.zeros((8, 8, 3), np.uint8), 0),
                                              "joint_states": M.joint_state_fields(np.zeros(9), np.zeros(9), 0),
                                              "imu": M.imu_fields(np.zeros(6), 0),
                                              "action": M.action_fields(np.zeros(7))}[key])
    writer.close(INFO | {"steps": 1})
    with pytest.raises(EpisodeError, match=r"\['/joint_states'\] recorded on several channels"):
        read_episode(tmp_path / "bag")
