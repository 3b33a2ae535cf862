"""Fault injection: damaged episodes, datasets (manifest, training cache, statistics), checkpoints
and malformed runtime inputs, each case classified by its outcome. Prints counts per outcome class.

    python benchmarks/fuzz.py [--cases 10000] [--seed 0] [--families episode,dataset,checkpoint,runtime]
                              [--no-crcs]   (episodes recorded as before the writer filled in MCAP CRCs)

Outcome classes:
  error       a clean error of the documented type (EpisodeError, ValueError, CheckpointError), one
              line, at most MAX_ERROR characters
  skip        the training index skipped the damaged episode with a CorruptEpisodeWarning
  same        accepted, and what came out is identical to the undamaged original (the damage hit
              bytes nobody reads)
  valid       accepted input that is legal (a runtime observation, a value in range): a finite
              result, actions inside the limits
  silent      accepted damaged or illegal input: a different result without an error
  nonfinite   accepted NaN/inf (or an action outside the limits)
  false-error a legal input refused
  long-error  a documented error, but longer than MAX_ERROR or on several lines
  crash:T     an exception of another type T (a traceback)
  hang        no answer within --timeout seconds
  died:S      the process died (signal S: a segfault, or killed for memory)

Each case runs in a forked child with a timeout and a memory limit. tests/data/test_fuzz.py and
tests/model/test_fuzz.py run a few hundred of the same cases in-process (run_in_process).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import resource
import select
import shutil
import signal
import sys
import tempfile
import time
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import yaml
from tqdm import tqdm

from vla.contracts.action import ACTION_HIGH, ACTION_LOW
from vla.contracts.observation import STATE_LIMIT
from vla.contracts.topics import MSG_TYPES, TOPICS, step_stamp
from vla.data import messages as M
from vla.data import writer as writer_module
from vla.data.index import CorruptEpisodeWarning, EpisodeIndex
from vla.data.reader import EpisodeError, read_episode
from vla.data.writer import EpisodeWriter, _latched_qos
from vla.model import ModelConfig, create
from vla.model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, untrained_stats
from vla.runtime import load_runtime, torch_runtime

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CHECKPOINT = ROOT / "policies" / "checkpoints" / "default"
LEGACY_CHECKPOINT = ROOT / "policies" / "checkpoints" / "reach-quickstart"  # format 1, before film_text
MAX_ERROR = 1000  # characters of an error message
FAMILIES = {"episode": 0.55, "dataset": 0.15, "checkpoint": 0.08, "runtime": 0.22}
GOOD = {"error", "skip", "same", "valid"}
# Values that do not belong in a field that holds a small number, a name or a flag.
BAD_VALUES = [1_000_000, 10**30, -1, 0, 1e308, float("nan"), float("inf"), "12", "", None, [], {}, [1, 2], True,
              "x" * 100_000]
TINY = dict(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, vision_width=16, max_text_tokens=8,
            chunk=2, text_vocab_size=300)
CORPUS = ["touch the red cube", "reach the blue ball", "pick up the green cube", "push the red cube to the left"]


class Hang(BaseException):
    """Raised by the in-process timer: a BaseException, so that no `except Exception` swallows it."""


@dataclass
class Case:
    family: str  # episode, dataset, checkpoint, runtime (+ "-legacy" for files written without checksums)
    kind: str  # what was done, e.g. mcap_flip
    detail: str  # its parameters, to reproduce it
    run: Callable[[Path], tuple[str, str]]  # (work directory) -> (outcome, message)


# ---- classification -----------------------------------------------------------------------------
def refused(exc: BaseException, expected: tuple[type, ...], legal: bool = False) -> tuple[str, str]:
    text = str(exc)
    if not isinstance(exc, expected):
        return f"crash:{type(exc).__name__}", f"{type(exc).__name__}: {text[:300]}"
    if len(text) > MAX_ERROR or "\n" in text:
        return "long-error", f"{len(text)} characters: {text[:300]}"
    return "false-error" if legal else "error", text


def digest(*values) -> str:
    h = hashlib.sha256()
    for value in values:
        if isinstance(value, np.ndarray):
            h.update(f"{value.dtype}{value.shape}".encode() + np.ascontiguousarray(value).tobytes())
        else:
            h.update(json.dumps(value, sort_keys=True, default=str).encode())
    return h.hexdigest()


def finite(*arrays) -> bool:
    return all(np.all(np.isfinite(a)) for a in arrays if isinstance(a, np.ndarray) and a.dtype.kind == "f")


def accepted(same: bool, finite_data: bool, legal: bool) -> str:
    """The outcome of a run that raised nothing."""
    if not finite_data:
        return "nonfinite"
    return "same" if same else ("valid" if legal else "silent")


# ---- byte-level damage --------------------------------------------------------------------------
def damage_bytes(rng: random.Random, file: Path) -> tuple[str, Callable[[Path], None]]:
    """A random flip, overwrite or truncation of `file` (relative to the case's copy)."""
    size = file.stat().st_size
    kind = rng.choice(["flip", "flip", "bytes", "trunc"])
    if kind == "flip":
        params = [(rng.randrange(size), 1 << rng.randrange(8))]
    elif kind == "bytes":
        params = [(rng.randrange(size), rng.randrange(256)) for _ in range(rng.randint(2, 16))]
    else:
        params = rng.randrange(size)

    def apply(path: Path) -> None:
        data = bytearray(path.read_bytes())
        if kind == "trunc":
            del data[params:]
        else:
            for offset, value in params:
                data[offset] = data[offset] ^ value if kind == "flip" else value
        path.write_bytes(bytes(data))

    return f"{kind} {params if kind != 'bytes' else len(params)}", apply


def copy(src: Path, work: Path) -> Path:
    return Path(shutil.copytree(src, work / src.name, ignore=shutil.ignore_patterns(".lock")))


# ---- episodes -----------------------------------------------------------------------------------
def episode_digest(episode) -> tuple[str, bool]:
    steps = episode.steps(96, 12)
    arrays = [steps[k] for k in ("images", "states", "imu", "actions")]
    return digest(*arrays, steps["instructions"], episode.info), finite(*arrays)


def read_case(bag: Path, reference: str | None, legal: bool) -> tuple[str, str]:
    try:
        got, finite_data = episode_digest(read_episode(bag))
    except Exception as exc:
        return refused(exc, (EpisodeError,), legal)
    return accepted(got == reference, finite_data, legal), ""


def episode_cases(rng: random.Random, fx: Fixtures) -> Iterator[Case]:
    family = "episode" + fx.legacy
    while True:
        source = rng.choice(fx.episodes)
        mcap = next(source.glob("*.mcap")).name
        roll = rng.random()
        if roll < 0.7:
            target = mcap if roll < 0.6 else "metadata.yaml"
            detail, apply = damage_bytes(rng, source / target)

            def run(work, source=source, target=target, apply=apply):
                bag = copy(source, work)
                apply(bag / target)
                return read_case(bag, fx.episode_digests[source.name], legal=False)

            yield Case(family, f"{'mcap' if target == mcap else 'yaml'}_bytes", detail, run)
        elif roll < 0.85:
            detail, edit = metadata_edit(rng)

            def run(work, source=source, edit=edit):
                bag = copy(source, work)
                file = bag / "metadata.yaml"
                file.write_text(yaml.safe_dump(edit(yaml.safe_load(file.read_text()))))
                return read_case(bag, fx.episode_digests[source.name], legal=False)

            yield Case(family, "yaml_edit", detail, run)
        else:
            detail, legal, build = handmade_bag(rng)

            def run(work, build=build, legal=legal):
                return read_case(build(work / "bag"), None, legal)

            yield Case(family, "content", detail, run)


def metadata_edit(rng: random.Random):
    """A wrong type or an absurd value in metadata.yaml: in its structure, or in the episode metadata
    JSON it holds (custom_data)."""
    value = rng.choice(BAD_VALUES)
    where = rng.choice(["info", "info", "info", "relative_file_paths", "custom_data", "root", "storage_identifier"])
    key = rng.choice(["imu_window", "image_size", "control_hz", "steps", "seed", "success", "task", "instruction",
                      "wrist_camera", None])

    def edit(meta):
        info = meta["rosbag2_bagfile_information"]
        if where == "info":
            episode = json.loads(info["custom_data"]["vla_episode"])
            if key is None:
                episode.pop("task")
            else:
                episode[key] = value
            info["custom_data"]["vla_episode"] = json.dumps(episode)
        elif where == "root":
            return value
        else:
            info[where] = value
        return meta

    return f"{where}.{key if where == 'info' else ''}={str(value)[:20]}", edit


def handmade_bag(rng: random.Random):
    """A bag written with content a reader must refuse (non-finite or implausible values, broken
    images, missing or duplicated topics) or accept (legal variants). -> (detail, legal, build)."""
    problem = rng.choice(["nan state", "inf imu", "nan action", "huge action", "huge state", "huge imu", "0x0 image",
                          "absurd image", "mixed image sizes", "missing topic", "duplicated topic", "no actions",
                          "bad info", "bgr8 image", "small image", "late instruction"])
    value = rng.choice([float("nan"), float("inf"), -float("inf")])
    bad_info = (rng.choice(["imu_window", "image_size", "control_hz", "steps", "seed", "task"]), rng.choice(BAD_VALUES))
    legal = problem in ("bgr8 image", "small image", "late instruction") or (problem == "bad info" and legal_info(
        *bad_info))

    def build(path: Path) -> Path:
        writer = EpisodeWriter(path)
        if problem == "duplicated topic":
            writer._connections["joint_states2"] = writer._writer.add_connection(  # a second publisher's QoS
                TOPICS["joint_states"], MSG_TYPES["joint_states"], typestore=M.TYPESTORE,
                offered_qos_profiles=[_latched_qos()])
        info = {"task": "reach", "instruction": "touch the red ball", "seed": 0, "success": True, "steps": 3,
                "control_hz": 10, "imu_window": 12, "image_size": 96}
        for t in range(4):
            stamp = step_stamp(t, 10)
            size = {"0x0 image": 0, "small image": 4}.get(problem, 8)
            image = M.image_fields(np.full((size, size + (t if problem == "mixed image sizes" else 0), 3), t, np.uint8),
                                   stamp)
            if problem == "absurd image":
                image |= {"height": 1 << 30, "width": 1 << 30, "step": 3 << 30}
            if problem == "bgr8 image":
                image["encoding"] = "bgr8"
            writer.write("image", stamp, image)
            joints = np.full(9, 0.01 * t)
            if problem in ("nan state", "huge state") and t == 2:
                joints[3] = value if problem == "nan state" else 1e6
            if problem != "missing topic":
                writer.write("joint_states", stamp, M.joint_state_fields(joints, np.zeros(9), stamp))
            if problem == "duplicated topic":
                fields = M.joint_state_fields(joints, np.zeros(9), stamp)
                writer.write_raw("joint_states2", stamp, M.serialize(MSG_TYPES["joint_states"], fields))
            imu = np.array([0.0, 0.0, 9.81, 0.0, 0.0, 0.0])
            if problem in ("inf imu", "huge imu") and t == 1:
                imu[rng.randrange(6)] = value if problem == "inf imu" else 1e9
            writer.write("imu", stamp, M.imu_fields(imu, stamp))
            if t == 1 and problem == "late instruction":
                writer.write("instruction", stamp, M.string_fields("touch the blue ball"))
            if t < 3 and problem != "no actions":
                action = np.full(7, 0.01)
                if problem in ("nan action", "huge action") and t == 1:
                    action[rng.randrange(7)] = value if problem == "nan action" else 1e30
                writer.write("action", stamp, M.action_fields(action))
                writer.write("cmd_twist", stamp, M.twist_fields(np.clip(action, -1, 1), 10, stamp))
        if problem == "bad info":
            info[bad_info[0]] = bad_info[1]
        writer.close(info)
        return path

    return problem + (f" {bad_info[0]}={str(bad_info[1])[:20]}" if problem == "bad info" else ""), legal, build


def legal_info(key: str, value) -> bool:
    """Whether one of BAD_VALUES is legal after all in the hand-made bag's metadata (datasets/README.md):
    a seed is a count or None, a task a short name; none fits the other fields (steps must be 3)."""
    if key == "seed":
        return value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 0)
    return key == "task" and isinstance(value, str) and 0 < len(value) <= 100


