"""`vla collect`: run a policy in sim and record each episode as a rosbag2 (MCAP) directory.

    vla collect --task pick --episodes 100 --out datasets/pick --workers 2

Episode i of a dataset uses seed `--seed` + i. Rerunning the same command after an interruption
records only the missing episodes; `--append` adds `--episodes` new ones after the last.
Workers (spawned processes) each write whole episodes; this process owns the manifest.

DAgger-style corrections: `--policy CHECKPOINT --expert-takeover N` lets the checkpoint drive each
episode for a random 0..N steps (drawn from the episode's seed) before the scripted expert takes
over; training reads only the expert's steps (episode metadata `expert_from`).
Retries: `--missed-grasps SHARE` has the expert close the first grasp of that share of pick and place
episodes 3-4 cm beside the cube, then notice and try again; training reads them from the miss on.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import multiprocessing as mp
import os
import shutil
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from policies import load_policy
from policies.takeover import ExpertTakeover
from sim import SimConfig, make_env
from sim.env import stream
from sim.expert import ScriptedExpert
from vla.apps.rollout import add_randomize_argument, parse_tasks, randomize_settings
from vla.data.dataset import DatasetWriter, dir_bytes, partial_episode, publish_episode
from vla.data.record import record_episode, versions


@dataclass(frozen=True)
class Job:
    root: str
    episode: int
    task: str
    seed: int
    policy: str
    sim_config: dict
    versions: dict
    expert_from: int | None = None  # the step the scripted expert takes over from the policy
    miss: float = 0.0  # m beside the cube where the expert's first grasp closes (0: no miss)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", default="all", help="comma-separated tasks or 'all'")
    parser.add_argument("--episodes", type=int, default=10, help="episodes per task")
    parser.add_argument("--out", required=True, help="dataset directory (created)")
    parser.add_argument("--workers", type=int, default=1, help="worker processes")
    parser.add_argument("--policy", default="expert", help="expert | random | a checkpoint directory")
    parser.add_argument("--seed", type=int, default=0, help="seed of episode 0 (episode i uses seed + i)")
    parser.add_argument("--append", action="store_true", help="add --episodes new episodes to an existing dataset")
    parser.add_argument("--image-size", type=int, default=SimConfig.image_size)
    parser.add_argument("--wrist-camera", action="store_true")
    parser.add_argument("--max-steps", type=int, default=0, help="episode step limit (0: the task's own)")
    parser.add_argument("--expert-takeover", type=int, metavar="N",
                        help="with a checkpoint --policy: the scripted expert takes over after a random 0..N "
                             "steps; only its steps are trained on (DAgger-style corrections)")
    parser.add_argument("--missed-grasps", type=float, default=0.0, metavar="SHARE",
                        help="share of pick and place episodes whose first grasp the expert closes beside "
                             "the cube, then retries; they are trained on from the miss on")
    parser.add_argument("--push-tolerance", type=float, default=SimConfig.push_tolerance, metavar="METRES",
                        help="a push's success radius around its goal: with less the expert pushes on into "
                             "the ring before the episode ends (evaluation keeps the default)")
    add_randomize_argument(parser)


def run(args) -> int:
    if args.episodes <= 0 or args.workers <= 0:
        raise ValueError("--episodes and --workers must be positive")
    config = SimConfig(image_size=args.image_size, wrist_camera=args.wrist_camera, max_steps=args.max_steps,
                       push_tolerance=args.push_tolerance, **randomize_settings(args))
    start = time.perf_counter()
    infos = record_dataset(args.out, parse_tasks(args.task), args.episodes, args.policy, config, args.seed, args.append,
                           args.workers, expert_takeover=args.expert_takeover, missed_grasps=args.missed_grasps)
    if infos:
        elapsed = time.perf_counter() - start
        rate = sum(i["success"] for i in infos) / len(infos)
        size = sum(i["bytes"] for i in infos) / len(infos)
        print(f"recorded {len(infos)} episodes in {elapsed:.1f} s ({3600 * len(infos) / elapsed:.0f} episodes/hour), "
              f"success {100 * rate:.1f} %, {size / 1e6:.2f} MB/episode -> {args.out}")
    return 0


def record_dataset(out: str | Path, tasks: list[str], episodes: int, policy: str, config: SimConfig | dict,
                   seed: int = 0, append: bool = False, workers: int = 1, log=print,
                   expert_takeover: int | dict | None = None, missed_grasps: float = 0.0) -> list[dict]:
    """Record `episodes` per task into the dataset `out` (created), or what an interrupted recording
    left missing of them (with `append`: that many more). -> the new episodes' metadata.
    `config` is the SimConfig of every episode, or a task -> SimConfig mapping.
    With `expert_takeover` N (or a task -> N mapping), the checkpoint `policy` drives 0..N steps, then
    the scripted expert. With `missed_grasps`, that share of pick and place episodes starts with a
    missed grasp."""
    if policy not in ("expert", "random") and not Path(policy).is_dir():
        raise ValueError(f"unknown policy {policy!r}: use 'expert', 'random' or a checkpoint directory")
    takeovers = expert_takeover.values() if isinstance(expert_takeover, dict) else [expert_takeover]
    if expert_takeover is not None and (policy in ("expert", "random") or min(takeovers) < 0):
        raise ValueError("--expert-takeover needs a checkpoint --policy and a number of steps >= 0, "
                         f"got {policy!r} and {expert_takeover}")
    if missed_grasps and (policy != "expert" or not 0 < missed_grasps <= 1):
        raise ValueError(f"--missed-grasps needs --policy expert and a share in (0, 1], "
                         f"got {policy!r} and {missed_grasps}")
    with DatasetWriter(out, log=log) as dataset:
        jobs = plan(dataset, tasks, episodes, policy, config, seed, append, expert_takeover, missed_grasps)
        done = len(dataset.episodes)
        if not jobs:
            log(f"{out}: all {done} episodes already recorded" + ("" if append else " (use --append to add more)"))
            return []
        if done and not append:
            log(f"{out}: resuming, {len(jobs)} episode(s) left to record")
        return collect(dataset, jobs, workers)


def _as_stored(config: SimConfig) -> dict:
    """`config` as an episode's metadata holds it (JSON: lists, not tuples)."""
    return json.loads(json.dumps(asdict(config)))


