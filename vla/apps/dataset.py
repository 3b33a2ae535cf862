"""`vla dataset`: look at recorded data.

    vla dataset info DIR                 episodes, success rate, steps, per-task counts, size
    vla dataset stats DIR [--all]        action statistics (also stored in DIR/stats.json)
    vla dataset video EPISODE --out X    camera stream with instruction and actions overlaid (.mp4/.gif)
    vla dataset plot EPISODE|DIR --out X.png   action traces
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np
from rich.console import Console
from rich.table import Table

from vla.apps.video import annotate, write_video
from vla.contracts.action import ACTION_NAMES
from vla.data.dataset import load_manifest, require_dataset
from vla.data.index import STATS_FILE, EpisodeIndex
from vla.data.reader import Episode, EpisodeError, read_episode

VIDEO_HEIGHT = 384
TEXT_BAND = 128  # black band above the image for the overlay (4 lines of vla.apps.video.annotate), hiding none of it


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser("info", help="episodes, success, steps, tasks, size").add_argument("dataset")
    stats = sub.add_parser("stats", help="action statistics for normalisation")
    stats.add_argument("dataset")
    stats.add_argument("--all", action="store_true", help="include failed episodes")
    video = sub.add_parser("video", help="camera stream of an episode with instruction and actions")
    video.add_argument("episode")
    video.add_argument("--out", required=True, help=".mp4 or .gif")
    plot = sub.add_parser("plot", help="action traces of an episode or a dataset as PNG")
    plot.add_argument("target", help="episode directory or dataset directory")
    plot.add_argument("--out", required=True, help=".png")
    plot.add_argument("--max-episodes", type=int, default=50)


def run(args) -> int:
    return {"info": info, "stats": stats, "video": video, "plot": plot}[args.action](args)


def info(args) -> int:
    root = require_dataset(args.dataset)
    episodes = load_manifest(root)
    if not episodes:
        print(f"{root}: no finished episodes")
        return 0
    table = Table(title=f"{root} ({len(episodes)} episodes)")
    for column in ("task", "episodes", "success rate", "mean steps", "MB/episode"):
        table.add_column(column, justify="left" if column == "task" else "right")
    for task in sorted({e["task"] for e in episodes}) + ["all"]:
        rows = [e for e in episodes if task in ("all", e["task"])]
        table.add_row(task, str(len(rows)), f"{100 * np.mean([e['success'] is True for e in rows]):.1f} %",
                      f"{np.mean([e['steps'] for e in rows]):.1f}", f"{np.mean([e['bytes'] for e in rows]) / 1e6:.3f}",
                      style="bold" if task == "all" else None)
    console = Console()
    console.print(table)
    missing = [e["path"] for e in episodes if not (root / e["path"]).is_dir()]
    console.print(
        f"steps: {sum(e['steps'] for e in episodes)}, size: {sum(e['bytes'] for e in episodes) / 1e6:.1f} MB, "
        f"policies: {sorted({e.get('policy', '?') for e in episodes})}, "
        f"image sizes: {sorted({e.get('image_size', '?') for e in episodes})}"
    )
    if missing:
        console.print(f"[red]listed but missing: {missing}")
    return 0


def stats(args) -> int:
    index = EpisodeIndex(args.dataset, successful_only=not args.all)
    s = index.stats["action"]
    table = Table(title=f"action statistics over {s['count']} samples of {len(index.episodes)} episodes")
    table.add_column("")
    for name in ACTION_NAMES:
        table.add_column(name, justify="right")
    for key in ("q01", "q99", "mean", "std", "min", "max"):
        table.add_row(key, *(f"{v:.4f}" for v in s[key]))
    Console().print(table)
    print(f"stored in {index.root / STATS_FILE}")
    return 0


def video(args) -> int:
    episode = read_episode(args.episode)
    write_video(args.out, episode_frames(episode), fps=int(episode.info["control_hz"]))
    print(f"video: {args.out}")
    return 0


def episode_frames(episode: Episode) -> list[np.ndarray]:
    """One frame per step: the camera image (enlarged) with instruction, step and action overlaid."""
    steps = episode.steps()
    frames = []
    for t, (image, action) in enumerate(zip(steps["images"], steps["actions"])):
        lines = [
            steps["instructions"][t],
            f"{episode.info['task']} step {t}",
            "dxyz " + " ".join(f"{v:+.3f}" for v in action[:3]) + f" grip {action[6]:.1f}",
            "drpy " + " ".join(f"{v:+.3f}" for v in action[3:6]),
        ]
        frames.append(annotate(_enlarge(image), lines))
    ok = episode.info["success"]
    last = annotate(
        _enlarge(episode.images[-1]),
        [steps["instructions"][-1], "SUCCESS" if ok else "FAILED"],
        (80, 255, 80) if ok else (255, 80, 80),
    )
    return frames + [last] * 5


def _enlarge(image: np.ndarray) -> np.ndarray:
    scale = VIDEO_HEIGHT / image.shape[0]
    size = (round(image.shape[1] * scale) // 2 * 2, VIDEO_HEIGHT)  # even sizes for H.264
    return np.pad(cv2.resize(image, size, interpolation=cv2.INTER_NEAREST), ((TEXT_BAND, 0), (0, 0), (0, 0)))


def plot(args) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    target = Path(args.target)
    if (target / "manifest.json").is_file():
        paths = [target / e["path"] for e in load_manifest(target)[: args.max_episodes]]
    else:
        paths = [target]
    episodes = []
    for path in paths:
        try:
            episodes.append(read_episode(path))
        except (EpisodeError, FileNotFoundError) as exc:  # a damaged episode does not hide the others
            print(f"skipping {exc}", file=sys.stderr)
    if not episodes:
        raise ValueError(f"{target}: no readable episode to plot")
    fig, axes = plt.subplots(len(ACTION_NAMES), 1, figsize=(8, 12), sharex=True)
    for episode in episodes:
        t = (episode.action_stamps - episode.action_stamps[0]) / 1e9
        for ax, values in zip(axes, episode.actions.T):
            ax.plot(t, values, lw=1, alpha=0.8 if len(episodes) == 1 else 0.4)
    for ax, name in zip(axes, ACTION_NAMES):
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("time in episode [s]")
    fig.suptitle(f"actions of {target} ({len(episodes)} episode{'s' * (len(episodes) != 1)})")
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=100)
    plt.close(fig)
    print(f"plot: {args.out}")
    return 0
