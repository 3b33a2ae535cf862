"""Training: recipes and overrides, exact resume (also after a kill during a save), stopping on a
non-finite loss, DDP on CPU (gloo, 2 processes), and the whole `vla train` command on a dataset it
records itself."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
import torch.multiprocessing as mp
import yaml

from sim import language
from sim.config import DISTURBANCE
from vla.apps.replay import replay
from vla.apps.train import loop
from vla.apps.train.data import BatchSchedule, ensure_dataset, noisy_instruction, open_dataset, random_shift, rephrased
from vla.apps.train.loop import TrainingError, busy_warning, other_busy_cores, train, weight_average
from vla.apps.train.recipe import EnsembleRecipe, TrainConfig, load_config, load_recipe
from vla.cli import main as vla_main
from vla.config import ConfigError
from vla.contracts import ACTION_HIGH, ACTION_LOW
from vla.data.dataset import load_manifest
from vla.data.index import EpisodeIndex
from vla.data.reader import read_episode
from vla.model import ModelConfig, create
from vla.model.checkpoint import CheckpointError, ensemble_members, load_checkpoint, untrained_stats

TINY_MODEL = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64, "vision_width": 16,
              "max_text_tokens": 8, "chunk": 2, "decoders": ["parallel", "autoregressive"]}


class FakeIndex:
    """In-memory stand-in for vla.data.index.EpisodeIndex (same keys), random content.
    `crash_on_call`: raise on that call of batch(), as if the machine died; `nan_on_call`: that
    batch holds a NaN state."""

    def __init__(self, n: int = 48, chunk: int = 2, crash_on_call: int | None = None, nan_on_call: int | None = None):
        rng = np.random.default_rng(0)
        self.data = {
            "image": rng.integers(0, 256, (n, 96, 96, 3), dtype=np.uint8),
            "state": rng.normal(size=(n, 15)).astype(np.float32),
            "imu": rng.normal(size=(n, 12, 6)).astype(np.float32),
            "actions": rng.uniform(ACTION_LOW, ACTION_HIGH, (n, chunk, 7)).astype(np.float32),
            "action_mask": rng.random((n, chunk)) > 0.2,
        }
        self.per_sample = [["touch the red cube", "reach the blue ball", "move to the green cylinder"][i % 3]
                           for i in range(n)]
        self.instructions = sorted(set(self.per_sample))
        self.sample_tasks = np.array(["place", "place", "reach"] * n)[:n]
        self.stats = {
            "action": {"q01": ACTION_LOW.tolist(), "q99": ACTION_HIGH.tolist()},
            "state": {"mean": [0.0] * 15, "std": [1.0] * 15},
            "imu": {"mean": [0.0] * 6, "std": [1.0] * 6},
        }
        self.calls, self.crash_on_call, self.nan_on_call = 0, crash_on_call, nan_on_call

    def __len__(self) -> int:
        return len(self.per_sample)

    def batch(self, indices) -> dict:
        self.calls += 1
        if self.calls == self.crash_on_call:
            raise RuntimeError("simulated crash")
        indices = np.asarray(indices)
        out = {k: v[indices] for k, v in self.data.items()}
        if self.calls == self.nan_on_call:
            out["state"] = np.full_like(out["state"], np.nan)
        return out | {"instruction": [self.per_sample[i] for i in indices], "task": ["reach"] * len(indices)}


OPTIM = {"steps": 6, "batch_size": 8, "lr": 1e-3, "warmup_steps": 2}


def recipe(tmp_path, **overrides) -> TrainConfig:
    values = {
        "model": TINY_MODEL,
        "optim": OPTIM,
        "eval": {"episodes": 0},
        "out_dir": str(tmp_path / "run"),
        "log_every": 1,
        "save_every": 2,
        "keep_checkpoints": 5,
        "threads": 1,
        **overrides,
    }
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(values))
    return load_config(path)


def losses(out_dir) -> dict[int, float]:
    lines = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines if "loss" in r}


# ---- recipes ----------------------------------------------------------------------------------
def test_shipped_recipes_load():
    recipes = sorted(Path("policies/configs").glob("*.yaml"))
    assert len(recipes) >= 4
    for path in recipes:
        recipe = load_recipe(path)
        for config in recipe.member_configs() if isinstance(recipe, EnsembleRecipe) else [recipe]:
            assert config.model.chunk >= 1 and config.data.tasks, path


def test_noisy_instructions_keep_every_word_in_order_and_add_one_or_two():
    rng = np.random.default_rng(0)
    text = "please touch the red ball"
    noisy = [noisy_instruction(text, rng) for _ in range(200)]
    assert noisy == [noisy_instruction(text, r) for r in [np.random.default_rng(0)] for _ in range(200)]  # seeded
    for sentence in noisy:
        words = sentence.split()
        kept = iter(words)
        assert all(word in kept for word in text.split())  # the original words, in their order
        assert len(words) - 5 in (1, 2)
    assert {len(s.split()) for s in noisy} == {6, 7} and len(set(noisy)) > 150


def test_rephrasing_keeps_the_request_and_forgets_the_episode():
    rng = np.random.default_rng(0)
    words = {"colour": "red", "shape": "cube", "bin_colour": "blue"}
    recorded = [language.instruction("place", words, "train", rng) for _ in range(200)]  # as 200 episodes
    assert len(set(recorded)) > 100
    variants = [rephrased(text, 4, rng) for text in recorded]
    assert len(set(variants)) == 4  # the same few sentences, whichever episode asked
    assert all(language.parse(v) == ("place", words) for v in variants)
    assert rephrased("Put the RED cube in the blue bin!", 4, rng) in set(variants)  # normalised first
    push = [rephrased(language.instruction("push", {"colour": "red", "shape": "cube", "direction": "left"}, "train",
                                           rng), 4, rng) for _ in range(50)]
    assert not set(push) & set(variants) and all(language.parse(p)[1]["direction"] == "left" for p in push)
    for text in ("stash the crimson brick in the navy bucket", "do something nice"):  # not the training grammar
        assert rephrased(text, 4, rng) == text


def test_unknown_verbs_keep_what_else_names_the_task():
    rng = np.random.default_rng(0)
    push_words = {"colour": "red", "shape": "cube", "direction": "left"}
    push = language.instruction("push", push_words, "train", rng)
    texts = [rephrased(push, 4, rng, unknown_verb=1.0) for _ in range(100)]
    push_verbs = {verb.split()[0] for verb in language.VERBS["train"]["push"]}
    for text in texts:
        assert language.parse(text) is None and not set(text.split()) & push_verbs, text  # no known verb
        assert set(text.split()) & set(language.COLOUR_WORDS["red"]), text
        assert any(w in text for w in language.DIRECTION_WORDS["left"]), text
    assert len(set(texts)) > 80  # a new made-up verb each time
    place = language.instruction("place", {"colour": "red", "shape": "cube", "bin_colour": "blue"}, "train", rng)
    assert all(set(rephrased(place, 4, rng, unknown_verb=1.0).split()) & set(language.COLOUR_WORDS["blue"])
               for _ in range(20))
    pick = language.instruction("pick", {"colour": "red", "shape": "cube"}, "train", rng)
    pool = {rephrased(pick, 4, rng) for _ in range(100)}
    assert all(rephrased(pick, 4, rng, unknown_verb=1.0) in pool for _ in range(20))  # its verb names the task
    # off (0) leaves the random stream and so every other sample as it was
    a, b = np.random.default_rng(5), np.random.default_rng(5)
    assert [rephrased(push, 4, a) for _ in range(20)] == [rephrased(push, 4, b, unknown_verb=0.0) for _ in range(20)]
    assert rephrased(push, 0, rng) == push


def test_the_phrasing_grammar_parses_what_it_writes():
    rng = np.random.default_rng(1)
    for split in language.SPLITS:
        for text, task, words in language.requests(split, 100, rng):
            assert language.parse(text, split) == (task, words), text
    assert language.parse("touch the red cube now please") is None
    assert language.parse("pick up the red cube and put it in the blue bin") == (
        "place", {"colour": "red", "shape": "cube", "bin_colour": "blue"})


def test_overrides_and_config_errors(tmp_path):
    config = load_config(
        "policies/configs/quickstart-cpu.yaml",
        ["optim.lr=3e-4", "model.decoders=[autoregressive]", "model.prompt={instruction}<image>", "seed=3"],
    )
    assert config.optim.lr == 3e-4 and config.model.decoders == ("autoregressive",) and config.seed == 3
    assert config.model.prompt == "{instruction}<image>"
    with pytest.raises(ConfigError, match="unknown key"):
        load_config("policies/configs/quickstart-cpu.yaml", ["optim.learning_rate=1"])
    with pytest.raises(ConfigError, match="expected int"):
        load_config("policies/configs/quickstart-cpu.yaml", ["optim.steps=many"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config("policies/configs/quickstart-cpu.yaml", ["optim.steps"])
    with pytest.raises(ConfigError, match="unknown task"):
        load_config("policies/configs/quickstart-cpu.yaml", ["data.tasks=[fly]"])
    with pytest.raises(ConfigError, match="instruction_noise"):
        load_config("policies/configs/quickstart-cpu.yaml", ["data.instruction_noise=1.5"])
    with pytest.raises(ConfigError, match="unknown_verb"):
        load_config("policies/configs/quickstart-cpu.yaml", ["data.unknown_verb=-0.1"])
    with pytest.raises(ConfigError, match=r"data\.collect\.randomize: unknown randomisation 'wind'"):
        load_config("policies/configs/quickstart-cpu.yaml", ["data.collect.randomize=wind"])
    with pytest.raises(ConfigError, match=r"data\.collect\.randomize_tasks must name tasks"):
        load_config("policies/configs/quickstart-cpu.yaml", ["data.collect.randomize_tasks=[fly]"])
    with pytest.raises(ConfigError, match=r"data\.collect\.missed_grasps must be in \[0, 1\]"):
        load_config("policies/configs/quickstart-cpu.yaml", ["data.collect.missed_grasps=2"])
    with pytest.raises(ConfigError, match=r"data\.collect\.push_tolerance must be in \(0, 0\.06\]"):
        load_config("policies/configs/quickstart-cpu.yaml", ["data.collect.push_tolerance=0"])
    with pytest.raises(ConfigError, match="execution"):
        load_config("policies/configs/quickstart-cpu.yaml", ["model.execution=sometimes"])
    with pytest.raises(ConfigError, match="precision must be auto, bf16 or fp32"):
        load_config("policies/configs/quickstart-cpu.yaml", ["precision=fp16"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match=r"need a checkpoint to drive them: set data\.corrections\.policy or init"):
        load_config("policies/configs/quickstart-cpu.yaml", ["data.corrections={episodes: 2, takeover: {reach: 5}}"])
    with pytest.raises(ConfigError, match=r"takeover names tasks outside data\.tasks"):
        load_config("policies/configs/quickstart-cpu.yaml", ["init=policies/checkpoints/default/member_0",
                                                             "data.corrections={episodes: 2, takeover: {pick: 5}}"])
    with pytest.raises(ConfigError, match="must map tasks"):
        load_config("policies/configs/quickstart-cpu.yaml", ["data.corrections.takeover={reach: -1}"])
    (tmp_path / "init.yaml").write_text(f"init: {tmp_path / 'nothing'}\n")
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        load_config(tmp_path / "init.yaml")


# ---- training and resuming ----------------------------------------------------------------------
@pytest.mark.parametrize("data", [{}, {"data": {"task_balance": True}}, {"optim": {**OPTIM, "ema": 0.9}}],
                         ids=["plain", "task_balance", "ema"])
def test_resume_continues_exactly(tmp_path, data):
    straight = recipe(tmp_path / "a", **data)
    model = train(straight, index=FakeIndex(), progress=False)
    expected = losses(tmp_path / "a" / "run")
    assert sorted(expected) == [1, 2, 3, 4, 5, 6]

    interrupted = recipe(tmp_path / "b", **data)
    with pytest.raises(RuntimeError, match="simulated crash"):  # call 5 is step 5
        train(interrupted, index=FakeIndex(crash_on_call=5), progress=False)
    resumed = train(interrupted, index=FakeIndex(), resume="latest", progress=False)
    got = losses(tmp_path / "b" / "run")
    assert got == expected  # steps 1-4 before the crash, 5-6 after resuming from step 4: bit-identical
    for (name, a), (_, b) in zip(model.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
    final, _ = load_checkpoint(tmp_path / "b" / "run" / "final")
    assert final.config.decoders == ("parallel", "autoregressive")


def test_the_weight_average_warms_up_then_decays():
    """optim.ema: the first update copies the weights, the n-th blends in 1 - min(decay, (1 + n) / (10 + n))."""
    trained = torch.nn.Linear(1, 1, bias=False)
    average = weight_average(trained, 0.5)
    expected = None
    for n, value in enumerate([4.0, 8.0, 2.0, 6.0]):
        trained.weight.data.fill_(value)
        average.update_parameters(trained)
        blend = 1.0 if n == 0 else 1 - min(0.5, (1 + n) / (10 + n))
        expected = value if expected is None else expected + blend * (value - expected)
        assert average.module.weight.item() == pytest.approx(expected)
    assert weight_average(trained, 0.0) is None
    with pytest.raises(ConfigError, match=r"optim\.ema"):
        load_config("policies/configs/quickstart-cpu.yaml", ["optim.ema=1"])


def test_resume_refuses_a_changed_weight_average(tmp_path):
    train(recipe(tmp_path, optim={**OPTIM, "steps": 2}), index=FakeIndex(), progress=False)
    with pytest.raises(ConfigError, match="without a weight average"):
        train(recipe(tmp_path, optim={**OPTIM, "ema": 0.9}), index=FakeIndex(), resume="latest", progress=False)


def test_resume_refuses_another_model(tmp_path):
    config = recipe(tmp_path, optim={"steps": 2, "batch_size": 8})
    train(config, index=FakeIndex(), progress=False)
    changed = recipe(tmp_path, optim={"steps": 4, "batch_size": 8}, model={**TINY_MODEL, "hidden_size": 64})
    with pytest.raises(ConfigError, match="model section differs"):
        train(changed, index=FakeIndex(), resume="latest", progress=False)


def _ddp_worker(rank: int, world: int, port: int, tmp_path) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank)
    )
    model = train(load_config(tmp_path / "recipe.yaml"), index=FakeIndex(), progress=False)
    safetensors.torch.save_model(model, str(tmp_path / f"rank{rank}.safetensors"))
    torch.distributed.destroy_process_group()


def test_ddp_on_cpu_keeps_ranks_identical(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # written once, here: ranks that each wrote it could read another's half-written file
    recipe(tmp_path, optim={"steps": 3, "batch_size": 8, "lr": 1e-2}, device="cpu")
    mp.spawn(_ddp_worker, args=(2, port, tmp_path), nprocs=2)
    weights = [safetensors.torch.load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(2)]
    assert weights[0].keys() == weights[1].keys()
    for name in weights[0]:
        assert torch.equal(weights[0][name], weights[1][name]), name
    before = load_checkpoint(tmp_path / "run" / "checkpoints" / "step_0000002")[0].state_dict()
    assert any(not torch.equal(before[n], weights[0][n]) for n in weights[0] if n in before)  # it did train
    assert sorted(losses(tmp_path / "run")) == [1, 2, 3]  # only rank 0 logs


def test_vla_train_records_the_dataset_then_trains_and_evaluates(tmp_path):
    """The README's one-command train step, shrunk: records 2 expert episodes with `vla collect`
    (with pushes on the hand: they replay exactly), opens them through EpisodeIndex, trains,
    evaluates closed-loop in sim, saves."""
    collect = {"episodes": 2, "workers": 1, "randomize": "disturbance"}
    config = {
        "model": TINY_MODEL,
        "data": {"dataset": str(tmp_path / "data"), "tasks": ["reach"], "collect": collect},
        "optim": {"steps": 2, "batch_size": 4},
        "eval": {"episodes": 1},
        "out_dir": str(tmp_path / "run"),
        "log_every": 1,
        "save_every": 10,
        "threads": 1,
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(config))
    assert vla_main(["train", "--config", str(path), "--no-progress"]) == 0
    episode = sorted((tmp_path / "data").glob("episode_*"))[0]
    assert read_episode(episode).info["sim_config"]["disturbance"] == DISTURBANCE
    assert replay(episode).max_state_error == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("success_reach" in r for r in records) and any("samples_per_s" in r for r in records)
    assert (tmp_path / "run" / "tb").is_dir() and (tmp_path / "run" / "config.yaml").is_file()
    curve = tmp_path / "run" / "learning_curve.png"
    assert curve.read_bytes()[:4] == b"\x89PNG"
    curve.unlink()
    assert vla_main(["curve", str(tmp_path / "run"), "--title", "all-tasks-cpu"]) == 0
    assert curve.read_bytes()[:4] == b"\x89PNG"
    assert vla_main(["curve", str(tmp_path)]) == 2  # no metrics.jsonl: one line, no traceback
    _, processor = load_checkpoint(tmp_path / "run" / "final")
    assert processor.stats["state"]["std"] != [0.0] * 15  # statistics come from the recorded data
    assert vla_main(["train", "--config", str(path), "--no-progress", "--override", "optim.batch_size=0"]) == 2


def test_randomize_tasks_records_only_those_tasks_randomized(tmp_path):
    """data.collect.randomize_tasks: pushes recorded with pushes on the hand, reaches without, in one
    dataset that a rerun finds complete."""
    overrides = [f"data.dataset={tmp_path / 'data'}", "data.tasks=[reach,push]", "data.collect.episodes=1",
                 "data.collect.workers=1", "data.collect.randomize=disturbance", "data.collect.randomize_tasks=[push]"]
    config = load_config("policies/configs/quickstart-cpu.yaml", overrides)
    ensure_dataset(config)
    recorded = {e["task"]: e["sim_config"]["disturbance"] for e in load_manifest(tmp_path / "data")}
    assert recorded == {"reach": 0.0, "push": DISTURBANCE}
    ensure_dataset(config)  # the same settings per task: nothing to record, nothing refused
    with pytest.raises(ValueError, match="sim_config"):
        ensure_dataset(load_config("policies/configs/quickstart-cpu.yaml", overrides[:-1]))


def test_an_ensemble_recipe_trains_each_member_then_bundles_them(tmp_path, capsys):
    """`vla train` on an ensemble recipe: each member's run of one recipe (with its own overrides),
    then one checkpoint holding both; a rerun trains nothing again."""
    base = {"model": TINY_MODEL, "data": {"dataset": str(tmp_path / "data"), "tasks": ["reach"],
                                          "collect": {"episodes": 2, "workers": 1}},
            "optim": {"steps": 2, "batch_size": 4}, "eval": {"episodes": 0}, "save_every": 10, "threads": 1}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    members = [[f"out_dir={tmp_path / 'a'}"], [f"out_dir={tmp_path / 'b'}", "seed=1"]]
    ensemble = {"recipe": str(tmp_path / "base.yaml"), "members": members, "out": str(tmp_path / "ensemble")}
    (tmp_path / "ensemble.yaml").write_text(yaml.safe_dump({"ensemble": ensemble}))
    command = ["train", "--config", str(tmp_path / "ensemble.yaml"), "--no-progress"]
    assert vla_main(command) == 0
    assert capsys.readouterr().out.count("training it first") == 2
    bundled = ensemble_members(tmp_path / "ensemble")
    for member, run in zip(bundled, ("a", "b"), strict=True):
        weights = (member / "model.safetensors", tmp_path / run / "final" / "model.safetensors")
        assert weights[0].read_bytes() == weights[1].read_bytes()
    assert vla_main(command) == 0 and "training it first" not in capsys.readouterr().out
    (tmp_path / "same.yaml").write_text(yaml.safe_dump({"ensemble": {**ensemble, "members": [[], ["seed=1"]]}}))
    assert vla_main(["train", "--config", str(tmp_path / "same.yaml")]) == 2
    assert "each member needs its own out_dir" in capsys.readouterr().err


def test_a_recipe_from_init_trains_that_recipe_first_then_on_its_corrections(tmp_path, capsys):
    """DAgger in one command: `init` names a recipe, which is trained first; its final checkpoint then
    drives the corrections' first steps, and training starts from its weights."""
    first = {"model": TINY_MODEL, "data": {"dataset": str(tmp_path / "data"), "tasks": ["reach"],
                                           "collect": {"episodes": 2, "workers": 1}},
             "optim": {"steps": 2, "batch_size": 4}, "eval": {"episodes": 0}, "out_dir": str(tmp_path / "first"),
             "save_every": 10, "threads": 1}
    (tmp_path / "first.yaml").write_text(yaml.safe_dump(first))
    corrections = {"episodes": 2, "takeover": {"reach": 6}, "workers": 1}
    then = {"init": str(tmp_path / "first.yaml"), "data": {**first["data"], "corrections": corrections},
            "optim": {"steps": 2, "batch_size": 4, "lr": 1e-9, "warmup_steps": 0}, "eval": {"episodes": 0},
            "out_dir": str(tmp_path / "then"), "save_every": 10, "threads": 1}
    (tmp_path / "then.yaml").write_text(yaml.safe_dump(then))
    assert vla_main(["train", "--config", str(tmp_path / "then.yaml"), "--no-progress"]) == 0
    assert f"{tmp_path / 'first' / 'final'} not found; training it first" in capsys.readouterr().out
    recorded = json.loads((tmp_path / "then" / "corrections" / "manifest.json").read_text())["episodes"]
    assert [e["seed"] for e in recorded] == [500_000, 500_001]  # their own seeds, never evaluation's
    assert all(0 <= e["expert_from"] <= 6 and e["policy"] == str(tmp_path / "first" / "final") for e in recorded)
    config = load_config(tmp_path / "then.yaml")
    assert config.model == load_config(tmp_path / "first.yaml").model  # the init's model section
    union, data = open_dataset(config, False), EpisodeIndex(tmp_path / "data", chunk=2, progress=False)
    assert len(union) == len(data) + sum(e["steps"] - e["expert_from"] for e in recorded if e["success"])
    last_and_first = union.batch([len(data) - 1, len(data)])
    assert np.array_equal(last_and_first["image"][0], data.batch([len(data) - 1])["image"][0])
    assert last_and_first["step"][1] == min(e["expert_from"] for e in recorded if e["success"])
    start = safetensors.torch.load_file(tmp_path / "first" / "final" / "model.safetensors")
    end = safetensors.torch.load_file(tmp_path / "then" / "final" / "model.safetensors")
    assert max((start[k] - end[k]).abs().max().item() for k in start) < 1e-4  # from the init's weights (lr 1e-9)
    # the model section, when given, is the init's
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump({**then, "model": {**TINY_MODEL, "hidden_size": 48}}))
    assert vla_main(["train", "--config", str(changed), "--no-progress"]) == 2
    assert "differs from the checkpoint's" in capsys.readouterr().err
    # without init, data.corrections.policy drives them and a model of its own is trained from scratch
    scratch = {**then, "init": "", "model": {**TINY_MODEL, "hidden_size": 48}, "out_dir": str(tmp_path / "scratch"),
               "data": {**then["data"], "corrections": {**corrections, "policy": str(tmp_path / "first" / "final")}}}
    (tmp_path / "scratch.yaml").write_text(yaml.safe_dump(scratch))
    assert vla_main(["train", "--config", str(tmp_path / "scratch.yaml"), "--no-progress"]) == 0
    recorded = json.loads((tmp_path / "scratch" / "corrections" / "manifest.json").read_text())["episodes"]
    assert len(recorded) == 2 and all(e["policy"] == str(tmp_path / "first" / "final") for e in recorded)
    assert load_checkpoint(tmp_path / "scratch" / "final")[0].config.hidden_size == 48
    bad = ["-o", f"data.corrections.policy={tmp_path / 'nothing'}", "-o", f"out_dir={tmp_path / 'none'}"]
    assert vla_main(["train", "--config", str(tmp_path / "scratch.yaml"), "--no-progress", *bad]) == 2
    assert "not a checkpoint directory" in capsys.readouterr().err and not (tmp_path / "none").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_training_on_cuda_with_bf16_autocast(tmp_path):
    model = train(
        recipe(tmp_path, device="cuda", optim={"steps": 3, "batch_size": 8}), index=FakeIndex(), progress=False
    )
    assert next(model.parameters()).is_cuda and next(model.parameters()).dtype == torch.float32
    assert all(np.isfinite(v) for v in losses(tmp_path / "run").values())


