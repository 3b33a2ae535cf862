"""Training view of a dataset: one sample per recorded step (observation at t, actions t..t+k-1).

The bags are parsed once into a cache of flat arrays under dataset_dir/.cache/<key>/ (raw binary
files opened with np.memmap, plus meta.json), so that reading a sample is a few array slices.
The key hashes the manifest and the size and mtime of every bag file, so changed bags rebuild it.
Corrupt episodes (and manifest entries that differ from their bag) are reported
(CorruptEpisodeWarning naming the file and problem) and skipped. The cache is verified in full
each time it is opened (format, sizes, and a CRC of meta.json and every array: ~1 GB/s) and
rebuilt, with a warning, when damaged.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import warnings
import zlib
from pathlib import Path

import numpy as np
from tqdm import tqdm

from vla.contracts.action import ACTION_DIM
from vla.contracts.observation import IMU_CHANNELS, IMU_WINDOW, STATE_DIM
from vla.data.dataset import MANIFEST, dir_bytes, load_manifest, require_dataset
from vla.data.reader import EpisodeError, read_episode
from vla.files import atomic_directory, write_text_atomic

CACHE_FORMAT = 3  # bump when the cache layout or its content changes (2: actions paired by their twist, 3: CRC)
CACHE = ".cache"
STATS_FILE = "stats.json"
QUANTILES = (0.01, 0.99)
STATS_SAMPLES = 4096  # random samples for the state and IMU mean/std


class CorruptEpisodeWarning(UserWarning):
    pass


class EpisodeIndex:
    """One sample per recorded step (from `expert_from` on where the scripted expert took over from a
    checkpoint: the steps before it are the checkpoint's, not demonstrations).

    `index[i]` -> dict(image, [wrist_image], state, imu, instruction, actions [chunk, 7],
    action_mask [chunk], task, episode, step); `index.batch(indices)` stacks them."""

    def __init__(self, dataset_dir: str | Path, image_size: int = 96, chunk: int = 1, tasks=None,
                 successful_only: bool = True, imu_window: int | None = None, progress: bool = True):
        if chunk < 1 or image_size < 1:
            raise ValueError(f"chunk and image_size must be positive, got {chunk} and {image_size}")
        self.root = require_dataset(dataset_dir)
        self.image_size, self.chunk = image_size, chunk
        manifest = load_manifest(self.root)
        self.imu_window = imu_window or max((e.get("imu_window", IMU_WINDOW) for e in manifest), default=IMU_WINDOW)
        self.cache_dir, self._meta = _cached(self.root, manifest, image_size, self.imu_window, progress)
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
        self._rows = np.concatenate([np.arange(e["start"] + _first_trained(e), e["start"] + e["length"])
                                     for e in self.episodes])
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

    @property
    def sample_tasks(self) -> np.ndarray:
        """The task of each selected sample, in sample order."""
        tasks = np.array([e["task"] for e in self._meta["episodes"]])
        return tasks[self._episode_of[self._rows]]

    @property
    def instructions(self) -> list[str]:
        """The distinct instructions of the selected samples."""
        used = np.unique(self._arrays["instruction"][self._rows])
        return [self._meta["instructions"][k] for k in used]

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
        """Computed from the verified cache (stats.json is never read back: it is for people and other
        tools) and stored when it changed."""
        path = self.root / STATS_FILE
        stats = compute_stats(self)
        content = json.dumps({"selection": self.selection, "cache": self.cache_dir.name} | stats, indent=1)
        try:
            if not path.is_file() or path.read_text() != content:
                write_text_atomic(path, content)
        except (OSError, UnicodeDecodeError) as exc:
            warnings.warn(f"could not store the statistics in {path}: {exc}", stacklevel=3)
        return stats


class IndexUnion:
    """Several EpisodeIndex read as one for training (a dataset and its DAgger corrections): the
    first's samples, then the second's, ... A batch comes grouped by part, each in index order."""

    def __init__(self, parts: list[EpisodeIndex]):
        self.parts = parts
        self._offsets = np.cumsum([0] + [len(part) for part in parts])

    def __len__(self) -> int:
        return int(self._offsets[-1])

    @property
    def sample_tasks(self) -> np.ndarray:
        return np.concatenate([part.sample_tasks for part in self.parts])

    @property
    def stats(self) -> dict:
        """The first part's (the demonstrations'): a model trained from scratch on them and their
        corrections bins actions as one trained on the demonstrations alone."""
        return self.parts[0].stats

    @property
    def instructions(self) -> list[str]:
        return sorted({text for part in self.parts for text in part.instructions})

    def batch(self, indices) -> dict:
        indices = np.asarray(indices, dtype=np.int64)
        which = np.searchsorted(self._offsets, indices, side="right") - 1
        pieces = [part.batch(indices[which == k] - self._offsets[k])
                  for k, part in enumerate(self.parts) if np.any(which == k)]
        return {key: ([item for piece in pieces for item in piece[key]] if isinstance(pieces[0][key], list)
                      else np.concatenate([piece[key] for piece in pieces]))
                for key in pieces[0]}


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
def _cached(root: Path, manifest: list[dict], image_size: int, imu_window: int, progress: bool) -> tuple[Path, dict]:
    """The cache directory for these bags and settings and its meta.json, verified; built first if
    absent, rebuilt (with a warning) if damaged."""
    prefix = f"s{image_size}-w{imu_window}-"
    cache_dir = root / CACHE / (prefix + _fingerprint(root, manifest, image_size, imu_window))
    arrays = _array_specs(manifest, image_size, imu_window)
    meta, problem = _verified(cache_dir, arrays)
    if meta is not None:
        return cache_dir, meta
    if cache_dir.exists():
        warnings.warn(f"{cache_dir}: damaged training cache ({problem}); rebuilding it", stacklevel=3)
        _discard(cache_dir)
    _remove_abandoned(root / CACHE)
    # a cache directory is complete or absent; if another process built it first, its copy wins
    with atomic_directory(
        cache_dir, staging=root / CACHE / f".tmp-{cache_dir.name}-{os.getpid()}", replace=False
    ) as tmp:
        _build(root, manifest, tmp, arrays, image_size, imu_window, progress)
    for stale in (root / CACHE).glob(prefix + "*"):  # caches of older versions of the bags
        if stale != cache_dir:
            shutil.rmtree(stale, ignore_errors=True)
    meta, problem = _verified(cache_dir, arrays)
    if meta is None:
        raise ValueError(f"{cache_dir}: the training cache just built is unusable ({problem})")
    return cache_dir, meta


def _array_specs(manifest: list[dict], image_size: int, imu_window: int) -> dict[str, list]:
    """name -> [dtype, shape of one row] of the cache's arrays (lists, as they read back from JSON)."""
    arrays = {
        "images": ["uint8", [image_size, image_size, 3]],
        "states": ["float32", [STATE_DIM]],
        "imu": ["float32", [imu_window, IMU_CHANNELS]],
        "actions": ["float32", [ACTION_DIM]],
        "step": ["int32", []],
        "instruction": ["int32", []],
    }
    if manifest and all(e.get("wrist_camera") for e in manifest):
        arrays["wrist_images"] = ["uint8", [image_size, image_size, 3]]
    return arrays


