"""ROS 2 messages without ROS: observation and action arrays <-> message fields <-> CDR."""
import numpy as np
import pytest

from vla.contracts import state_from_joints
from vla.contracts.topics import BASE_FRAME, EPOCH_NS, MSG_TYPES, step_stamp
from vla.data import messages as M
from vla.data.messages import TYPESTORE, build, serialize


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
    fields = M.image_fields(rgb, 123) | {"encoding": encoding, "step": 32, "data": padded.reshape(-1)}
    msg = TYPESTORE.deserialize_cdr(serialize(MSG_TYPES["image"], fields), MSG_TYPES["image"])
    assert np.array_equal(M.image_from_msg(msg), rgb)
    with pytest.raises(ValueError, match="unsupported image encoding '16UC1'"):
        M.image_from_msg(build(MSG_TYPES["image"], fields | {"encoding": "16UC1"}))


def test_joint_states_twist_and_imu_fields_round_trip():
    rng = np.random.default_rng(1)
    arm, fingers = rng.uniform(-1, 1, 7), rng.uniform(0, 0.04, 2)
    fields = M.joint_state_fields(np.r_[arm, fingers], np.zeros(9), step_stamp(3, 10))
    order = rng.permutation(9)  # a robot may publish the joints in any order
    fields |= {"name": [fields["name"][i] for i in order], "position": fields["position"][order]}
    msg = build(MSG_TYPES["joint_states"], fields)
    assert np.array_equal(M.state_from_msg(msg), state_from_joints(arm, fingers))
    assert M.stamp_from_header(msg.header) == EPOCH_NS + 300_000_000
    renamed = [n.replace("joint4", "jointX") for n in fields["name"]]
    with pytest.raises(ValueError, match="panda_joint4"):
        M.state_from_msg(build(MSG_TYPES["joint_states"], fields | {"name": renamed}))

    action = np.array([0.01, -0.02, 0.03, 0.1, -0.2, 0.05, 0.7], np.float32)
    twist = build(MSG_TYPES["cmd_twist"], M.twist_fields(action, 10, 5))
    assert twist.twist.linear.y == pytest.approx(-0.2) and twist.header.frame_id == BASE_FRAME
    assert np.allclose(M.action_from_twist(twist, M.gripper_fields(action)["data"], 10), action)
    assert np.array_equal(M.action_from_msg(build(MSG_TYPES["action"], M.action_fields(action))), action)

    imu = build(MSG_TYPES["imu"], M.imu_fields(np.arange(6.0), 0))
    assert imu.orientation_covariance[0] == -1 and imu.header.frame_id == "panda_hand"
    assert np.array_equal(M.imu_sample_from_msg(imu), np.arange(6.0))