def test_bf16_training_on_cpu(tmp_path, monkeypatch):
    """precision: bf16 runs the forward pass under CPU autocast (eager attention), weights stay fp32;
    its first loss is fp32's within bf16's rounding, and not bit-identical (autocast did run). On a
    CPU without bf16 units too (emulated: slow, but this model is tiny)."""
    monkeypatch.setattr(loop, "bf16_matrix_units", lambda: True)
    first = {}
    for precision in ("fp32", "bf16"):
        model = train(recipe(tmp_path / precision, precision=precision), index=FakeIndex(), progress=False)
        assert next(model.parameters()).dtype == torch.float32
        first[precision] = losses(tmp_path / precision / "run")
        assert all(np.isfinite(v) for v in first[precision].values())
    assert model.lm.config._attn_implementation == "eager"
    a, b = first["fp32"][1], first["bf16"][1]
    assert 0 < abs(a - b) < 0.05 * a


def test_bf16_on_a_cpu_without_bf16_units_trains_in_fp32(monkeypatch):
    """Emulated bf16 (no AMX or AVX512-BF16) made the all-task recipe 8x slower than fp32."""
    model, _ = create(ModelConfig(**TINY_MODEL), untrained_stats(), language.corpus())
    cpu = torch.device("cpu")
    monkeypatch.setattr(loop, "bf16_matrix_units", lambda: True)
    assert isinstance(loop.mixed_precision(model, "bf16", cpu), torch.autocast)
    for precision in ("auto", "fp32"):
        assert isinstance(loop.mixed_precision(model, precision, cpu), contextlib.nullcontext)
    monkeypatch.setattr(loop, "bf16_matrix_units", lambda: False)
    with pytest.warns(UserWarning, match="training in fp32"):
        assert isinstance(loop.mixed_precision(model, "bf16", cpu), contextlib.nullcontext)


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None, reason="inductor on CPU needs a C++ compiler")
def test_compiled_training_learns_as_eager(tmp_path):
    """compile: true trains the same model as eager: the compiled graphs ran, and the losses of every
    step match eager's within float rounding."""
    torch._dynamo.reset()
    for compiled in (False, True):
        train(recipe(tmp_path / str(compiled), compile=compiled), index=FakeIndex(), progress=False)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0
    eager, compiled = losses(tmp_path / "False" / "run"), losses(tmp_path / "True" / "run")
    assert eager.keys() == compiled.keys()
    np.testing.assert_allclose(list(compiled.values()), list(eager.values()), rtol=1e-4)