# ---- datasets: manifest, training cache, statistics ---------------------------------------------
def index_digest(root: Path) -> tuple[str, bool]:
    index = EpisodeIndex(root, progress=False)
    batch = index.batch(range(len(index)))
    arrays = [batch[k] for k in ("image", "state", "imu", "actions", "action_mask", "step", "episode")]
    stats = index.stats
    episodes = [{k: v for k, v in e.items() if k not in ("start", "length")} for e in index.episodes]
    numbers = [np.asarray(v, dtype=np.float64) for group in stats.values() for v in group.values()]
    return digest(*arrays, batch["instruction"], batch["task"], stats, episodes), finite(*arrays, *numbers)


def index_case(root: Path, reference: str) -> tuple[str, str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            got, finite_data = index_digest(root)
        except Exception as exc:
            return refused(exc, (ValueError, FileNotFoundError))
    skipped = [str(w.message) for w in caught if issubclass(w.category, CorruptEpisodeWarning)]
    if skipped and finite_data:
        return "skip", skipped[0]
    return accepted(got == reference, finite_data, legal=False), ""


def dataset_cases(rng: random.Random, fx: Fixtures) -> Iterator[Case]:
    family = "dataset" + fx.legacy
    while True:
        roll = rng.random()
        if roll < 0.25:
            detail, apply = damage_bytes(rng, fx.dataset / "manifest.json")
            target, kind = "manifest.json", "manifest_bytes"
        elif roll < 0.45:
            detail, apply = manifest_edit(rng)
            target, kind = "manifest.json", "manifest_edit"
        elif roll < 0.8:
            target = rng.choice(sorted(str(p.relative_to(fx.dataset)) for p in (fx.dataset / ".cache").rglob("*")
                                       if p.is_file()))
            detail, apply = (f"delete {target}", Path.unlink) if rng.random() < 0.2 else damage_bytes(
                rng, fx.dataset / target)
            kind = "cache"
        elif roll < 0.9:
            target, kind = "stats.json", "stats"
            detail, apply = damage_bytes(rng, fx.dataset / target)
        else:
            episode = rng.choice(fx.episodes).name
            target = f"{episode}/{episode}.mcap"
            detail, apply = damage_bytes(rng, fx.dataset / target)
            kind = "episode"

        def run(work, target=target, apply=apply):
            root = copy(fx.dataset, work)
            apply(root / target)
            return index_case(root, fx.index_digest)

        yield Case(family, kind, f"{target}: {detail}", run)


def manifest_edit(rng: random.Random):
    value = rng.choice(BAD_VALUES + ["../..", "/etc", "episode_000099", "pick"])
    key = rng.choice(["episode", "path", "task", "success", "steps", "imu_window", "image_size", "control_hz", "bytes",
                      "seed", "wrist_camera", "instruction", None, "episodes", "format"])

    def apply(file: Path) -> None:
        manifest = json.loads(file.read_text())
        if key in ("episodes", "format"):
            manifest[key] = value
        elif key is None:
            manifest["episodes"][0].pop("path")
        else:
            manifest["episodes"][-1][key] = value
        file.write_text(json.dumps(manifest))

    return f"{key}={str(value)[:20]}", apply


# ---- checkpoints --------------------------------------------------------------------------------
def checkpoint_cases(rng: random.Random, fx: Fixtures) -> Iterator[Case]:
    while True:
        source, family = rng.choice([(fx.checkpoint, "checkpoint"), (fx.checkpoint, "checkpoint"),
                                     (fx.legacy_checkpoint, "checkpoint-legacy")])
        roll = rng.random()
        if roll < 0.45:
            target, kind = "config.json", "config_edit"
            detail, apply = config_edit(rng, json.loads((source / target).read_text()))
        else:
            target = rng.choice(["config.json", "model.safetensors", "model.safetensors", "tokenizer.json",
                                 "tokenizer_config.json"])
            detail, apply = damage_bytes(rng, source / target)
            kind = target.split(".")[0] + "_bytes"

        def run(work, source=source, target=target, apply=apply, legal=kind == "config_edit"):
            path = copy(source, work)
            apply(path / target)
            return load_case(path, fx.checkpoint_actions[source.name], legal)

        yield Case(family, kind, f"{target}: {detail}", run)


def config_edit(rng: random.Random, meta: dict):
    """A leaf of config.json replaced by a wrong type or an absurd value, or removed."""
    leaves = []

    def walk(node, where):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, where + [k])
        elif isinstance(node, list) and node and not isinstance(node[0], (dict, list)) and len(where) < 4:
            leaves.append(where + [rng.randrange(len(node))])
        else:
            leaves.append(where)

    walk(meta, [])
    where = rng.choice(leaves)
    value = rng.choice(BAD_VALUES + [10.0, -10.0, 1e-30, 2**40, "abc"])
    remove = rng.random() < 0.1

    def apply(file: Path) -> None:
        meta = json.loads(file.read_text())
        node = meta
        for k in where[:-1]:
            node = node[k]
        if remove and isinstance(node, dict):
            del node[where[-1]]
        else:
            node[where[-1]] = value
        file.write_text(json.dumps(meta))

    return f"{'.'.join(map(str, where))}{' removed' if remove else '=' + str(value)[:20]}", apply


