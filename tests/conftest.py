"""Shared fixtures: a fresh interpreter, tiny models (with their processors), and observations and
training batches for them."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vla.contracts.action import ACTION_HIGH, ACTION_LOW
from vla.model import ModelConfig, create
from vla.model.checkpoint import untrained_stats

ROOT = Path(__file__).resolve().parents[1]
# Tests spawn worker processes and nodes; one BLAS thread each keeps 2 cores from oversubscribing.
os.environ.setdefault("OMP_NUM_THREADS", "1")

STATS = untrained_stats()
TINY = dict(
    hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128, vision_width=32, max_text_tokens=8, chunk=2
)
INSTRUCTIONS = ["touch the red cube", "reach the blue ball", "move to the green cylinder", "touch the yellow ball"]
CORPUS = INSTRUCTIONS + [
    "pick up the green cube",
    "push the green cube to the left",
    "put the red cube in the blue bin",
]


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def run_python():
    """Run code in a fresh interpreter (a separate process) and return its stdout."""

    def run(code: str, timeout: float = 180) -> str:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        assert out.returncode == 0, f"subprocess failed:\n{out.stderr[-3000:]}"
        return out.stdout

    return run


def load_benchmark(name: str):
    """benchmarks/<name>.py as a module, so that a test runs a few of the cases it runs at scale."""
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def fuzz():
    """benchmarks/fuzz.py: the fuzz tests run a few hundred of its cases."""
    return load_benchmark("fuzz")


@pytest.fixture(scope="session")
def expert_robustness():
    """benchmarks/expert_robustness.py: the expert tests run its perturbed rollouts on a few seeds."""
    return load_benchmark("expert_robustness")


@pytest.fixture(scope="session")
def stats() -> dict:
    return STATS


@pytest.fixture(scope="session")
def tiny_model():
    """tiny_model(**config overrides) -> (VLAModel, Processor): a small random model, seeded."""

    def make(**overrides):
        torch.manual_seed(0)
        return create(ModelConfig(**{**TINY, **overrides}), STATS, CORPUS)

    return make


@pytest.fixture(scope="session")
def observations():
    """observations(n, seed, size, imu_window) -> n random observations (instructions cycling)."""

    def make(n: int, seed: int = 0, size: int = 96, imu_window: int = 12) -> list[dict]:
        rng = np.random.default_rng(seed)
        return [
            {
                "image": rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
                "state": rng.normal(size=15).astype(np.float32),
                "imu": rng.normal(size=(imu_window, 6)).astype(np.float32),
                "instruction": INSTRUCTIONS[i % len(INSTRUCTIONS)],
            }
            for i in range(n)
        ]

    return make


@pytest.fixture(scope="session")
def training_batch(observations):
    """training_batch(processor, n, seed) -> (VLAModel.forward's keyword arguments, the observations,
    the target actions float32[n, k, 7]) for random observations and actions."""

    def make(processor, n: int, seed: int = 0):
        c = processor.config
        obs = observations(n, seed, c.image_size, c.imu_window)
        rng = np.random.default_rng(seed + 1)
        actions = rng.uniform(ACTION_LOW, ACTION_HIGH, (n, c.chunk, 7)).astype(np.float32)
        samples = {key: np.stack([o[key] for o in obs]) for key in ("image", "state", "imu")}
        samples |= {
            "instruction": [o["instruction"] for o in obs],
            "actions": actions,
            "action_mask": np.ones((n, c.chunk), dtype=bool),
        }
        return processor.batch(samples), obs, actions

    return make


def simulate(env, seed: int):
    """What the simulator produces for an expert episode: observations 0..T, executed actions
    0..T-1, success."""
    from sim.expert import ScriptedExpert

    policy = ScriptedExpert(env)
    obs, _ = env.reset(seed=seed)
    policy.reset(obs["instruction"])
    observations, actions = [obs], []
    while True:
        obs, _, terminated, truncated, info = env.step(policy.act(obs))
        observations.append(obs)
        actions.append(info["action"])
        if terminated or truncated:
            return observations, actions, info["success"]


@pytest.fixture(scope="session")
def expert_dataset(tmp_path_factory):
    """3 expert reach episodes recorded by `vla collect` (seeds 0, 1, 2), and the simulator's own
    record of them: (dataset directory, [(observations, actions, success)] per episode)."""
    from sim import SimConfig, make_env
    from vla.cli import main as vla

    root = tmp_path_factory.mktemp("data") / "reach"
    assert vla(["collect", "--task", "reach", "--episodes", "3", "--out", str(root)]) == 0
    env = make_env("reach", SimConfig())
    reference = [simulate(env, seed) for seed in (0, 1, 2)]
    env.close()
    return root, reference
