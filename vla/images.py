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
    # OpenCV's area resize is fast for integer factors and slow otherwise (2.3 ms for 640x480 ->
    # 96x96): halve exactly while the image is over twice the target, then resize the rest.
    while min(rgb.shape[:2]) >= 4 * size:
        rgb = cv2.resize(rgb, (rgb.shape[1] // 2, rgb.shape[0] // 2), interpolation=cv2.INTER_AREA)
    return cv2.resize(rgb, (size, size), interpolation=cv2.INTER_AREA)
