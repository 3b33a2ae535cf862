"""Hand-made bags: a few steps of constant sensor data, with any message or the metadata changed."""
from pathlib import Path

import numpy as np
import pytest

from vla.contracts.topics import step_stamp
from vla.data import messages as M
from vla.data.writer import EpisodeWriter

INFO = {"task": "reach", "instruction": "touch the red ball", "seed": 0, "success": True, "steps": 2, "control_hz": 10}


def write_bag(path: Path, skip=(), encoding="rgb8", actions=2, info=None, edit=None) -> Path:
    """A bag of `actions` steps (8x8 images); `edit(key, t, fields) -> fields` changes a message of
    step t, `info` replaces the episode metadata."""
    edit = edit or (lambda key, t, fields: fields)
    writer = EpisodeWriter(path)
    for t in range(actions + 1):
        stamp = step_stamp(t, 10)
        fields = {
            "image": M.image_fields(np.zeros((8, 8, 3), np.uint8), stamp) | {"encoding": encoding},
            "joint_states": M.joint_state_fields(np.zeros(9), np.zeros(9), stamp),
            "imu": M.imu_fields(np.zeros(6), stamp),
            "action": M.action_fields(np.zeros(7)) if t < actions else None,
        }
        for key, value in fields.items():
            if key not in skip and value is not None:
                writer.write(key, stamp, edit(key, t, value))
    writer.close(INFO | {"steps": actions} if info is None else info)
    return path


@pytest.fixture(scope="session")
def handmade():
    """write_bag(path, skip=(), encoding="rgb8", actions=2, info=None, edit=None) -> path."""
    return write_bag
