"""Action chunks of asynchronous inference: aligned with the observation they answer, blended, and
none once they have run out."""
from __future__ import annotations

import numpy as np
import pytest

ActionChunks = pytest.importorskip("vla_ros.chunks").ActionChunks  # installed with the ROS nodes

STEP = 100_000_000  # ns per action at 10 Hz


def chunk(values) -> np.ndarray:
    return np.array([[v] * 7 for v in values], dtype=np.float32)


def test_a_chunk_plays_aligned_with_its_observation_and_runs_out():
    chunks = ActionChunks(rate_hz=10.0, decay=0.5)
    chunks.add(1_000 * STEP, chunk([0.1, 0.2, 0.3]))
    assert chunks.action(1_000 * STEP - 1) is None  # before its observation
    for i, value in enumerate([0.1, 0.2, 0.3]):
        action, stamp = chunks.action(1_000 * STEP + i * STEP + STEP // 2)
        assert action[0] == pytest.approx(value) and stamp == 1_000 * STEP
    assert chunks.action(1_003 * STEP) is None  # ran out


def test_a_new_chunk_is_blended_in_weighted_most():
    chunks = ActionChunks(rate_hz=10.0, decay=0.5)
    chunks.add(0, chunk([0.0, 0.0, 0.0, 0.0]))
    chunks.add(2 * STEP, chunk([1.0, 1.0]))
    action, stamp = chunks.action(2 * STEP)  # step 2 of the old chunk, step 0 of the new one
    old, new = np.exp(-0.5 * 2), 1.0
    assert action[0] == pytest.approx(new / (old + new)) and stamp == 2 * STEP
    assert chunks.action(4 * STEP) is None  # both ran out
