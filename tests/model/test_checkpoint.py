"""Checkpoints: identical actions after save/load, clear errors for corrupt or mismatched ones, a
checkpoint directory that appears only complete, and a pretrained backbone loaded from a local
directory (a tiny one this test saves itself)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from policies import CHECKPOINT_DIR
from vla.cli import main as vla
from vla.model import ModelConfig, create
from vla.model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, save_ensemble, trained_tasks
from vla.model.text import build_tokenizer
from vla.model.vlm import BackboneError
from vla.runtime import load_runtime, torch_runtime

CORPUS = ["touch the red cube", "reach the blue ball", "pick up the green cube"]


@pytest.fixture(scope="module")
def saved(tiny_model, tmp_path_factory):
    model, processor = tiny_model(decoders=("parallel", "autoregressive"))
    path = save_checkpoint(tmp_path_factory.mktemp("ckpt") / "model", model.eval(), processor, {"step": 7})
    return model, processor, path


def copy_of(saved, tmp_path):
    return shutil.copytree(saved[2], tmp_path / "copy")


def test_save_load_gives_identical_actions(saved, stats, observations):
    model, processor, path = saved
    assert sorted(p.name for p in path.iterdir()) == [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    meta = json.loads((path / "config.json").read_text())
    assert meta["step"] == 7 and meta["stats"]["action"]["q01"] == stats["action"]["q01"]
    assert {"torch", "transformers", "vla"} <= set(meta["versions"]) and meta["lm_config"]["model_type"] == "llama"
    assert len(meta["weights_sha256"]) == 64
    loaded, loaded_processor = load_checkpoint(path)
    obs = observations(3)
    for decoder in ("parallel", "autoregressive"):
        np.testing.assert_array_equal(
            torch_runtime(loaded, loaded_processor, decoder).predict(obs),
            torch_runtime(model, processor, decoder).predict(obs),
        )


def test_save_replaces_an_existing_checkpoint(saved, tmp_path):
    path = copy_of(saved, tmp_path)
    save_checkpoint(path, saved[0], saved[1])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy"] and (path / "model.safetensors").is_file()


def test_an_interrupted_save_leaves_the_old_checkpoint(saved, tmp_path):
    path = copy_of(saved, tmp_path)
    before = (path / "model.safetensors").read_bytes()

    def crash(staging):
        raise KeyboardInterrupt  # as if killed while writing the trainer state

    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, saved[0], saved[1], also=crash)
    assert (
        sorted(p.name for p in tmp_path.iterdir()) == ["copy"] and (path / "model.safetensors").read_bytes() == before
    )
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path / "new", saved[0], saved[1], also=crash)
    assert not (tmp_path / "new").exists()  # a checkpoint directory appears only complete


def _another_runs_tokenizer(path):
    """The tokenizer of a run trained on other instructions: as many tokens, other ids."""
    size = json.loads((path / "config.json").read_text())["tokenizer"]["text_vocab_size"]
    build_tokenizer(["put the yellow ball in the bin", "push the red cube left"], size).save_pretrained(path)


def _edit_config(path, edit):
    meta = json.loads((path / "config.json").read_text())
    edit(meta)
    (path / "config.json").write_text(json.dumps(meta))


def _flip_weights(path):
    data = bytearray((path / "model.safetensors").read_bytes())
    data[-100] ^= 0xFF  # inside a tensor: the file still parses
    (path / "model.safetensors").write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage, file, message",
    [
        (lambda p: (p / "config.json").unlink(), "config.json", "missing"),
        (lambda p: (p / "config.json").write_text("{not json"), "config.json", "not valid JSON"),
        (lambda p: _edit_config(p, lambda m: m.update(format_version=99)), "config.json", "format version 99"),
        (lambda p: _edit_config(p, lambda m: m.update(format="other")), "config.json", "not a VLA checkpoint"),
        (lambda p: _edit_config(p, lambda m: m["model"].update(hiden_size=3)), "config.json", "unknown key"),
        (lambda p: _edit_config(p, lambda m: m["model"].update(image_size=1_000_000)), "config.json", "image_size"),
        (lambda p: _edit_config(p, lambda m: m["model"].update(chunk="4")), "config.json", "expected int"),
        (
            lambda p: _edit_config(p, lambda m: m["stats"]["action"].update(q01=[0.0] * 6)),
            "config.json",
            "stats.action.q01",
        ),
        (
            lambda p: _edit_config(p, lambda m: m["stats"]["action"].update(q99=[10.0] * 7)),
            "config.json",
            r"stats\.action\.q99 is outside",
        ),
        (
            lambda p: _edit_config(p, lambda m: m["stats"]["state"].update(mean=["x"] * 15)),
            "config.json",
            "stats.state.mean",
        ),
        (
            lambda p: _edit_config(p, lambda m: m["stats"]["imu"].update(std=[float("nan")] * 6)),
            "config.json",
            "stats.imu.std",
        ),
        (lambda p: _edit_config(p, lambda m: m["model"].update(action_bins=128)), "config.json", "128 action bins"),
        (lambda p: _edit_config(p, lambda m: m["model"].update(vision_width=48)), "model.safetensors", "has shape"),
        (lambda p: _edit_config(p, lambda m: m["model"].update(num_layers=3)), "config.json", "num_hidden_layers=2"),
        (
            lambda p: _edit_config(
                p,
                lambda m: m.update(
                    lm_config={**m["lm_config"], "num_hidden_layers": 3}, model={**m["model"], "num_layers": 3}
                ),
            ),
            "model.safetensors",
            "missing",
        ),
        (lambda p: (p / "model.safetensors").unlink(), "model.safetensors", "missing"),
        (_flip_weights, "model.safetensors", "do not match the checksum"),
        (
            lambda p: (p / "model.safetensors").write_bytes((p / "model.safetensors").read_bytes()[:-1000]),
            "model.safetensors",
            "checksum",
        ),
        (
            lambda p: (
                _edit_config(p, lambda m: m.pop("weights_sha256"))
                or (p / "model.safetensors").write_bytes(b"\x00" * 64)
            ),
            "model.safetensors",
            "truncated or corrupt",
        ),
        (
            lambda p: _edit_config(p, lambda m: m["lm_config"].update(vocab_size=10**9)),
            "config.json",
            "LM vocabulary has 1000000000 ids",
        ),
        (
            lambda p: _edit_config(  # consistent, but 8 GB: refused before any of it is allocated
                p, lambda m: (m["model"].update(hidden_size=16384), m["lm_config"].update(hidden_size=16384))
            ),
            "model.safetensors",
            "has shape",
        ),
        (lambda p: _edit_config(p, lambda m: m["lm_config"].update(hidden_size="x")), "config.json", "invalid"),
        (lambda p: _edit_config(p, lambda m: m["lm_config"].update(num_key_value_heads=-1)), "config.json", "build"),
        (lambda p: _edit_config(p, lambda m: m["lm_config"].update(return_dict=False)), "config.json", "return_dict"),
        (
            lambda p: _edit_config(p, lambda m: m["lm_config"].update(output_hidden_states=1e308)),
            "config.json",
            "output_hidden_states",
        ),
        (lambda p: (p / "tokenizer.json").unlink(), "tokenizer.json", "missing"),
        (_another_runs_tokenizer, "tokenizer.json", "checksum"),
        (lambda p: _edit_config(p, lambda m: m["tokenizer"].update(text_vocab_size=5)), "tokenizer.json", "5"),
    ],
)
def test_corrupt_or_mismatched_checkpoints_fail_clearly(saved, tmp_path, damage, file, message):
    path = copy_of(saved, tmp_path)
    damage(path)
    with pytest.raises(CheckpointError, match=message) as error:
        load_checkpoint(path)
    assert file in str(error.value) and len(str(error.value)) < 1000


def test_checkpoints_without_a_checksum_and_with_another_dtype_load(saved, tmp_path, observations):
    """Checkpoints saved before the weights' and tokenizer's checksums still load; a dtype in the LM config does not
    change the float32 model that is built."""
    model, processor, _ = saved
    path = copy_of(saved, tmp_path)
    _edit_config(
        path,
        lambda m: (m.pop("weights_sha256"), m["tokenizer"].pop("sha256"), m["lm_config"].update(dtype="float16")),
    )
    loaded, loaded_processor = load_checkpoint(path)
    assert next(loaded.parameters()).dtype == torch.float32
    obs = observations(2)
    expected = torch_runtime(model, processor).predict(obs)
    np.testing.assert_array_equal(torch_runtime(loaded, loaded_processor).predict(obs), expected)


def test_the_reach_checkpoint_shipped_before_the_four_task_default_still_acts(observations):
    """Old checkpoints keep loading: the reach policy that was policies/checkpoints/default until
    2026-12-01 (saved before film_text and film_gripper existed) acts, in torch and ONNX alike."""
    old = CHECKPOINT_DIR / "reach-quickstart"
    assert "film_text" not in json.loads((old / "config.json").read_text())["model"]
    obs = observations(4)
    actions = {backend: load_runtime(old, backend, "cpu", threads=1).predict(obs) for backend in ("torch", "onnx")}
    assert actions["torch"].shape == (4, 4, 7) and np.all(np.isfinite(actions["torch"]))
    np.testing.assert_array_equal(actions["torch"], actions["onnx"])


def test_an_ensemble_acts_as_the_mean_of_its_members_and_exports_each(saved, tiny_model, tmp_path, observations,
                                                                      capsys):
    other_model, other_processor = tiny_model(decoders=("parallel",))
    with torch.no_grad():  # the same seed built it: another run's weights
        for parameter in other_model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    other = save_checkpoint(tmp_path / "other", other_model.eval(), other_processor)
    ensemble = save_ensemble(tmp_path / "ensemble", [saved[2], other])
    obs = observations(3)
    members = [load_runtime(path, device="cpu").predict(obs) for path in (saved[2], other)]
    runtime = load_runtime(ensemble, device="cpu")
    np.testing.assert_allclose(runtime.predict(obs), np.mean(members, axis=0), rtol=0, atol=1e-6)
    assert not np.allclose(members[0], members[1])  # the mean is not one member's
    assert runtime.chunk == saved[0].config.chunk and trained_tasks(ensemble) == ["reach"]
    with pytest.raises(CheckpointError, match="an ensemble of checkpoints, not one"):
        load_checkpoint(ensemble)  # e.g. a recipe's init: one set of weights
    assert vla(["export", "--checkpoint", str(ensemble), "--samples", "2"]) == 0
    assert (ensemble / "member_0" / "model.onnx").is_file() and (ensemble / "member_1" / "model.onnx").is_file()
    onnx = load_runtime(ensemble, backend="onnx", device="cpu")
    assert onnx.name.startswith("ensemble of 2, onnxruntime") and onnx.predict(obs).shape == members[0].shape

    longer, longer_processor = tiny_model(chunk=3)
    with pytest.raises(CheckpointError, match="must agree"):
        save_ensemble(tmp_path / "mixed", [saved[2], save_checkpoint(tmp_path / "longer", longer, longer_processor)])
    shutil.rmtree(ensemble / "member_1")  # a member replaced on disk after the ensemble was saved
    shutil.copytree(tmp_path / "longer", ensemble / "member_1")
    with pytest.raises(CheckpointError, match="must agree"):
        load_runtime(ensemble, device="cpu")
    (ensemble / "ensemble.json").write_text('{"format": "vla-ensemble", "members": ["../other"]}')
    with pytest.raises(CheckpointError, match="not a VLA ensemble"):
        load_runtime(ensemble, device="cpu")
    shipped = [CHECKPOINT_DIR / "reach-quickstart", CHECKPOINT_DIR / "default" / "member_0"]  # alike but for tasks
    with pytest.raises(CheckpointError, match="trained on other tasks"):
        save_ensemble(tmp_path / "tasks", shipped)
    assert vla(["ensemble", "--out", str(tmp_path / "one"), str(other)]) == 2
    assert "2-8 checkpoints" in capsys.readouterr().err


def test_not_a_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        load_checkpoint(tmp_path / "nothing")


def test_pretrained_backbone_from_a_local_directory(tmp_path, stats, observations, training_batch):
    """A tiny pretrained Llama with its own tokenizer: our special tokens and the action bins are
    added to its vocabulary, it trains, and its checkpoint is self-contained."""
    backbone = tmp_path / "tiny-llama"
    tokenizer = build_tokenizer(CORPUS, 300)  # stands in for the backbone's own tokenizer
    tokenizer.save_pretrained(backbone)
    torch.manual_seed(0)
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            tie_word_embeddings=True,
        )
    ).save_pretrained(backbone)

    config = ModelConfig(
        hidden_size=32,
        num_layers=1,
        num_heads=2,
        intermediate_size=64,
        vision_width=16,
        max_text_tokens=8,
        chunk=2,
        pretrained=str(backbone),
    )
    model, processor = create(config, stats, corpus=[])
    assert model.lm.get_input_embeddings().num_embeddings == len(tokenizer) + 256
    batch, obs, _ = training_batch(processor, 4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(2):
        model(**batch)["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()

    path = save_checkpoint(tmp_path / "ckpt", model.eval(), processor)
    shutil.rmtree(backbone)  # the checkpoint must not need the original directory
    loaded = torch_runtime(*load_checkpoint(path))
    np.testing.assert_array_equal(loaded.predict(obs), torch_runtime(model, processor).predict(obs))


def test_missing_pretrained_directory(tmp_path, stats):
    with pytest.raises(BackboneError, match=r"config\.json"):
        create(ModelConfig(pretrained=str(tmp_path / "nope")), stats, CORPUS)