def _with_defaults(sim_config):
    """A recorded sim_config as stored now: settings added since it was recorded at their defaults
    (which is what it ran with)."""
    try:
        return _as_stored(SimConfig.from_dict(sim_config))
    except (TypeError, ValueError):
        return sim_config  # not a valid SimConfig: it differs from ours


def plan(dataset: DatasetWriter, tasks: list[str], episodes: int, policy: str, config: SimConfig | dict, seed: int,
         append: bool, expert_takeover: int | dict | None = None, missed_grasps: float = 0.0) -> list[Job]:
    """The episodes still to record: ids 0.. (or after the last with append), `episodes` per task."""
    done = {e["episode"]: e for e in dataset.episodes}
    first = max(done, default=-1) + 1 if append else 0
    stored = {task: _as_stored(config[task] if isinstance(config, dict) else config) for task in tasks}
    found = versions()
    jobs = []
    for i in range(len(tasks) * episodes):
        episode, task = first + i, tasks[i // episodes]
        most = expert_takeover[task] if isinstance(expert_takeover, dict) else expert_takeover
        expert_from = None if most is None else _takeover_step(seed + episode, most)
        miss = _miss_distance(seed + episode, missed_grasps) if task in ("pick", "place") else 0.0
        sim_config = stored[task]
        if episode in done:
            _check_same_collection(dataset.root, done[episode], task, policy, sim_config, seed + episode, expert_from,
                                   miss)
            continue
        jobs.append(Job(str(dataset.root), episode, task, seed + episode, policy, sim_config, found, expert_from, miss))
    return jobs


def _takeover_step(seed: int, most: int) -> int:
    return int(stream(seed, "takeover").integers(most + 1))


def _miss_distance(seed: int, share: float) -> float:
    """3-4 cm for `share` of the episodes, else 0 (3 cm beside the cube the fingers close on nothing,
    where 2 cm still grasp it)."""
    rng = stream(seed, "miss")
    return float(rng.uniform(0.03, 0.04)) if rng.random() < share else 0.0


def _check_same_collection(root: Path, recorded: dict, task: str, policy: str, sim_config: dict, seed: int,
                           expert_from: int | None, miss: float) -> None:
    ours = {"task": task, "policy": policy, "seed": seed, "sim_config": sim_config, "miss": miss or None}
    if not miss:  # a miss's expert_from is where it happened, not planned
        ours["expert_from"] = expert_from
    recorded = recorded | {"sim_config": _with_defaults(recorded.get("sim_config"))}
    differ = [key for key in ours if recorded.get(key) != ours[key]]
    if differ:
        raise ValueError(f"{root} already holds {recorded['path']} recorded with another {', '.join(differ)} "
                         f"({', '.join(f'{k}={recorded.get(k)!r}' for k in differ if k != 'sim_config')}); "
                         "pass --append to add episodes after it, or choose another --out")


def collect(dataset: DatasetWriter, jobs: list[Job], workers: int) -> list[dict]:
    """Record `jobs`, adding each episode to the manifest as soon as it is complete."""
    infos = []
    bar = tqdm(total=len(jobs), desc="collect", unit="episode")
    with _recorded(jobs, workers) as finished:
        for info in finished:
            dataset.add(info)
            infos.append(info)
            bar.update(1)
            bar.set_postfix(success=f"{100 * sum(i['success'] for i in infos) / len(infos):.0f}%")
    bar.close()
    return infos


@contextmanager
def _recorded(jobs: list[Job], workers: int):
    """The metadata of finished episodes as they complete: recorded in this process for one worker,
    else by a pool of spawned processes (PyBullet does not survive fork reliably)."""
    if min(workers, len(jobs)) == 1:
        try:
            yield map(record_job, jobs)
        finally:
            _close_envs()
        return
    pool = mp.get_context("spawn").Pool(min(workers, len(jobs)), initializer=_init_worker, initargs=(os.getpid(),))
    try:
        yield pool.imap_unordered(record_job, jobs)
    finally:
        pool.terminate()
        pool.join()


def _init_worker(parent: int) -> None:
    """Die with the parent: orphans would keep writing into a dataset nobody owns any more."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        os._exit(1)


_ENVS: dict[tuple, tuple] = {}  # per process: (task, config) -> (env, policy), reused across episodes


def _env_and_policy(job: Job):
    key = (job.task, tuple(sorted((k, str(v)) for k, v in job.sim_config.items())))
    if key not in _ENVS:
        env = make_env(job.task, SimConfig.from_dict(job.sim_config))
        _ENVS[key] = (env, None if job.policy in ("expert", "random") else load_policy(job.policy, env))
    env, policy = _ENVS[key]
    # Cheap policies are rebuilt per episode so that the random one is seeded by the episode.
    return env, policy or load_policy(job.policy, env, seed=job.seed)


def _close_envs() -> None:
    for env, _ in _ENVS.values():
        env.close()
    _ENVS.clear()


def record_job(job: Job) -> dict:
    """Record one episode under .partial/ and move it into the dataset once complete."""
    env, policy = _env_and_policy(job)
    extra = {"episode": job.episode, "policy": job.policy, "versions": job.versions}
    if job.expert_from is not None:
        policy = ExpertTakeover(policy, load_policy("expert", env), job.expert_from)
    if job.miss:
        policy, extra["miss"] = ScriptedExpert(env, job.miss), job.miss
    partial = partial_episode(job.root, job.episode)
    try:
        info = record_episode(env, policy, job.seed, partial, extra)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    name = publish_episode(job.root, job.episode)
    return info | {"path": name, "bytes": dir_bytes(Path(job.root) / name)}
