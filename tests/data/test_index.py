"""The training index: samples equal to what the simulator produced, a cache parsed once and
rebuilt when a bag changes, statistics, constant memory, corrupt episodes skipped."""
import json
import os
import shutil
import time
import tracemalloc

import cv2
import numpy as np
import pytest

from vla.cli import main as vla
from vla.data import index as index_module
from vla.data.index import CorruptEpisodeWarning, EpisodeIndex


def test_index_samples_match_the_simulator(expert_dataset):
    root, reference = expert_dataset
    index = EpisodeIndex(root, image_size=96, chunk=3, progress=False)
    assert len(index) == sum(len(actions) for _, actions, _ in reference)
    assert [e["seed"] for e in index.episodes] == [0, 1, 2]
    i = 0
    for episode, (observations, actions, _) in enumerate(reference):
        for t, obs in enumerate(observations[:-1]):
            s = index[i]
            assert (s["episode"], s["step"], s["task"]) == (episode, t, "reach")
            assert np.array_equal(s["image"], obs["image"]) and np.array_equal(s["state"], obs["state"])
            assert np.array_equal(s["imu"], obs["imu"]) and s["instruction"] == obs["instruction"]
            future = [actions[min(t + k, len(actions) - 1)] for k in range(3)]  # padded with the last
            assert np.array_equal(s["actions"], future)
            assert s["action_mask"].tolist() == [t + k < len(actions) for k in range(3)]
            i += 1
    batch = index.batch([4, 0, len(index) - 1])
    for row, j in enumerate([4, 0, len(index) - 1]):
        single = index[j]
        for key in ("image", "state", "imu", "actions", "action_mask", "episode", "step"):
            assert np.array_equal(batch[key][row], single[key]), key
        assert batch["instruction"][row] == single["instruction"] and batch["task"][row] == single["task"]



def test_statistics_of_the_selected_samples(expert_dataset):
    root, reference = expert_dataset
    index = EpisodeIndex(root, progress=False)
    all_actions = np.concatenate([actions for _, actions, _ in reference])
    stats = index.stats
    assert np.allclose(stats["action"]["q99"], np.quantile(all_actions, 0.99, axis=0))
    assert np.allclose(stats["action"]["std"], all_actions.std(0), atol=1e-6)
    states = np.concatenate([[o["state"] for o in observations[:-1]] for observations, _, _ in reference])
    assert np.allclose(stats["state"]["mean"], states.mean(0), atol=1e-5)  # fewer samples than the subset: all
    imu = np.concatenate([[o["imu"] for o in observations[:-1]] for observations, _, _ in reference]).reshape(-1, 6)
    assert np.allclose(stats["imu"]["std"], imu.std(0), atol=1e-4)
    stored = json.loads((root / "stats.json").read_text())
    assert stored["action"]["count"] == len(all_actions) and stored["state"] == stats["state"]
    assert EpisodeIndex(root, progress=False).stats == stats  # read back, not recomputed


def test_index_resizes(expert_dataset):
    root, reference = expert_dataset
    sample = EpisodeIndex(root, image_size=48, progress=False)[0]
    expected = cv2.resize(reference[0][0][0]["image"], (48, 48), interpolation=cv2.INTER_AREA)
    assert sample["image"].shape == (48, 48, 3) and np.array_equal(sample["image"], expected)


def test_index_cache_is_reused_then_rebuilt_when_a_bag_changes(expert_dataset, tmp_path, monkeypatch):
    root = tmp_path / "copy"
    shutil.copytree(expert_dataset[0], root, ignore=shutil.ignore_patterns(".cache", ".lock"))
    first = EpisodeIndex(root, progress=False)
    def no_parsing(path):
        raise AssertionError(f"parsed {path} again")

    monkeypatch.setattr(index_module, "read_episode", no_parsing)
    assert EpisodeIndex(root, progress=False).cache_dir == first.cache_dir
    monkeypatch.undo()
    mcap = root / "episode_000001" / "episode_000001.mcap"
    os.utime(mcap, ns=(time.time_ns(), time.time_ns() + 10**9))
    rebuilt = EpisodeIndex(root, progress=False)
    assert rebuilt.cache_dir != first.cache_dir and not first.cache_dir.exists()
    assert np.array_equal(rebuilt.batch(range(len(rebuilt)))["image"], first.batch(range(len(first)))["image"])


def test_index_memory_does_not_grow_with_epochs(expert_dataset):
    index = EpisodeIndex(expert_dataset[0], progress=False)
    order = np.random.default_rng(0).permutation(len(index))
    tracemalloc.start()
    used = []
    for _ in range(4):
        for k in range(0, len(order), 4):
            index.batch(order[k:k + 4])
        for i in order:
            index[int(i)]
        used.append(tracemalloc.get_traced_memory()[0])
    tracemalloc.stop()
    assert used[-1] - used[0] < 20_000, used


def test_corrupt_and_failed_episodes_are_skipped(expert_dataset, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(expert_dataset[0], root, ignore=shutil.ignore_patterns(".cache", ".lock"))
    # a failed episode: the expert gets 2 steps to reach
    failed = ["collect", "--task", "reach", "--episodes", "1", "--max-steps", "2", "--append", "--out", str(root)]
    assert vla(failed) == 0
    mcap = root / "episode_000001" / "episode_000001.mcap"
    mcap.write_bytes(mcap.read_bytes()[: mcap.stat().st_size // 2])
    with pytest.warns(CorruptEpisodeWarning, match=r"episode_000001\.mcap: truncated MCAP"):
        index = EpisodeIndex(root, progress=False)
    assert [e["episode"] for e in index.episodes] == [0, 2]
    with pytest.warns(CorruptEpisodeWarning):
        everything = EpisodeIndex(root, successful_only=False, progress=False)
    assert [e["episode"] for e in everything.episodes] == [0, 2, 3] and len(everything) == len(index) + 2
    assert not everything.episodes[-1]["success"]
    with pytest.warns(CorruptEpisodeWarning), pytest.raises(ValueError, match="no episodes match"):
        EpisodeIndex(root, tasks=["pick"], progress=False)