def load_case(path: Path, reference: np.ndarray, legal: bool) -> tuple[str, str]:
    try:
        model, processor = load_checkpoint(path)
        actions = torch_runtime(model, processor).predict(Fixtures.observation())
    except Exception as exc:
        return refused(exc, (CheckpointError,))
    inside = finite(actions) and np.all((actions >= ACTION_LOW) & (actions <= ACTION_HIGH))
    return accepted(np.array_equal(actions, reference), bool(inside), legal), ""


# ---- runtime inputs -----------------------------------------------------------------------------
def runtime_cases(rng: random.Random, fx: Fixtures) -> Iterator[Case]:
    while True:
        backend = rng.choice(["torch", "torch", "onnx"])
        detail, legal, observations = malformed_observations(rng)

        def run(work, backend=backend, observations=observations, legal=legal):
            return predict_case(fx.runtimes[backend], observations, legal)

        yield Case("runtime", backend, detail, run)


def predict_case(runtime, observations, legal: bool) -> tuple[str, str]:
    try:
        actions = runtime.predict(observations)
    except Exception as exc:
        return refused(exc, (ValueError,), legal)
    count = len(observations) if isinstance(observations, list) else 1
    inside = (isinstance(actions, np.ndarray) and actions.shape == (count, runtime.chunk, 7) and finite(actions)
              and np.all((actions >= ACTION_LOW) & (actions <= ACTION_HIGH)))
    return accepted(False, bool(inside), legal), ""


