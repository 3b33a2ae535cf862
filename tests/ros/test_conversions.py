"""vla_ros message conversions and the policy node's input watchdog (no DDS: plain functions)."""
import cv2
import numpy as np
import pytest

pytest.importorskip("rclpy")
from geometry_msgs.msg import TwistStamped
from sensor_msgs.msg import CompressedImage, Image, Imu, JointState

from vla.contracts import ACTION_HIGH, ACTION_LOW, ARM_JOINT_NAMES, FINGER_JOINT_NAMES, state_from_joints
from vla.data import messages as M
from vla_ros.conversions import (
    InputError,
    action_messages,
    command_action,
    compressed_input,
    fill,
    image_input,
    imu_input,
    state_input,
)
from vla_ros.inputs import Inputs

RNG = np.random.default_rng(0)
# a smooth picture: resampling it changes little, unlike noise
_Y, _X = np.mgrid[0:96, 0:96]
IMAGE = np.stack([_X * 2.5, _Y * 2.5, 128 + 100 * np.sin(_X / 9.0) * np.cos(_Y / 13.0)], -1).astype(np.uint8)


def image_msg(pixels: np.ndarray, encoding: str, pad: int = 0) -> Image:
    height, width = pixels.shape[:2]
    rows = pixels.reshape(height, -1)
    rows = np.concatenate([rows, np.zeros((height, pad), np.uint8)], axis=1)
    return Image(height=height, width=width, encoding=encoding, step=rows.shape[1], data=rows.tobytes())


@pytest.mark.parametrize("encoding, convert", [
    ("rgb8", None), ("bgr8", cv2.COLOR_RGB2BGR), ("rgba8", cv2.COLOR_RGB2RGBA), ("bgra8", cv2.COLOR_RGB2BGRA),
])
def test_colour_encodings_give_the_same_rgb_image(encoding, convert):
    pixels = IMAGE if convert is None else cv2.cvtColor(IMAGE, convert)
    for pad in (0, 7):  # rows padded beyond width * channels are allowed (step)
        np.testing.assert_array_equal(image_input(image_msg(pixels, encoding, pad), 96), IMAGE)


def test_mono8_is_replicated_to_three_channels():
    grey = IMAGE[:, :, 0]
    out = image_input(image_msg(grey, "mono8"), 96)
    assert out.shape == (96, 96, 3) and all(np.array_equal(out[:, :, c], grey) for c in range(3))


def test_vga_bgr8_becomes_the_same_model_input_as_96px_rgb8():
    vga = cv2.cvtColor(cv2.resize(IMAGE, (640, 480), interpolation=cv2.INTER_LINEAR), cv2.COLOR_RGB2BGR)
    out = image_input(image_msg(vga, "bgr8"), 96)
    assert out.shape == (96, 96, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - IMAGE).mean() < 2.0  # resampling error only


@pytest.mark.parametrize("msg, why", [
    (image_msg(IMAGE, "yuv422"), "unsupported encoding"),
    (image_msg(IMAGE, "16UC1"), "unsupported encoding"),
    (Image(height=96, width=96, encoding="rgb8", step=288, data=bytes(288 * 95)), "inconsistent"),
    (Image(height=96, width=96, encoding="rgb8", step=288, data=bytes(288 * 97)), "inconsistent"),
    (Image(height=96, width=96, encoding="rgb8", step=200, data=bytes(200 * 96)), "too short"),
    (Image(height=0, width=0, encoding="rgb8", step=0, data=b""), "inconsistent"),
])
def test_bad_images_are_input_errors(msg, why):
    with pytest.raises(InputError, match=why):
        image_input(msg, 96)


@pytest.mark.parametrize("ext, fmt", [(".jpg", "bgr8; jpeg compressed bgr8"), (".png", "png")])
def test_compressed_images(ext, fmt):
    _ok, data = cv2.imencode(ext, cv2.cvtColor(cv2.resize(IMAGE, (640, 480)), cv2.COLOR_RGB2BGR))
    out = compressed_input(CompressedImage(format=fmt, data=data.tobytes()), 96)
    assert np.abs(out.astype(int) - IMAGE).mean() < 3.0
    with pytest.raises(InputError, match="cannot decode"):
        compressed_input(CompressedImage(format=fmt, data=b"\xff\xd8 not an image"), 96)
    with pytest.raises(InputError, match="unsupported compressed format"):
        compressed_input(CompressedImage(format="16UC1; compressedDepth png", data=data.tobytes()), 96)


def joint_msg(names, positions) -> JointState:
    return JointState(name=list(names), position=[float(q) for q in positions])


def test_joint_states_in_any_order_with_extra_joints():
    arm, fingers = RNG.uniform(-1, 1, 7), [0.02, 0.03]
    names = list(ARM_JOINT_NAMES + FINGER_JOINT_NAMES) + ["some_other_joint"]
    positions = list(arm) + fingers + [5.0]
    order = RNG.permutation(len(names))
    state = state_input(joint_msg([names[i] for i in order], [positions[i] for i in order]))
    np.testing.assert_array_equal(state, state_from_joints(arm, fingers))


