"""PyBullet + Gymnasium simulator: a Franka Panda on a table with language-conditioned tasks.

No torch and no ROS here. `gymnasium.make("vla/Pick-v0")` or `make_env("pick")`.
"""
import gymnasium as gym

from sim.config import SimConfig
from sim.env import TabletopEnv
from sim.tasks import TASKS

ENV_IDS = {name: f"vla/{name.capitalize()}-v0" for name in TASKS}
for _name, _id in ENV_IDS.items():
    if _id not in gym.registry:
        gym.register(_id, entry_point="sim.env:TabletopEnv", kwargs={"task": _name}, disable_env_checker=True)


def make_env(task: str, config: SimConfig | None = None, **kwargs) -> TabletopEnv:
    return TabletopEnv(task, config, **kwargs)


__all__ = ["ENV_IDS", "TASKS", "SimConfig", "TabletopEnv", "make_env"]
