"""Writing rollout videos (mp4 through imageio-ffmpeg, or gif) with text overlays."""
from __future__ import annotations

from pathlib import Path

import cv2
import imageio.v2 as imageio
import numpy as np


def annotate(frame: np.ndarray, lines: list[str], colour=(255, 255, 255)) -> np.ndarray:
    """Draw text lines at the top-left of an RGB frame, on a dark band so they stay readable."""
    out = np.ascontiguousarray(frame).copy()
    scale = out.shape[0] / 256
    height = int(14 * scale) + 2
    cv2.rectangle(out, (0, 0), (out.shape[1], height * len(lines) + 4), (0, 0, 0), -1)
    for i, line in enumerate(lines):
        cv2.putText(out, line, (4, height * (i + 1)), cv2.FONT_HERSHEY_SIMPLEX, 0.4 * scale, colour, 1, cv2.LINE_AA)
    return out


def write_video(path: str | Path, frames: list[np.ndarray], fps: int = 10) -> Path:
    """Write frames to .mp4 or .gif (chosen by the suffix); returns the path."""
    path = Path(path)
    if not frames:
        raise ValueError(f"no frames to write to {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gif":
        imageio.mimsave(path, frames, duration=1000 / fps, loop=0)
    elif path.suffix == ".mp4":
        with imageio.get_writer(path, fps=fps, codec="libx264", quality=7, macro_block_size=16) as writer:
            for frame in frames:
                writer.append_data(frame)
    else:
        raise ValueError(f"video path must end in .mp4 or .gif, got {path}")
    return path