def malformed_observations(rng: random.Random):
    """(detail, legal, observations): a valid observation with one key replaced, or a legal variant."""
    obs = Fixtures.observation()
    key = rng.choice(["image", "state", "imu", "instruction", "observation"])
    bad = {
        "image": [None, "a picture", [[1, 2, 3]], np.zeros((0, 0, 3), np.uint8), np.zeros((96, 96), np.uint8),
                  np.zeros((96, 96, 4), np.uint8), np.zeros((96, 96, 3), np.float32), np.zeros((96, 96, 3), bool),
                  np.zeros((1, 96, 96, 3), np.uint8), np.zeros((20000, 1, 3), np.uint8),
                  np.zeros((96, 96, 3), object), b"\x00" * 27648],
        "state": [None, "0" * 15, ["a"] * 15, np.zeros(14), np.zeros((15, 1)), np.zeros(15, complex),
                  np.full(15, 1e300), np.full(15, -1e6), np.array([0.0] * 14 + [STATE_LIMIT * 1.01]), {"x": 1},
                  [[0.0] * 15], np.zeros(15, object), np.full(15, np.inf, np.float16)],
        "imu": [None, np.zeros((12, 5)), np.zeros((11, 6)), np.zeros(72), np.full((12, 6), 1e300),
                np.full((12, 6), -1e3), "imu", [[1.0] * 6] * 11 + [[1.0] * 5]],
        "instruction": [None, 3, "", "   ", "?!.", "touch " * 100, b"touch the red cube", ["touch"], "<image>",
                        "touch the <act> cube", "\x00\x01", "\ud800"],
        "observation": [None, "obs", [], {}, [None], 42],
    }
    legal_values = {
        "image": [np.zeros((480, 640, 3), np.uint8), np.zeros((1, 1, 3), np.uint8),
                  np.asfortranarray(np.ones((64, 80, 3), np.uint8)), np.ones((192, 192, 3), np.uint8)[::2, ::2]],
        "state": [np.zeros(15, np.float64), [0.1 * i for i in range(15)], np.full(15, STATE_LIMIT),
                  np.zeros(15, np.int32)],
        "imu": [np.zeros((12, 6), np.float64), np.full((12, 6), 99.0), np.zeros((12, 6)).tolist()],
        "instruction": ["TOUCH THE RED CUBE!!", "touch the turquoise pyramid", "émoji 🤖 touch",
                        "touch\tthe\nred ball"],
        "observation": [[obs, obs]],
    }
    if rng.random() < 0.75:
        value, legal = rng.choice(bad[key]), False
    else:
        value, legal = rng.choice(legal_values[key]), True
    if key in ("state", "imu") and not legal and rng.random() < 0.4:  # one non-finite reading among finite ones
        value = np.array(obs[key], np.float64)
        value.flat[rng.randrange(value.size)] = rng.choice([float("nan"), float("inf"), -float("inf")])
    if key == "observation":
        return f"observations={str(value)[:40]}", legal, value
    if value is None and rng.random() < 0.5:
        obs.pop(key)
        return f"no {key}", False, obs
    shown = f"{type(value).__name__} {getattr(value, 'dtype', '')}{getattr(value, 'shape', '')}"
    return f"{key}={shown if isinstance(value, np.ndarray) else repr(value)[:40]}", legal, obs | {key: value}


