"""Training view of a dataset: one sample per recorded step (observation at t, actions t..t+k-1).

The bags are parsed once into a cache of flat arrays under dataset_dir/.cache/<key>/ (raw binary
files opened with np.memmap, plus meta.json), so that reading a sample is a few array slices.
The key hashes the manifest and the size and mtime of every bag file, so changed bags rebuild it.
Corrupt episodes are reported (CorruptEpisodeWarning naming the file and problem) and skipped.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
from tqdm import tqdm

from vla.contracts.action import ACTION_DIM
from vla.contracts.observation import IMU_CHANNELS, IMU_WINDOW, STATE_DIM
from vla.data.dataset import MANIFEST, load_manifest, require_dataset
from vla.data.reader import EpisodeError, read_episode
from vla.files import atomic_directory, write_text_atomic

CACHE_FORMAT = 2  # bump when the cache layout or its content changes (2: actions paired by their twist)
CACHE = ".cache"
STATS_FILE = "stats.json"
QUANTILES = (0.01, 0.99)
STATS_SAMPLES = 4096  # random samples for the state and IMU mean/std


class CorruptEpisodeWarning(UserWarning):
    pass


class EpisodeIndex:
    """`index[i]` -> dict(image, [wrist_image], state, imu, instruction, actions [chunk, 7],
    action_mask [chunk], task, episode, step); `index.batch(indices)` stacks them."""

    def __init__(self, dataset_dir: str | Path, image_size: int = 96, chunk: int = 1, tasks=None,
                 successful_only: bool = True, imu_window: int | None = None, progress: bool = True):
        if chunk < 1 or image_size < 1:
            raise ValueError(f"chunk and image_size must be positive, got {chunk} and {image_size}")
        self.root = require_dataset(dataset_dir)
        self.image_size, self.chunk = image_size, chunk
        manifest = load_manifest(self.root)
        self.imu_window = imu_window or max(
            (int(e.get("imu_window", IMU_WINDOW)) for e in manifest), default=IMU_WINDOW
        )
        self.cache_dir = _cached(self.root, manifest, image_size, self.imu_window, progress)
        self._open()
        tasks = [tasks] if isinstance(tasks, str) else tasks
        self.selection = {"successful_only": successful_only, "tasks": sorted(tasks) if tasks else None}
        self.episodes = [
            e
            for e in self._meta["episodes"]
            if (e["success"] or not successful_only) and (not tasks or e["task"] in tasks)
        ]
        if not self.episodes:
            raise ValueError(
                f"{self.root}: no episodes match {self.selection} "
                f"({len(self._meta['episodes'])} usable episodes in the dataset)"
            )
        self._rows = np.concatenate([np.arange(e["start"], e["start"] + e["length"]) for e in self.episodes])
        self._stats: dict | None = None

    # ---- samples -----------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, i: int) -> dict:
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample {i} out of range for {len(self)} samples")
        row = int(self._rows[i])
        span = np.arange(row, row + self.chunk)
        end = self._end[row]
        episode = self._meta["episodes"][self._episode_of[row]]
        sample = {
            "image": np.array(self._arrays["images"][row]),
            "state": np.array(self._arrays["states"][row]),
            "imu": np.array(self._arrays["imu"][row]),
            "instruction": self._meta["instructions"][self._arrays["instruction"][row]],
            "actions": self._arrays["actions"][np.minimum(span, end - 1)],
            "action_mask": span < end,
            "task": episode["task"],
            "episode": int(episode["episode"]),
            "step": int(self._arrays["step"][row]),
        }
        if "wrist_images" in self._arrays:
            sample["wrist_image"] = np.array(self._arrays["wrist_images"][row])
        return sample

    def batch(self, indices) -> dict:
        """The samples at `indices`, stacked: arrays with a leading batch axis, lists for strings."""
        rows = self._rows[np.asarray(indices, dtype=np.int64)]
        span = rows[:, None] + np.arange(self.chunk)[None, :]
        end = self._end[rows][:, None]
        episodes = [self._meta["episodes"][e] for e in self._episode_of[rows]]
        out = {
            "image": self._arrays["images"][rows],
            "state": self._arrays["states"][rows],
            "imu": self._arrays["imu"][rows],
            "instruction": [self._meta["instructions"][k] for k in self._arrays["instruction"][rows]],
            "actions": self._arrays["actions"][np.minimum(span, end - 1)],
            "action_mask": span < end,
            "task": [e["task"] for e in episodes],
            "episode": np.array([e["episode"] for e in episodes], dtype=np.int64),
            "step": self._arrays["step"][rows].astype(np.int64),
        }
        if "wrist_images" in self._arrays:
            out["wrist_image"] = self._arrays["wrist_images"][rows]
        return out

    # ---- cache -----------------------------------------------------------------------------------
    def _open(self) -> None:
        self._meta = json.loads((self.cache_dir / "meta.json").read_text())
        for skipped in self._meta["skipped"]:
            warnings.warn(f"skipping corrupt episode {skipped}", CorruptEpisodeWarning, stacklevel=3)
        rows = self._meta["rows"]
        if rows == 0:
            raise ValueError(f"{self.root}: no usable episodes")
        self._arrays = {  # plain ndarray views of the maps: cheaper to slice than np.memmap objects
            name: np.asarray(np.memmap(self.cache_dir / f"{name}.bin", dtype=dtype, mode="r", shape=(rows, *shape)))
            for name, (dtype, shape) in self._meta["arrays"].items()
        }
        lengths = [e["length"] for e in self._meta["episodes"]]
        self._episode_of = np.repeat(np.arange(len(lengths)), lengths)
        self._end = np.repeat([e["start"] + e["length"] for e in self._meta["episodes"]], lengths)

    # ---- statistics -------------------------------------------------------------------------------
    @property
    def stats(self) -> dict:
        """The normalisation statistics of the selected samples (what a checkpoint stores): action
        quantiles q01/q99 (the action bins) with mean, std, min, max and count, and the per-channel
        mean/std of state and IMU over a fixed random subset. Computed once per selection and
        stored in the dataset's stats.json."""
        if self._stats is None:
            self._stats = self._stored_stats()
        return self._stats

    def _stored_stats(self) -> dict:
        path = self.root / STATS_FILE
        tag = {"selection": self.selection, "cache": self.cache_dir.name}
        try:
            stored = json.loads(path.read_text())
            if {k: stored.get(k) for k in tag} == tag:
                return {k: stored[k] for k in ("action", "state", "imu")}
        except (OSError, json.JSONDecodeError, KeyError, TypeError):
            pass
        stats = compute_stats(self)
        try:
            write_text_atomic(path, json.dumps(tag | stats, indent=1))
        except OSError as exc:
            warnings.warn(f"could not store the statistics in {path}: {exc}", stacklevel=3)
        return stats