def _verified(cache_dir: Path, arrays: dict) -> tuple[dict | None, str]:
    """(meta.json's content, "") for an intact cache of `arrays`, else (None, what is wrong)."""
    try:
        meta = json.loads((cache_dir / "meta.json").read_text())
    except FileNotFoundError:
        return None, "no meta.json"
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        return None, f"meta.json unreadable: {str(exc)[:100]}"
    if not isinstance(meta, dict) or meta.get("format") != CACHE_FORMAT or meta.get("arrays") != arrays:
        return None, "meta.json of another format"
    rows = meta.get("rows")
    for name, (dtype, shape) in arrays.items():
        file = cache_dir / f"{name}.bin"
        size = file.stat().st_size if file.is_file() else None
        if not isinstance(rows, int) or size != rows * np.dtype(dtype).itemsize * math.prod(shape):
            return None, f"{file.name} has {size} bytes for {rows} rows"
    if meta.get("checksum") != _checksum(cache_dir, meta):
        return None, "its content does not match its checksum"
    return meta, ""


def _checksum(cache_dir: Path, meta: dict) -> str:
    """CRC-32 of meta.json's content (but the checksum) and of every array file."""
    crc = zlib.crc32(json.dumps({k: v for k, v in meta.items() if k != "checksum"}, sort_keys=True).encode())
    for name in meta["arrays"]:
        with open(cache_dir / f"{name}.bin", "rb") as f:
            while block := f.read(1 << 24):
                crc = zlib.crc32(block, crc)
    return f"{crc:08x}"


def _discard(cache_dir: Path) -> None:
    """Move a damaged cache out of the way (readers that have it open keep their maps) and delete it."""
    trash = cache_dir.with_name(f".tmp-damaged-{cache_dir.name}-{os.getpid()}")
    try:
        os.rename(cache_dir, trash)
    except FileNotFoundError:  # another process did it
        return
    shutil.rmtree(trash, ignore_errors=True)


def _first_trained(episode: dict) -> int:
    """The first step trained on: where the scripted expert took over (vla collect --expert-takeover),
    as the steps before it are a learned policy's."""
    return min(episode.get("expert_from") or 0, episode["length"])


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


def _build(root: Path, manifest: list[dict], out: Path, arrays: dict, image_size: int, imu_window: int,
           progress: bool) -> None:
    files = {name: open(out / f"{name}.bin", "wb") for name in arrays}
    episodes, skipped, instructions, rows = [], [], {}, 0
    try:
        for entry in tqdm(manifest, desc=f"indexing {root.name}", unit="episode", disable=not progress):
            try:
                steps = _episode_steps(root / entry["path"], entry, image_size, imu_window, "wrist_images" in arrays)
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
    (out / "meta.json").write_text(json.dumps(meta | {"checksum": _checksum(out, meta)}))


def _episode_steps(path: Path, entry: dict, image_size: int, imu_window: int, wrist: bool) -> dict:
    episode = read_episode(path)
    differ = sorted(key for key, value in episode.info.items() if entry.get(key) != value)
    if differ or entry["bytes"] != dir_bytes(path):  # the bag's metadata is CRC-protected, the manifest is not
        raise EpisodeError(path, f"the manifest's entry differs from the bag in {differ[:3] or 'its size'}")
    expert_from = episode.info.get("expert_from", 0)
    if type(expert_from) is not int or expert_from < 0:
        raise EpisodeError(path, f"expert_from must be a step number >= 0, got {expert_from!r}")
    steps = episode.steps(image_size, imu_window)
    if wrist and steps["wrist_images"] is None:
        raise EpisodeError(path, "no wrist camera images although the dataset has a wrist camera")
    return steps
