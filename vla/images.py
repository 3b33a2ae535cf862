"""The one conversion of camera images to the model's square input, shared by the training index,
the model's preprocessing and the ROS node, so that every path feeds the model the same pixels."""
from __future__ import annotations

import cv2
import numpy as np


def fit_image(rgb: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H, W, 3] RGB -> [size, size, 3]: area-averaged resize, no crop (the aspect ratio of a
    non-square camera is not kept; train and deploy with the same camera geometry)."""
    if rgb.shape[:2] == (size, size):
        return rgb
    return cv2.resize(rgb, (size, size), interpolation=cv2.INTER_AREA)
