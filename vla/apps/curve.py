"""`vla curve RUN_DIR ...`: the learning curve of a training run, closed-loop success per task
against the training step, from its metrics.jsonl (the training loop draws it at every evaluation;
this redraws it)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

FILE = "learning_curve.png"


def evaluations(metrics: Path) -> dict[str, list[tuple[int, float]]]:
    """task -> [(step, success rate)] from the evaluation records of metrics.jsonl."""
    curves: dict[str, list[tuple[int, float]]] = {}
    for line in metrics.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a crash
            continue
        for key, value in record.items():
            if key.startswith("success_"):
                curves.setdefault(key.removeprefix("success_"), []).append((record["step"], value))
    return curves


def draw(run_dir: str | Path, title: str | None = None) -> Path | None:
    """run_dir/learning_curve.png from run_dir/metrics.jsonl, titled `title` (default: the run
    directory's name); None while there is no evaluation."""
    run_dir = Path(run_dir)
    curves = evaluations(run_dir / "metrics.jsonl")
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for task, points in curves.items():
        steps, rates = zip(*sorted(points))
        ax.plot(steps, [100 * r for r in rates], marker="o", label=task)
    ax.set(xlabel="training step", ylabel="success on validation seeds [%]", ylim=(-3, 103),
           title=f"learning curve: {title or run_dir.name}")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(run_dir / FILE, dpi=100)
    plt.close(fig)
    return run_dir / FILE


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="a training run's out_dir")
    parser.add_argument("--title",
                        help="the plot's title after 'learning curve: ' (default: each run directory's name)")


def run(args) -> int:
    for path in args.run_dirs:
        if not (Path(path) / "metrics.jsonl").is_file():
            raise FileNotFoundError(f"{path}: no metrics.jsonl (not a training run's out_dir)")
        print(draw(path, args.title) or f"{path}: no evaluation in metrics.jsonl yet")
    return 0
