"""`vla ensemble --out DIR CHECKPOINT CHECKPOINT ...`: one checkpoint directory holding copies of
trained checkpoints (vla.model.checkpoint.save_ensemble); every runtime, `vla eval` and the ROS node
run all of them and play the mean of their action chunks. Then `vla export --checkpoint DIR`.

    vla ensemble --out policies/checkpoints/default runs/all-tasks-cpu/final runs/all-tasks-cpu-dart/final
"""
from __future__ import annotations

import argparse

from vla.model.checkpoint import MAX_MEMBERS, save_ensemble


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoints", nargs="+", help=f"2-{MAX_MEMBERS} checkpoint directories taking the same "
                                                       "observations")
    parser.add_argument("--out", required=True, help="the ensemble's directory (replaced once complete)")


def run(args) -> int:
    out = save_ensemble(args.out, args.checkpoints)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {out}: {len(args.checkpoints)} members, {size / 1e6:.1f} MB")
    return 0
