"""Temporal ensembling of action chunks (ACT): the action for now from every chunk that covers it,
shared by VLAPolicy (in process) and the ROS policy node's asynchronous inference."""
from __future__ import annotations

import numpy as np

from vla.contracts.action import GRIPPER


def temporal_ensemble(predictions: np.ndarray, ages: np.ndarray, decay: float) -> np.ndarray:
    """`predictions` [n, 7]: what each chunk covering now predicts for now; `ages` [n]: how many
    steps ago each chunk was predicted. The motion is their mean weighted exp(-decay * age), newest
    weighted most; the gripper is the newest chunk's own command, never a mean: a mean of open (1)
    and closed (0) is half-open fingers that hold nothing. Inside the limits when every prediction
    is (a weighted mean, computed in float64: its rounding is far below float32's)."""
    predictions, ages = np.asarray(predictions, dtype=np.float64), np.asarray(ages)
    weights = np.exp(-decay * ages)
    action = (weights[:, None] * predictions).sum(0) / weights.sum()
    action[GRIPPER] = predictions[np.argmin(ages), GRIPPER]
    return action.astype(np.float32)
