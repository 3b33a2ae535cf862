"""A dataset directory: one rosbag2 directory per episode plus manifest.json listing finished ones.

Crash safety: an episode is written under .partial/ and renamed into place when complete; the
manifest is replaced atomically after that (at most once a second). So whatever moment a collection
dies, the manifest lists only complete bags; on the next collection, leftovers in .partial/ are discarded and a
complete bag missing from the manifest (death between rename and manifest update) is re-listed.
Readers use only what the manifest lists.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import time
from pathlib import Path

from vla.data.reader import EpisodeError, info_problem, read_episode
from vla.files import fsync_dir, write_text_atomic

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "vla-dataset/1"
PARTIAL = ".partial"
DAMAGED = ".damaged"  # unlisted bags that did not read, set aside by a collection's repair
LOCK = ".lock"
# The manifest is rewritten at most this often (and on close): rewriting it after every episode
# costs O(episodes^2) bytes over a long collection. Episodes finished since the last write are
# complete bags that the next collection lists again, so crash safety does not depend on it.
SAVE_INTERVAL_S = 1.0
_EPISODE_DIR = re.compile(r"episode_(\d{6,})$")


def episode_name(episode_id: int) -> str:
    return f"episode_{episode_id:06d}"


def partial_episode(root: str | Path, episode_id: int) -> Path:
    """Where episode `episode_id` is written until complete (absent: a bag writer creates it)."""
    path = Path(root) / PARTIAL / episode_name(episode_id)
    shutil.rmtree(path, ignore_errors=True)
    return path


def publish_episode(root: str | Path, episode_id: int) -> str:
    """Move the complete (fsynced) episode from its partial path into the dataset; -> its name."""
    name = episode_name(episode_id)
    os.rename(Path(root) / PARTIAL / name, Path(root) / name)
    fsync_dir(root)
    return name


def load_manifest(root: str | Path) -> list[dict]:
    """The finished episodes listed in root/manifest.json ([] when there is none yet), each entry
    checked (ValueError naming the entry and the problem)."""
    path = Path(root) / MANIFEST
    if not path.exists():
        return []
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ValueError(f"{path}: not a valid dataset manifest: {exc}") from None
    found = manifest.get("format") if isinstance(manifest, dict) else None
    if found != MANIFEST_FORMAT:
        raise ValueError(f"{path}: unknown manifest format {str(found)[:40]!r}, expected {MANIFEST_FORMAT!r}")
    episodes = manifest.get("episodes")
    if not isinstance(episodes, list):
        raise ValueError(f"{path}: not a valid dataset manifest: 'episodes' is not a list")
    for i, entry in enumerate(episodes):
        problem = _entry_problem(entry)
        if problem:
            raise ValueError(f"{path}: episode entry {i}: {problem}")
    for key in ("episode", "path"):
        values = [e[key] for e in episodes]
        if len(set(values)) < len(values):
            raise ValueError(f"{path}: an episode {key} is listed twice")
    return episodes


def _entry_problem(entry) -> str | None:
    """What is wrong with a manifest entry (episode metadata + episode, path, bytes), or None."""
    problem = info_problem(entry)
    if problem:
        return problem
    for key in ("episode", "bytes"):
        value = entry.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            return f"{key}={str(value)[:40]!r} is not a count"
    name = entry.get("path")
    if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name or len(name) > 255:
        return f"path={str(name)[:40]!r} is not the name of an episode directory in the dataset"
    return None


def require_dataset(root: str | Path) -> Path:
    root = Path(root)
    if not (root / MANIFEST).is_file():
        raise FileNotFoundError(f"{root} is not a dataset (no {MANIFEST}); record one with `vla collect`")
    return root


def _check_writable_dataset(root: Path) -> None:
    """Refuse to turn a directory holding other things into a dataset."""
    if root.exists() and not root.is_dir():
        raise ValueError(f"{root} exists and is not a directory")
    if root.is_dir() and not (root / MANIFEST).exists():
        foreign = [p.name for p in root.iterdir()
                   if p.name not in (PARTIAL, LOCK, DAMAGED) and not _EPISODE_DIR.match(p.name)]
        if foreign:
            raise ValueError(
                f"{root} is not empty and not a dataset (it holds {sorted(foreign)[:5]}); choose another --out"
            )


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


class DatasetWriter:
    """Exclusive writer of a dataset (a lock file held while open): adds finished episodes to the
    manifest and repairs what an interrupted collection left behind."""

    def __init__(self, root: str | Path, log=print):
        self.root, self.log = Path(root), log
        _check_writable_dataset(self.root)
        (self.root / PARTIAL).mkdir(parents=True, exist_ok=True)
        self._lock = open(self.root / LOCK, "w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise ValueError(f"{self.root} is being written by another process (`vla collect`?)") from None
        self._episodes = {e["episode"]: e for e in load_manifest(self.root)}
        self._saved_at, self._dirty = float("-inf"), False
        self.recover()

    @property
    def episodes(self) -> list[dict]:
        return [self._episodes[k] for k in sorted(self._episodes)]

    def add(self, info: dict) -> None:
        """List a finished episode (its bag already in place) in the manifest."""
        self._episodes[info["episode"]] = info
        self._dirty = True
        if time.monotonic() - self._saved_at >= SAVE_INTERVAL_S:
            self.save()

    def save(self) -> None:
        manifest = {"format": MANIFEST_FORMAT, "episodes": self.episodes}
        write_text_atomic(self.root / MANIFEST, json.dumps(manifest, indent=1))
        self._saved_at, self._dirty = time.monotonic(), False

    def recover(self) -> None:
        for leftover in sorted((self.root / PARTIAL).iterdir()):
            self.log(f"discarding unfinished episode {leftover} (left by an interrupted collection)")
            if leftover.is_dir():
                shutil.rmtree(leftover)
            else:
                leftover.unlink()
        listed = {e["path"] for e in self._episodes.values()}
        for path in sorted(self.root.iterdir()):
            match = _EPISODE_DIR.match(path.name)
            if not match or path.name in listed or not path.is_dir():
                continue
            try:
                info = read_episode(path).info
            except (EpisodeError, FileNotFoundError) as exc:  # kept aside: what was saved is never deleted
                aside = self.root / DAMAGED / f"{path.name}-{time.time_ns()}"
                self.log(f"moving {path} to {aside}: not in the manifest and unreadable ({exc})")
                aside.parent.mkdir(exist_ok=True)
                os.rename(path, aside)
                continue
            self.log(f"repaired: {path} was complete but not in the manifest; listed it")
            self.add(info | {"episode": int(match.group(1)), "path": path.name, "bytes": dir_bytes(path)})

    def close(self) -> None:
        if self._dirty:
            self.save()
        with contextlib.suppress(OSError):  # an episode still being written keeps it
            (self.root / PARTIAL).rmdir()
        self._lock.close()  # releases the lock

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