# ---- fixtures and the campaign ------------------------------------------------------------------
class Fixtures:
    """The undamaged originals every case starts from (copied before damage), and their reference
    results: a dataset of sim episodes with its training cache, a checkpoint saved by this code and
    an older shipped checkpoint (reach-quickstart), and runtimes of the default."""

    def __init__(self, work: Path, dataset: Path | None = None, families=tuple(FAMILIES)):
        self.work = work
        if {"episode", "dataset"} & set(families):
            self.dataset = self._dataset(work / "dataset", dataset)
            self.episodes = sorted(p for p in self.dataset.glob("episode_*") if p.is_dir())
            self.legacy = "" if _has_crcs(self.episodes[0]) else "-legacy"
            self.episode_digests = {p.name: episode_digest(read_episode(p))[0] for p in self.episodes}
            self.index_digest = index_digest(self.dataset)[0]
        if {"checkpoint", "runtime"} & set(families):
            self.checkpoint = self._checkpoint(work / "checkpoint")
            self.legacy_checkpoint = Path(shutil.copytree(LEGACY_CHECKPOINT, work / "legacy"))
            self.checkpoint_actions = {p.name: self._predict(p) for p in (self.checkpoint, self.legacy_checkpoint)}
            self.runtimes = {backend: load_runtime(DEFAULT_CHECKPOINT, backend, "cpu", threads=1)
                             for backend in ("torch", "onnx")}

    @staticmethod
    def _dataset(root: Path, given: Path | None) -> Path:
        if given is not None:
            return Path(shutil.copytree(given, root, ignore=shutil.ignore_patterns(".cache", ".lock", "stats.json")))
        from sim import SimConfig
        from vla.apps.collect import record_dataset

        record_dataset(root, ["reach"], 2, "expert", SimConfig(), log=lambda *a: None)
        return root

    @staticmethod
    def _checkpoint(path: Path) -> Path:
        torch.manual_seed(0)
        model, processor = create(ModelConfig(**TINY), untrained_stats(), CORPUS)
        return save_checkpoint(path, model.eval(), processor)

    @staticmethod
    def _predict(path: Path) -> np.ndarray:
        return torch_runtime(*load_checkpoint(path)).predict(Fixtures.observation())

    @staticmethod
    def observation() -> dict:
        rng = np.random.default_rng(0)
        return {"image": rng.integers(0, 256, (96, 96, 3), dtype=np.uint8),
                "state": rng.normal(0, 0.3, 15).astype(np.float32),
                "imu": rng.normal(0, 1, (12, 6)).astype(np.float32), "instruction": "touch the red ball"}