@pytest.mark.parametrize("names, positions, why", [
    (ARM_JOINT_NAMES + FINGER_JOINT_NAMES, [0.0] * 8, "9 names but 8 positions"),
    (ARM_JOINT_NAMES + FINGER_JOINT_NAMES[:1], [0.0] * 8, "lacks joints"),
    (ARM_JOINT_NAMES + FINGER_JOINT_NAMES, [0.0] * 3 + [np.nan] + [0.0] * 5, "NaN"),
    (ARM_JOINT_NAMES + FINGER_JOINT_NAMES, [0.0] * 3 + [1e300] + [0.0] * 5, "NaN or inf|implausible"),
])
def test_bad_joint_states_are_input_errors(names, positions, why):
    msg = JointState(name=list(names), position=[float(q) for q in positions])
    with pytest.raises(InputError, match=why):
        state_input(msg)


def test_imu_samples_must_be_finite_and_plausible():
    sample = RNG.normal(size=6)
    msg = fill(Imu(), M.imu_fields(sample, 5))
    np.testing.assert_array_equal(imu_input(msg), sample.astype(np.float32))
    msg.angular_velocity.y = float("nan")
    with pytest.raises(InputError, match="NaN"):
        imu_input(msg)
    msg.angular_velocity.y = 1e300  # once accepted, and the node kept commanding
    with pytest.raises(InputError, match="implausible"):
        imu_input(msg)


def test_action_to_commands_and_back_is_exact():
    for _ in range(100):
        action = RNG.uniform(ACTION_LOW, ACTION_HIGH).astype(np.float32)
        raw, gripper, twist = action_messages(action, 10.0, 1_234_567_890_123, "base")
        assert twist.header.stamp.sec == 1234 and twist.header.stamp.nanosec == 567_890_123
        assert twist.header.frame_id == "base"
        np.testing.assert_array_equal(np.asarray(raw.data, np.float32), action)
        assert raw.layout.dim[0].label == "action" and raw.layout.dim[0].size == 7
        np.testing.assert_array_equal(command_action(twist, gripper.data, 10.0), action)


def test_commands_are_clamped_and_nan_rejected():
    twist = TwistStamped()
    twist.twist.linear.x = 100.0
    assert command_action(twist, 3.0, 10.0)[0] == ACTION_HIGH[0]
    assert command_action(twist, 3.0, 10.0)[6] == 1.0
    twist.twist.angular.z = float("nan")
    with pytest.raises(InputError, match="NaN"):
        command_action(twist, 1.0, 10.0)


def good_inputs(now: int) -> Inputs:
    inputs = Inputs(imu_window=3, max_age_ns=200_000_000, max_ahead_ns=100_000_000)
    inputs.instruction = "touch the red cube"
    inputs.update("camera", now, now, lambda: IMAGE)
    inputs.update("joint_states", now, now, lambda: np.zeros(15, np.float32))
    for k in range(3):
        inputs.update("imu", now - (2 - k), now, lambda k=k: np.full(6, k, np.float64))
    return inputs


def test_watchdog_reasons_and_recovery():
    now = 10_000_000_000
    inputs = good_inputs(now)
    assert inputs.problem(now) is None
    obs = inputs.observation()
    assert obs["imu"].dtype == np.float32 and obs["imu"].shape == (3, 6) and obs["imu"][-1, 0] == 2
    assert inputs.problem(now + 200_000_000) is None
    assert inputs.problem(now + 200_000_001)[0] == "camera:stale"

    def bad():
        raise InputError("unsupported encoding 'yuv422'")

    assert not inputs.update("camera", now, now, bad)
    assert inputs.problem(now) == ("camera:invalid", "camera: unsupported encoding 'yuv422'")
    assert inputs.update("camera", now, now, lambda: IMAGE) and inputs.problem(now) is None

    fresh = Inputs(imu_window=3, max_age_ns=1, max_ahead_ns=1)
    assert fresh.problem(0)[0] == "instruction:missing"
    fresh.instruction = "x"
    assert fresh.problem(0)[0] == "camera:missing"


def test_ages_count_from_arrival_and_stamps_far_off_are_invalid():
    now = 10_000_000_000
    inputs = good_inputs(now)
    ahead = now + 100_000_000  # as far ahead as allowed: good, and it ages from its arrival
    assert inputs.update("camera", ahead, now, lambda: IMAGE)
    assert inputs.problem(now + 200_000_001)[0] == "camera:stale"
    assert not inputs.update("camera", ahead + 1, now, lambda: IMAGE)
    assert "ahead of this node's clock" in inputs.problem(now)[1]
    assert inputs.update("camera", now - 200_000_000, now, lambda: IMAGE) and inputs.problem(now) is None
    assert not inputs.update("camera", now - 200_000_001, now, lambda: IMAGE)
    assert "200 ms before it arrived" in inputs.problem(now)[1]


def test_synchronized_observations():
    now = 10_000_000_000
    inputs = good_inputs(now)
    assert not inputs.synchronized(now)  # already acted on
    inputs.update("camera", now + 1, now + 1, lambda: IMAGE)
    assert not inputs.synchronized(now)  # joint states and IMU not as new yet
    inputs.update("joint_states", now + 1, now + 1, lambda: np.zeros(15, np.float32))
    inputs.update("imu", now + 1, now + 1, lambda: np.zeros(6))
    assert inputs.synchronized(now)
