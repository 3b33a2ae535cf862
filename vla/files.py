"""Crash-safe files and directories: whatever moment a process dies (SIGKILL, power loss after the
fsync), a reader sees the old content or the new, never a mix, and no half-written directory
appears under its final name."""
from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def fsync_dir(path: str | Path) -> None:
    """Make a directory's entries (new or renamed files) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """fsync every file under `path` and the directories holding them."""
    for folder, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(folder)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Replace the file at `path` with `text` atomically."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


@contextmanager
def staging_directory(path: str | Path) -> Iterator[Path]:
    """A fresh, empty directory at `path` (beside where its content goes: on the same filesystem,
    so that files move into place with an atomic os.replace), removed at the end whatever happens."""
    path = Path(path)
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextmanager
def atomic_directory(path: str | Path, staging: str | Path | None = None, replace: bool = True) -> Iterator[Path]:
    """Build a directory under a staging name (default `<path>.partial`) and move it to `path` only
    once the block completes (its files fsynced first). On an exception `path` is untouched.
    `replace`: an existing `path` is replaced (it stays intact until the new one is complete; a
    crash between the two renames leaves it as `<path>.old`); otherwise an existing `path` wins and
    the new content is discarded (another process built the same thing first)."""
    path = Path(path)
    with staging_directory(staging or path.with_name(path.name + ".partial")) as staged:
        yield staged
        fsync_tree(staged)
        if path.exists():
            if not replace:
                return
            old = path.with_name(path.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(staged, path)
            shutil.rmtree(old)
        else:
            os.replace(staged, path)
        fsync_dir(path.parent)
