"""`vla train --config policies/configs/NAME.yaml [-o key=value ...] [--resume [STEP_DIR]]`: train a
VLA policy from a YAML recipe (recipe), on a dataset it records first if the recipe says so (data),
resumable exactly (state), in one process or under torchrun (loop). A recipe with `init` starts from
another run's weights (that recipe is trained first when its run has no final checkpoint) and may
record DAgger corrections with them first (`data.corrections`; with `data.corrections.policy`, a
checkpoint records them for a model trained from scratch). An ensemble recipe (a single `ensemble`
section) trains several runs of one recipe and bundles them into one checkpoint:

    torchrun --nproc_per_node N -m vla.apps.train --config policies/configs/full-gpu.yaml   (DDP)
"""
from __future__ import annotations

import argparse

from torch import distributed as dist

from vla.apps.train.loop import train, train_ensemble
from vla.apps.train.recipe import EnsembleRecipe, load_recipe


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML recipe, e.g. policies/configs/quickstart-cpu.yaml")
    parser.add_argument("--override", "-o", action="append", default=[], metavar="KEY=VALUE",
                        help="change a recipe value, e.g. optim.lr=3e-4 or model.chunk=4 (repeatable)")
    parser.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        metavar="CHECKPOINT",
        help="continue from a step checkpoint (default: the newest complete one in out_dir/checkpoints)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")


def run(args) -> int:
    recipe = load_recipe(args.config, args.override)
    if isinstance(recipe, EnsembleRecipe):
        if args.resume not in (None, "latest"):
            raise ValueError("--resume STEP_DIR names one run's checkpoint; an ensemble resumes each member itself")
        train_ensemble(recipe, progress=not args.no_progress)
    else:
        train(recipe, resume=args.resume, progress=not args.no_progress)
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0
