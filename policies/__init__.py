"""Policies behind one interface (reset(instruction), act(obs) -> action), plus training recipes
(configs/) and the checkpoints that ship with the repository (checkpoints/)."""
from pathlib import Path

from policies.base import Policy
from policies.simple import RandomPolicy, ReplayPolicy

CHECKPOINT_DIR = Path(__file__).parent / "checkpoints"

__all__ = ["CHECKPOINT_DIR", "Policy", "RandomPolicy", "ReplayPolicy", "load_policy"]


def load_policy(spec: str, env=None, seed: int = 0, **kwargs) -> Policy:
    """'expert' (the scripted expert; needs the env), 'random', or a checkpoint directory (the VLA
    policy; `kwargs` go to VLAPolicy.from_checkpoint)."""
    if spec == "expert":
        if env is None:
            raise ValueError("the scripted expert needs the simulator env (it reads privileged state)")
        from sim.expert import ScriptedExpert

        return ScriptedExpert(env)
    if spec == "random":
        return RandomPolicy(seed)
    path = Path(spec)
    if not path.is_dir():
        raise ValueError(f"unknown policy {spec!r}: use 'expert', 'random' or a checkpoint directory")
    from policies.vla_policy import VLAPolicy  # imports torch

    return VLAPolicy.from_checkpoint(path, **kwargs)
