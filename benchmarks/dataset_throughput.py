"""Random access into the training index on one core: samples/s of `index[i]` and `index.batch()`,
the one-off cache build, and memory over epochs (it must not grow).

    python benchmarks/dataset_throughput.py [--dataset DIR] [--episodes 40] [--seconds 5] [--chunk 8]
Without --dataset, records `--episodes` expert pick episodes into a temporary directory first.
Target: >= 5,000 samples/s random access on one core.
"""
from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

from sim import SimConfig
from vla.apps.collect import collect, plan
from vla.data.dataset import DatasetWriter
from vla.data.index import EpisodeIndex


def pin_to_one_core() -> None:
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})


def record(root: Path, episodes: int) -> None:
    with DatasetWriter(root, log=lambda _: None) as dataset:
        collect(dataset, plan(dataset, ["pick"], episodes, "expert", SimConfig(), 0, False), workers=1)


def rate(function, seconds: float) -> float:
    """Samples per second of `function()` (which returns how many samples it read)."""
    samples, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        samples += function()
    return samples / (time.perf_counter() - start)


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", help="an existing dataset directory")
    parser.add_argument("--episodes", type=int, default=40)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--chunk", type=int, default=8)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()
    pin_to_one_core()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.dataset) if args.dataset else Path(tmp) / "pick"
        if not args.dataset:
            record(root, args.episodes)
        start = time.perf_counter()
        index = EpisodeIndex(root, chunk=args.chunk, progress=False)
        built = time.perf_counter() - start
        start = time.perf_counter()
        EpisodeIndex(root, chunk=args.chunk, progress=False)
        reopened = time.perf_counter() - start
        rng = np.random.default_rng(0)
        n = len(index)

        def single() -> int:
            for i in rng.integers(0, n, 256):
                index[int(i)]
            return 256

        def batched() -> int:
            index.batch(rng.integers(0, n, args.batch))
            return args.batch

        print(f"dataset {root}: {len(index.episodes)} episodes, {n} samples, chunk {args.chunk}, one core")
        print(
            f"cache build {built:.2f} s ({len(index.episodes) / built:.0f} episodes/s); reopen {1000 * reopened:.1f} ms"
        )
        print(f"random access index[i]:         {rate(single, args.seconds):>10,.0f} samples/s")
        print(f"random access batch({args.batch}):      {rate(batched, args.seconds):>10,.0f} samples/s")
        memory(index, args.batch, args.epochs)


def memory(index: EpisodeIndex, batch: int, epochs: int) -> None:
    """Python heap and resident memory after each shuffled epoch of batches."""
    tracemalloc.start()
    rng = np.random.default_rng(1)
    for epoch in range(epochs):
        order = rng.permutation(len(index))
        for k in range(0, len(order), batch):
            index.batch(order[k : k + batch])
        heap = tracemalloc.get_traced_memory()[0] / 1e6
        print(
            f"epoch {epoch + 1}: python heap {heap:.2f} MB, resident {rss_mb():.0f} MB "
            f"(peak {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6:.0f} MB)"
        )
    tracemalloc.stop()


if __name__ == "__main__":
    main()
