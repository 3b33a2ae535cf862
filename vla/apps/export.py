"""`vla export --checkpoint DIR [--onnx OUT.onnx]`: write the checkpoint's parallel decoder as ONNX,
validated against PyTorch on observations from a dataset or from scripted-expert episodes in sim
(vla.runtime.export); an ensemble's members each into their own directory."""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from sim import SimConfig, make_env
from sim.expert import ScriptedExpert
from vla.contracts.observation import ObservationSpec
from vla.data.index import EpisodeIndex
from vla.model.checkpoint import ensemble_members, load_checkpoint, trained_tasks
from vla.runtime.export import export_onnx

VALIDATION_SEED = 2_000_000  # outside training (from 0) and evaluation (vla.apps.rollout.EVAL_SEED_OFFSET)


def sim_observations(spec: ObservationSpec, tasks: list[str], count: int, seed: int = VALIDATION_SEED) -> list[dict]:
    """Observations along scripted-expert episodes, a few steps into each."""
    observations = []
    for i in range(count):
        env = make_env(tasks[i % len(tasks)], SimConfig.for_spec(spec))
        expert = ScriptedExpert(env)
        obs, _ = env.reset(seed=seed + i)
        expert.reset(obs["instruction"])
        for _ in range(1 + i % 5):  # a few steps in, so the arm is somewhere else each time
            obs, *_ = env.step(expert.act(obs))
        observations.append(obs)
        env.close()
    return observations


def dataset_observations(dataset: str | Path, spec: ObservationSpec, count: int) -> list[dict]:
    index = EpisodeIndex(dataset, image_size=spec.image_size, imu_window=spec.imu_window, progress=False)
    picks = np.random.default_rng(0).choice(len(index), size=min(count, len(index)), replace=False)
    return [index[int(i)] for i in picks]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--onnx", help="output file (default: <checkpoint>/model.onnx, where the onnx runtime looks)")
    parser.add_argument("--data", help="a dataset directory to take validation observations from (default: sim)")
    parser.add_argument("--samples", type=int, default=32, help="validation observations")
    parser.add_argument("--atol", type=float, default=1e-3, help="logit tolerance")


def run(args) -> int:
    members = ensemble_members(args.checkpoint)
    if members and args.onnx:
        raise ValueError(f"{args.checkpoint} is an ensemble: each member's ONNX goes into its own directory, "
                         "drop --onnx")
    for checkpoint in members or [args.checkpoint]:
        export(checkpoint, args)
    return 0


def export(checkpoint: str | Path, args) -> None:
    out = Path(args.onnx or Path(checkpoint) / "model.onnx")
    model, processor = load_checkpoint(checkpoint, "cpu")
    spec = model.config.spec
    if args.data:
        observations = dataset_observations(args.data, spec, args.samples)
    else:
        observations = sim_observations(spec, trained_tasks(checkpoint), args.samples)
    report = export_onnx(model, processor, checkpoint, out, observations, args.atol)
    print(f"wrote {out} ({report['bytes'] / 1e6:.1f} MB); validated on {report['samples']} observations: "
          f"{report['bins_disagreeing']} bins disagree, max logit error {report['max_abs_logit_error']:.2e}")