def compute_stats(index: EpisodeIndex, samples: int = STATS_SAMPLES, seed: int = 0) -> dict:
    """EpisodeIndex.stats, computed."""
    actions = np.asarray(index._arrays["actions"][index._rows], dtype=np.float64)
    q01, q99 = np.quantile(actions, QUANTILES, axis=0)
    action = {
        "q01": q01,
        "q99": q99,
        "mean": actions.mean(0),
        "std": actions.std(0),
        "min": actions.min(0),
        "max": actions.max(0),
    }
    chosen = np.sort(np.random.default_rng(seed).choice(len(index), size=min(samples, len(index)), replace=False))
    rows = index._rows[chosen]
    states = np.asarray(index._arrays["states"][rows], dtype=np.float64)
    imu = np.asarray(index._arrays["imu"][rows], dtype=np.float64).reshape(-1, IMU_CHANNELS)

    def floats(values: np.ndarray) -> list[float]:
        return values.astype(np.float32).tolist()

    return {
        "action": {k: floats(v) for k, v in action.items()} | {"count": len(actions)},
        "state": {"mean": floats(states.mean(0)), "std": floats(states.std(0))},
        "imu": {"mean": floats(imu.mean(0)), "std": floats(imu.std(0))},
    }


# ---- building the cache -------------------------------------------------------------------------
def _cached(root: Path, manifest: list[dict], image_size: int, imu_window: int, progress: bool) -> Path:
    """The cache directory for these bags and settings, built first if needed."""
    prefix = f"s{image_size}-w{imu_window}-"
    cache_dir = root / CACHE / (prefix + _fingerprint(root, manifest, image_size, imu_window))
    if (cache_dir / "meta.json").is_file():
        return cache_dir
    _remove_abandoned(root / CACHE)
    # a cache directory is complete or absent; if another process built it first, its copy wins
    with atomic_directory(
        cache_dir, staging=root / CACHE / f".tmp-{cache_dir.name}-{os.getpid()}", replace=False
    ) as tmp:
        _build(root, manifest, tmp, image_size, imu_window, progress)
    for stale in (root / CACHE).glob(prefix + "*"):  # caches of older versions of the bags
        if stale != cache_dir:
            shutil.rmtree(stale, ignore_errors=True)
    return cache_dir