def _has_crcs(episode: Path) -> bool:
    """Whether the bag's MCAP file has chunk CRCs (bags written before they were added have 0)."""
    from mcap.records import Chunk
    from mcap.stream_reader import StreamReader

    with open(next(episode.glob("*.mcap")), "rb") as f:
        return any(r.uncompressed_crc for r in StreamReader(f, emit_chunks=True).records if isinstance(r, Chunk))


GENERATORS = {"episode": episode_cases, "dataset": dataset_cases, "checkpoint": checkpoint_cases,
              "runtime": runtime_cases}


def cases(fx: Fixtures, count: int, seed: int, families=tuple(FAMILIES)) -> list[Case]:
    """`count` cases, split between `families` in the proportions of FAMILIES; the same for a seed."""
    weights = {f: FAMILIES[f] for f in families}
    total = sum(weights.values())
    out = []
    for i, family in enumerate(families):
        n = count - len(out) if i == len(families) - 1 else round(count * weights[family] / total)
        generator = GENERATORS[family](random.Random(f"{seed}-{family}"), fx)
        out += [next(generator) for _ in range(n)]
    return out


def run_in_process(case: Case, work: Path, timeout: float) -> tuple[str, str]:
    """Run a case here, a timer turning a hang into the outcome 'hang'."""
    def expire(signum, frame):
        raise Hang

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        return case.run(work)
    except Hang:
        return "hang", ""
    except Exception as exc:  # the case's own code failed (e.g. a fixture): report it, never hide it
        return f"crash:{type(exc).__name__}", f"in the case itself: {exc}"[:300]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        shutil.rmtree(work, ignore_errors=True)


