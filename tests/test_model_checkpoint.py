"""Checkpoints: identical actions after save/load, clear errors for corrupt or mismatched ones, and a
pretrained backbone loaded from a local directory (a tiny one this test saves itself)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from vla.model import ModelConfig, VLAModel
from vla.model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from vla.model.text_tokenizer import build_tokenizer
from test_model import STATS, TINY, observations, random_batch, tiny_model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = tiny_model(decoders=("parallel", "autoregressive")).eval()
    path = save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "model", {"step": 7})
    return model, path


def copy_of(saved, tmp_path):
    return shutil.copytree(saved[1], tmp_path / "copy")


def test_save_load_gives_identical_actions(saved):
    model, path = saved
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    meta = json.loads((path / "config.json").read_text())
    assert meta["step"] == 7 and meta["stats"]["action"]["q01"] == STATS["action"]["q01"]
    assert {"torch", "transformers", "vla"} <= set(meta["versions"]) and meta["lm_config"]["model_type"] == "llama"
    loaded = load_checkpoint(path)
    obs = observations(random_batch(model, 3))
    for decoder in ("parallel", "autoregressive"):
        np.testing.assert_array_equal(loaded.predict(obs, decoder), model.predict(obs, decoder))


def test_save_replaces_an_existing_checkpoint(saved, tmp_path):
    path = copy_of(saved, tmp_path)
    save_checkpoint(saved[0], path)
    assert not path.with_name("copy.partial").exists() and (path / "model.safetensors").is_file()


def _edit_config(path, edit):
    meta = json.loads((path / "config.json").read_text())
    edit(meta)
    (path / "config.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("damage, file, message", [
    (lambda p: (p / "config.json").unlink(), "config.json", "missing"),
    (lambda p: (p / "config.json").write_text("{not json"), "config.json", "not valid JSON"),
    (lambda p: _edit_config(p, lambda m: m.update(format_version=99)), "config.json", "format version 99"),
    (lambda p: _edit_config(p, lambda m: m.update(format="other")), "config.json", "not a VLA checkpoint"),
    (lambda p: _edit_config(p, lambda m: m["model"].update(hiden_size=3)), "config.json", "unknown key"),
    (lambda p: _edit_config(p, lambda m: m["stats"]["action"].update(q01=[0.0] * 6)), "config.json", "stats.action.q01"),
    (lambda p: _edit_config(p, lambda m: m["model"].update(action_bins=128)), "config.json", "128 action bins"),
    (lambda p: _edit_config(p, lambda m: m["model"].update(vision_width=48)), "model.safetensors", "has shape"),
    (lambda p: _edit_config(p, lambda m: m["model"].update(num_layers=3)), "config.json", "num_hidden_layers=2"),
    (lambda p: _edit_config(p, lambda m: m.update(lm_config={**m["lm_config"], "num_hidden_layers": 3}, model={**m["model"], "num_layers": 3})), "model.safetensors", "missing"),
    (lambda p: (p / "model.safetensors").unlink(), "model.safetensors", "missing"),
    (lambda p: (p / "model.safetensors").write_bytes((p / "model.safetensors").read_bytes()[:-1000]), "model.safetensors", "truncated"),
    (lambda p: (p / "model.safetensors").write_bytes(b"\x00" * 64), "model.safetensors", "truncated or corrupt"),
    (lambda p: (p / "tokenizer.json").unlink(), "tokenizer.json", "missing"),
    (lambda p: _edit_config(p, lambda m: m["tokenizer"].update(text_vocab_size=5)), "tokenizer.json", "5"),
])
def test_corrupt_or_mismatched_checkpoints_fail_clearly(saved, tmp_path, damage, file, message):
    path = copy_of(saved, tmp_path)
    damage(path)
    with pytest.raises(CheckpointError, match=message) as error:
        load_checkpoint(path)
    assert file in str(error.value)


def test_not_a_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        load_checkpoint(tmp_path / "nothing")


def test_pretrained_backbone_from_a_local_directory(tmp_path):
    """A tiny pretrained Llama with its own tokenizer: our special tokens and the action bins are
    added to its vocabulary, it trains, and its checkpoint is self-contained."""
    backbone = tmp_path / "tiny-llama"
    tokenizer = build_tokenizer(512)  # stands in for the backbone's own tokenizer
    tokenizer.save_pretrained(backbone)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=64, tie_word_embeddings=True)).save_pretrained(backbone)

    model = VLAModel.create(ModelConfig(**{**TINY, "pretrained": str(backbone)}), STATS)
    assert model.lm.get_input_embeddings().num_embeddings == len(tokenizer) + 256
    batch = random_batch(model, 4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(2):
        model(**batch)["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()

    path = save_checkpoint(model.eval(), tmp_path / "ckpt")
    shutil.rmtree(backbone)  # the checkpoint must not need the original directory
    loaded = load_checkpoint(path)
    obs = observations(batch)
    np.testing.assert_array_equal(loaded.predict(obs), model.predict(obs))


def test_missing_pretrained_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        VLAModel.create(ModelConfig(**{**TINY, "pretrained": str(tmp_path / "nope")}), STATS)