def _fingerprint(root: Path, manifest: list[dict], image_size: int, imu_window: int) -> str:
    digest = hashlib.sha1(json.dumps([CACHE_FORMAT, image_size, imu_window]).encode())
    stat = (root / MANIFEST).stat()
    digest.update(f"{stat.st_size}:{stat.st_mtime_ns};".encode())
    for episode in manifest:
        folder = root / episode["path"]
        files = sorted(folder.iterdir()) if folder.is_dir() else []
        digest.update(episode["path"].encode())
        for f in files:
            s = f.stat()
            digest.update(f"|{f.name}:{s.st_size}:{s.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def _remove_abandoned(cache_root: Path) -> None:
    """Remove temporary directories of builds whose process died."""
    for tmp in cache_root.glob(".tmp-*"):
        try:
            os.kill(int(tmp.name.rsplit("-", 1)[1]), 0)
        except (ValueError, ProcessLookupError):
            shutil.rmtree(tmp, ignore_errors=True)
        except PermissionError:  # alive, someone else's
            pass


def _build(root: Path, manifest: list[dict], out: Path, image_size: int, imu_window: int, progress: bool) -> None:
    wrist = bool(manifest) and all(e.get("wrist_camera") for e in manifest)
    arrays = {
        "images": ("uint8", [image_size, image_size, 3]),
        "states": ("float32", [STATE_DIM]),
        "imu": ("float32", [imu_window, IMU_CHANNELS]),
        "actions": ("float32", [ACTION_DIM]),
        "step": ("int32", []),
        "instruction": ("int32", []),
    }
    if wrist:
        arrays["wrist_images"] = ("uint8", [image_size, image_size, 3])
    files = {name: open(out / f"{name}.bin", "wb") for name in arrays}
    episodes, skipped, instructions, rows = [], [], {}, 0
    try:
        for entry in tqdm(manifest, desc=f"indexing {root.name}", unit="episode", disable=not progress):
            try:
                steps = _episode_steps(root / entry["path"], image_size, imu_window, wrist)
            except (EpisodeError, FileNotFoundError) as exc:  # reported each time the cache is opened
                skipped.append(str(exc))
                continue
            length = len(steps["actions"])
            steps["step"] = np.arange(length)
            steps["instruction"] = [instructions.setdefault(text, len(instructions)) for text in steps["instructions"]]
            for name, (dtype, _) in arrays.items():
                files[name].write(np.ascontiguousarray(steps[name], dtype=dtype).tobytes())
            episodes.append(entry | {"start": rows, "length": length})
            rows += length
    finally:
        for f in files.values():
            f.close()
    meta = {
        "format": CACHE_FORMAT,
        "rows": rows,
        "arrays": arrays,
        "episodes": episodes,
        "instructions": list(instructions),
        "skipped": skipped,
    }
    (out / "meta.json").write_text(json.dumps(meta))


def _episode_steps(path: Path, image_size: int, imu_window: int, wrist: bool) -> dict:
    steps = read_episode(path).steps(image_size, imu_window)
    if wrist and steps["wrist_images"] is None:
        raise EpisodeError(path, "no wrist camera images although the dataset has a wrist camera")
    return steps
