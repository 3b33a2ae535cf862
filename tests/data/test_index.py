"""The training index: samples equal to what the simulator produced, a cache parsed once and
rebuilt when a bag changes or the cache is damaged, statistics, constant memory, corrupt episodes
(non-finite values, entries that differ from their bag) skipped, bad manifests a one-line error."""
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
from vla.data.dataset import DatasetWriter, dir_bytes, episode_name
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
    assert index.sample_tasks.tolist() == index.batch(range(len(index)))["task"]



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


# ---- damage: cache, manifest, values ---------------------------------------------------------------
def copy_dataset(expert_dataset, tmp_path):
    return shutil.copytree(expert_dataset[0], tmp_path / "copy", ignore=shutil.ignore_patterns(".cache", ".lock"))


def flip(file, offset=-1):
    data = bytearray(file.read_bytes())
    data[offset] ^= 0x10
    file.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, problem", [
    (lambda cache: (cache / "meta.json").unlink(), "no meta.json"),
    (lambda cache: (cache / "meta.json").write_text("{"), "meta.json unreadable"),
    (lambda cache: (cache / "images.bin").write_bytes(b""), "images.bin has 0 bytes"),
    (lambda cache: flip(cache / "states.bin"), "its content does not match its checksum"),
    (lambda cache: flip(cache / "images.bin", 1000), "its content does not match its checksum"),
    (lambda cache: flip(cache / "meta.json", 30), "meta.json"),
])
def test_a_damaged_cache_is_rebuilt(expert_dataset, tmp_path, damage, problem):
    root = copy_dataset(expert_dataset, tmp_path)
    first = EpisodeIndex(root, progress=False)
    expected = first.batch(range(len(first)))
    damage(first.cache_dir)
    with pytest.warns(UserWarning, match=f"damaged training cache \\({problem}"):
        rebuilt = EpisodeIndex(root, progress=False)
    for key, value in rebuilt.batch(range(len(rebuilt))).items():
        assert np.array_equal(value, expected[key]), key
    assert EpisodeIndex(root, progress=False).cache_dir == rebuilt.cache_dir  # intact again: no warning


@pytest.mark.parametrize("edit, problem", [
    (lambda m: m["episodes"][0].update(imu_window=1_000_000), "entry 0: episode metadata: imu_window must be at most"),
    (lambda m: m["episodes"][1].update(success="yes"), "entry 1: episode metadata success='yes' is not bool"),
    (lambda m: m["episodes"][0].update(steps=None), "steps=None is not int"),
    (lambda m: m["episodes"][0].pop("task"), r"lacks \['task'\]"),
    (lambda m: m["episodes"][2].update(path="../../etc"), "path='../../etc' is not the name of an episode directory"),
    (lambda m: m["episodes"][2].update(bytes="x" * 100_000), "bytes='xxxx"),
    (lambda m: m["episodes"][2].update(path="x" * 100_000), "path='xxxx.* is not the name of an episode directory"),
    (lambda m: m["episodes"][1].update(path="episode_000000"), "an episode path is listed twice"),
    (lambda m: m.update(episodes={"0": {}}), "'episodes' is not a list"),
    (lambda m: m.update(format=None), "unknown manifest format"),
])
def test_a_manifest_with_wrong_types_is_a_one_line_error(expert_dataset, tmp_path, edit, problem):
    root = copy_dataset(expert_dataset, tmp_path)
    manifest = json.loads((root / "manifest.json").read_text())
    edit(manifest)
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=problem) as error:
        EpisodeIndex(root, progress=False)
    assert "manifest.json" in str(error.value) and "\n" not in str(error.value) and len(str(error.value)) < 400


def test_a_manifest_entry_that_differs_from_its_bag_is_skipped(expert_dataset, tmp_path):
    """The bag's metadata is CRC-protected, the manifest is not: the bag wins."""
    root = copy_dataset(expert_dataset, tmp_path)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["episodes"][1]["task"] = "push"
    manifest["episodes"][2]["bytes"] += 1
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.warns(CorruptEpisodeWarning) as caught:
        index = EpisodeIndex(root, progress=False)
    messages = sorted(str(w.message) for w in caught)
    assert "episode_000001: the manifest's entry differs from the bag in ['task']" in messages[0]
    assert "episode_000002: the manifest's entry differs from the bag in its size" in messages[1]
    assert [e["episode"] for e in index.episodes] == [0]


def test_non_finite_samples_are_rejected_at_indexing(tmp_path, handmade):
    """One NaN in a recording skips its episode (it would make every statistic and loss NaN)."""
    root = tmp_path / "data"
    info = {"task": "reach", "instruction": "touch the red ball", "seed": 0, "success": True, "steps": 2,
            "control_hz": 10}
    nan_imu = lambda key, t, fields: fields | {"angular_velocity": {"x": np.nan, "y": 0.0, "z": 0.0}} if (
        key == "imu" and t == 1) else fields
    with DatasetWriter(root, log=lambda *a: None) as dataset:
        for episode, edit in enumerate([None, nan_imu, None]):
            name = episode_name(episode)
            handmade(root / name, info=info | {"episode": episode}, edit=edit)
            dataset.add(info | {"episode": episode, "path": name, "bytes": dir_bytes(root / name)})
    with pytest.warns(CorruptEpisodeWarning, match=r"episode_000001: /imu/data: 1 message\(s\) with NaN"):
        index = EpisodeIndex(root, progress=False)
    assert [e["episode"] for e in index.episodes] == [0, 2] and np.isfinite(index.stats["imu"]["std"]).all()
