"""Recording throughput of `vla collect`: expert episodes/hour with K worker processes, and bytes
per episode, per task (sim + policy + CDR encoding + MCAP writing + crash-safe publishing).

    python benchmarks/collect_throughput.py [--tasks reach pick] [--workers 1 2] [--episodes 40]
K=2 includes the start of the spawned workers (~1-2 s), as a real run does.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from sim import SimConfig
from vla.apps.collect import collect, plan
from vla.data.dataset import DatasetWriter


def measure(task: str, workers: int, episodes: int, image_size: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        start = time.perf_counter()
        with DatasetWriter(root) as dataset:
            jobs = plan(dataset, [task], episodes, "expert", SimConfig(image_size=image_size), 0, False)
            infos = collect(dataset, jobs, workers)
        elapsed = time.perf_counter() - start
        manifest = json.loads((root / "manifest.json").read_text())["episodes"]
    assert len(manifest) == episodes
    return {"episodes/hour": 3600 * episodes / elapsed, "bytes/episode": np.mean([i["bytes"] for i in infos]),
            "steps": np.mean([i["steps"] for i in infos]), "success": np.mean([i["success"] for i in infos])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["reach", "pick"])
    parser.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--episodes", type=int, default=40)
    parser.add_argument("--image-size", type=int, default=96)
    args = parser.parse_args()
    table = Table(
        title=f"vla collect, expert, {args.episodes} episodes per run, {args.image_size}x{args.image_size} camera"
    )
    for column in ("task", "workers", "episodes/hour", "steps/episode", "bytes/episode", "bytes/step", "success"):
        table.add_column(column, justify="right")
    for task in args.tasks:
        for workers in args.workers:
            r = measure(task, workers, args.episodes, args.image_size)
            per_episode = r["bytes/episode"]
            table.add_row(
                task,
                str(workers),
                f"{r['episodes/hour']:,.0f}",
                f"{r['steps']:.1f}",
                f"{per_episode:,.0f}",
                f"{per_episode / r['steps']:,.0f}",
                f"{100 * r['success']:.0f} %",
            )
    Console(width=120).print(table)


if __name__ == "__main__":
    main()