def run_forked(case: Case, work: Path, timeout: float, memory: int) -> tuple[str, str]:
    """Run a case in a forked child with an address-space limit: a hang, a segfault or an absurd
    allocation is an outcome, not the end of the campaign."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
            result = run_in_process(case, work, timeout)
        except Hang:  # the timer fired while the case was cleaning up
            result = ("hang", "")
        except BaseException as exc:  # the child reports whatever happened
            result = (f"crash:{type(exc).__name__}", str(exc)[:300])
        os.write(write, json.dumps(result).encode())
        os._exit(0)
    os.close(write)
    ready, _, _ = select.select([read], [], [], timeout + 10)
    raw = os.read(read, 1 << 16) if ready else b""
    if not ready:
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    os.close(read)
    shutil.rmtree(work, ignore_errors=True)
    if raw:
        return tuple(json.loads(raw))
    if not ready:
        return "hang", ""
    return f"died:{signal.Signals(os.WTERMSIG(status)).name if os.WIFSIGNALED(status) else status}", ""


def campaign(fx: Fixtures, count: int, seed: int, families, run: Callable[[Case, Path], tuple[str, str]],
             progress: bool = False) -> tuple[Counter, list]:
    """-> (Counter of (family, kind, outcome), [(family, kind, detail, outcome, message) outside GOOD])."""
    counts, bad = Counter(), []
    for i, case in enumerate(tqdm(cases(fx, count, seed, families), desc="fuzz", unit="case", disable=not progress)):
        outcome, message = run(case, fx.work / "cases" / str(i))
        counts[case.family, case.kind, outcome] += 1
        if outcome not in GOOD:
            bad.append((case.family, case.kind, case.detail, outcome, message))
    return counts, bad


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per case before it counts as a hang")
    parser.add_argument("--memory-gb", type=float, default=8.0, help="address-space limit per case, above the start")
    parser.add_argument("--examples", type=int, default=3, help="examples shown per family and bad outcome")
    parser.add_argument("--no-crcs", action="store_true", help="record the episodes as before CRCs were written")
    args = parser.parse_args()
    families = args.families.split(",")
    if args.no_crcs:
        writer_module.add_crcs = lambda path: None
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    warnings.simplefilter("ignore")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir="/dev/shm" if Path("/dev/shm").is_dir() else None) as tmp:
        fx = Fixtures(Path(tmp), families=families)
        memory = _address_space() + int(args.memory_gb * 2**30)
        counts, bad = campaign(fx, args.cases, args.seed, families,
                               lambda case, work: run_forked(case, work, args.timeout, memory), progress=True)
    print(f"{args.cases} cases, seed {args.seed}, {time.perf_counter() - start:.0f} s")
    table = defaultdict(Counter)
    for (family, _, outcome), n in counts.items():
        table[outcome][family] += n
        table[outcome]["all"] += n
    columns = sorted({family for family, _, _ in counts}) + ["all"]
    width = max(map(len, table)) + 2
    print(f"{'outcome':<{width}}" + "".join(f"{f:>19}" for f in columns))
    for outcome in sorted(table, key=lambda o: (o not in GOOD, o)):
        print(f"{outcome:<{width}}" + "".join(f"{table[outcome][f]:>19}" for f in columns))
    shown = Counter()
    for family, kind, detail, outcome, message in bad:
        if shown[family, outcome] < args.examples:
            shown[family, outcome] += 1
            print(f"  {outcome} [{family} {kind} {detail}] {message[:240]}")
    return 0


def _address_space() -> int:
    with open("/proc/self/status") as f:
        size = next(line for line in f if line.startswith("VmSize:"))
    return int(size.split()[1]) * 1024


if __name__ == "__main__":
    sys.exit(main())