def test_compile_without_a_cpp_compiler_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler")
    with pytest.raises(ConfigError, match="needs a C\\+\\+ compiler"):
        train(recipe(tmp_path, compile=True), index=FakeIndex(), progress=False)


def test_training_threads_beyond_the_free_cores_are_warned_of():
    assert busy_warning(threads=2, busy=0.3, cores=2) is None  # an idle machine
    assert busy_warning(threads=1, busy=1.2, cores=2) is None  # one core left, one thread
    message = busy_warning(threads=2, busy=1.1, cores=2)  # beside another 1-thread run
    assert "use 1.1 of 2 cores" in message and "threads=1" in message
    assert "threads=1" in busy_warning(threads=8, busy=7.8, cores=8)  # never advises 0 threads


def test_the_cores_other_processes_use_are_measured_now():
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        busy = other_busy_cores(interval=0.5)
    finally:
        burner.kill()
        burner.wait()
    assert 0.25 <= busy <= os.cpu_count() + 0.01  # the burner's share, however loaded the machine


def test_task_balanced_batches_hold_every_task_equally():
    tasks = np.array(["reach"] * 10 + ["place"] * 90)
    schedule = BatchSchedule(len(tasks), 64, seed=0, rank=0, world=1, groups=tasks)
    batches = [schedule.indices(step) for step in range(50)]
    for batch in batches:
        assert sorted(Counter(tasks[batch]).values()) == [32, 32]
    drawn = {i for batch in batches for i in batch}
    assert set(range(10)) <= drawn and len(drawn - set(range(10))) > 80  # every reach sample, most place ones
    # any step's batch is known without replaying the earlier ones (resuming), and ranks differ
    assert BatchSchedule(len(tasks), 64, 0, 0, 1, tasks).indices(7) == batches[7]
    ranks = [BatchSchedule(len(tasks), 64, 0, rank, 2, tasks).indices(7) for rank in (0, 1)]
    assert ranks[0] != ranks[1]


