"""Writing rollout videos (mp4 through imageio-ffmpeg, or gif) with text overlays, one episode
after another or several side by side in a grid."""
from __future__ import annotations

from pathlib import Path

import cv2
import imageio.v2 as imageio
import numpy as np

FONT = cv2.FONT_HERSHEY_SIMPLEX


def annotate(frame: np.ndarray, lines: list[str], colour=(255, 255, 255)) -> np.ndarray:
    """Draw text lines at the top-left of an RGB frame, on a dark band so they stay readable; a line
    too long for the frame wraps at a word."""
    out = np.ascontiguousarray(frame).copy()
    scale = 0.4 * out.shape[0] / 256
    lines = [part for line in lines for part in _wrap(line, out.shape[1] - 8, scale)]
    height = int(35 * scale) + 2
    cv2.rectangle(out, (0, 0), (out.shape[1], height * len(lines) + 4), (0, 0, 0), -1)
    for i, line in enumerate(lines):
        cv2.putText(out, line, (4, height * (i + 1)), FONT, scale, colour, 1, cv2.LINE_AA)
    return out


def _wrap(line: str, width: int, scale: float) -> list[str]:
    parts = [""]
    for word in line.split():
        candidate = f"{parts[-1]} {word}".strip()
        if parts[-1] and cv2.getTextSize(candidate, FONT, scale, 1)[0][0] > width:
            parts.append(word)
        else:
            parts[-1] = candidate
    return parts


def grid(films: list[list[np.ndarray]], columns: int) -> list[np.ndarray]:
    """Several films (lists of equally sized frames) played side by side, `columns` to a row; a film
    that ends first holds its last frame."""
    length = max(len(film) for film in films)
    blank = np.zeros_like(films[0][0])
    rows = -(-len(films) // columns)
    tiles = films + [[blank]] * (rows * columns - len(films))
    frames = []
    for t in range(length):
        at = [film[min(t, len(film) - 1)] for film in tiles]
        frames.append(np.vstack([np.hstack(at[r * columns:(r + 1) * columns]) for r in range(rows)]))
    return frames


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
