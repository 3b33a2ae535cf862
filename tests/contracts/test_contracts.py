"""The contracts: action limits, plausible sensor readings, observation specs, the state's
kinematics; and that importing them costs no simulator, torch or ROS."""
import numpy as np
import pytest

from vla.contracts import ACTION_HIGH, ACTION_LOW, MAX_TRANSLATION, ObservationSpec, clip_action, state_from_joints
from vla.contracts.action import WORKSPACE_LOW, keep_in_workspace
from vla.contracts.observation import IMU_LIMITS, checked_reading
from vla.contracts.topics import EPOCH_NS, imu_stamps, step_stamp


def test_actions_are_clipped_to_the_limits():
    assert np.array_equal(clip_action(np.full(7, 10.0)), ACTION_HIGH)
    assert np.array_equal(clip_action(np.full(7, -10.0)), ACTION_LOW)
    assert clip_action(np.zeros((3, 2, 7))).shape == (3, 2, 7)  # chunks of actions too
    with pytest.raises(ValueError, match="NaN"):
        clip_action([0, 0, np.nan, 0, 0, 0, 1])
    with pytest.raises(ValueError, match="shape"):
        clip_action([0, 0, 0])


def test_the_hand_moves_no_further_out_of_the_workspace():
    down = np.array([0, 0, -MAX_TRANSLATION, 0, 0, 0, 1], dtype=np.float32)
    near_floor = np.array([0.5, 0.0, WORKSPACE_LOW[2] + 0.01])
    assert np.isclose(keep_in_workspace(down, near_floor)[2], -0.01)  # down to the floor, no lower
    assert np.array_equal(keep_in_workspace(-down, near_floor), -down)  # up, as commanded
    below = np.array([0.5, 0.0, WORKSPACE_LOW[2] - 0.01])
    assert keep_in_workspace(down, below)[2] == 0 and keep_in_workspace(-down, below)[2] == MAX_TRANSLATION
    above_and_behind = np.array([0.08, 0.0, 0.9])  # a Panda at zero joints
    cut = keep_in_workspace(np.array([-0.05, 0.05, 0.05, 0.1, 0, 0, 0.3]), above_and_behind)
    assert np.allclose(cut, [0, 0.05, 0, 0.1, 0, 0, 0.3])  # back in, sideways inside: allowed


def test_readings_must_be_finite_and_plausible():
    imu = np.zeros((12, 6))
    assert checked_reading("imu", imu, (12, 6), IMU_LIMITS).dtype == np.float32
    with pytest.raises(ValueError, match="implausible"):
        checked_reading("imu", imu + [0, 0, 0, 0, 0, 1e3], (12, 6), IMU_LIMITS)  # 1000 rad/s
    checked_reading("imu", imu + [400, 0, 0, 0, 0, 0], (12, 6), IMU_LIMITS)  # 40 g: a hard knock
    with pytest.raises(ValueError, match="NaN or inf"):
        checked_reading("state", [np.nan] * 15, (15,), 10.0)


def test_observation_spec_bounds():
    assert ObservationSpec() == ObservationSpec(96, 12, False)
    for bad in (dict(image_size=0), dict(image_size=100_000), dict(imu_window=10**6), dict(imu_window=2.5)):
        with pytest.raises(ValueError):
            ObservationSpec(**bad)


def test_time_base():
    assert step_stamp(3, 10) == EPOCH_NS + 300_000_000
    stamps = imu_stamps(step_stamp(1, 10), 12, 120)
    assert stamps[-1] == step_stamp(1, 10) and np.allclose(np.diff(stamps), 1e9 / 120, atol=1)


def test_state_of_the_home_pose():
    """The grasp point of the Panda's zero pose, from Franka's DH parameters."""
    state = state_from_joints([0, 0, 0, -0.07, 0, 0.5, 0.785], [0.04, 0.04])
    assert state.shape == (15,) and state[7] == pytest.approx(0.08)
    assert np.linalg.norm(state[11:15]) == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="7 arm and 2 finger"):
        state_from_joints([0.0] * 6, [0.0, 0.0])