def test_random_shift_moves_images_reproducibly():
    images = torch.zeros((8, 16, 16, 3), dtype=torch.uint8)
    images[:, 6:10, 6:10] = 255  # a bright square in the middle
    a = random_shift(images, 3, torch.Generator().manual_seed(1))
    b = random_shift(images, 3, torch.Generator().manual_seed(1))
    assert a.dtype == torch.uint8 and a.shape == images.shape and torch.equal(a, b)
    centres = [torch.nonzero(img[..., 0]).float().mean(0) for img in a]
    offsets = torch.stack(centres) - torch.tensor([7.5, 7.5])
    assert offsets.abs().max() <= 3 and offsets.abs().sum() > 0  # moved, by at most 3 px
    assert all(int(img[..., 0].sum()) == 16 * 255 for img in a)  # the square stays whole


def test_a_non_finite_loss_stops_training_with_a_clear_error(tmp_path, capsys):
    """One NaN in the data once trained 10 steps of NaN losses into an all-NaN checkpoint, exit 0."""
    config = recipe(tmp_path)
    with pytest.raises(TrainingError, match="step 4: the loss is not finite"):
        train(config, index=FakeIndex(nan_on_call=4), progress=False)
    assert sorted(losses(tmp_path / "run")) == [1, 2, 3]  # what came before stays, step 2's checkpoint too
    assert (tmp_path / "run" / "checkpoints" / "step_0000002" / "trainer_state.json").is_file()
    assert not (tmp_path / "run" / "final").exists()


def test_resume_passes_over_an_incomplete_checkpoint_and_rewrites_the_metrics(tmp_path):
    """A kill during a save leaves at most a staging directory (or, from older versions, a step
    directory without trainer state): --resume takes the newest complete checkpoint, and the
    metrics of the steps it redoes are written once."""
    config = recipe(tmp_path)
    with pytest.raises(RuntimeError, match="simulated crash"):  # steps 1-4 done, step 4 saved
        train(config, index=FakeIndex(crash_on_call=5), progress=False)
    checkpoints = tmp_path / "run" / "checkpoints"
    (checkpoints / "step_0000006.partial").mkdir()  # a save under way when the process died
    (checkpoints / "step_0000004" / "trainer_state.json").unlink()  # a damaged newest checkpoint
    train(config, index=FakeIndex(), resume="latest", progress=False)  # from step 2
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
