"""Training a pretrained VLM backbone from a recipe: LoRA on its LM, a frozen vision tower and
gradient checkpointing (finetune section); checkpoints hold the merged weights and load to the
same actions; recipe choices that cannot apply are refused."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from transformers import AutoModelForImageTextToText

from vla.apps.train.loop import train
from vla.apps.train.recipe import load_config
from vla.config import ConfigError
from vla.contracts import ACTION_HIGH, ACTION_LOW
from vla.model.checkpoint import load_checkpoint
from vla.model.random_backbones import save_random_vlm
from vla.runtime import torch_runtime


class FakeIndex:
    """In-memory stand-in for vla.data.index.EpisodeIndex: random 32 x 32 samples."""

    def __init__(self, n: int = 16, chunk: int = 2):
        rng = np.random.default_rng(0)
        self.data = {"image": rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                     "state": rng.normal(size=(n, 15)).astype(np.float32),
                     "imu": rng.normal(size=(n, 12, 6)).astype(np.float32),
                     "actions": rng.uniform(ACTION_LOW, ACTION_HIGH, (n, chunk, 7)).astype(np.float32),
                     "action_mask": np.ones((n, chunk), bool)}
        self.instructions = [["touch the red cube", "pick up the blue ball"][i % 2] for i in range(n)]
        self.stats = {"action": {"q01": ACTION_LOW.tolist(), "q99": ACTION_HIGH.tolist()},
                      "state": {"mean": [0.0] * 15, "std": [1.0] * 15}, "imu": {"mean": [0.0] * 6, "std": [1.0] * 6}}

    def __len__(self) -> int:
        return len(self.instructions)

    def batch(self, indices) -> dict:
        indices = np.asarray(indices)
        return {k: v[indices] for k, v in self.data.items()} | {"instruction": [self.instructions[i] for i in indices]}


def recipe(tmp_path, backbone, finetune: dict, **model):
    values = {
        "model": {"vision": "vlm", "pretrained": str(backbone), "image_size": 32, "patch_size": 16,
                  "vision_film": False, "prompt": "<image><state>{instruction}", "chunk": 2,
                  "decoders": ["parallel", "autoregressive"], **model},
        "finetune": finetune,
        "optim": {"steps": 8, "batch_size": 4, "lr": 1e-2, "warmup_steps": 1},
        "eval": {"episodes": 0}, "out_dir": str(tmp_path / "run"), "log_every": 1, "save_every": 4, "threads": 1,
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(values))
    return load_config(tmp_path / "recipe.yaml")


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated")  # peft's call
def test_lora_with_a_frozen_tower_trains_and_saves_merged_weights(tmp_path, observations):
    backbone = save_random_vlm("smolvlm", tmp_path / "smolvlm")
    finetune = {"vision": "frozen", "lm": "lora", "lora_rank": 4, "lora_alpha": 8, "gradient_checkpointing": True}
    config = recipe(tmp_path, backbone, finetune)
    model = train(config, index=FakeIndex(), progress=False)
    losses = [r["loss"] for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())]
    assert len(losses) == 8 and np.mean(losses[-2:]) < losses[0]
    assert not any("lora" in name for name, _ in model.named_parameters())  # merged when training ended
    obs = observations(3, size=32)
    for checkpoint in (tmp_path / "run" / "final", tmp_path / "run" / "checkpoints" / "step_0000004"):
        loaded, processor = load_checkpoint(checkpoint)  # a plain model: the adapters merged into the weights
        assert type(loaded.lm).__name__ == "SmolVLMForConditionalGeneration"
    final, processor = load_checkpoint(tmp_path / "run" / "final")
    for decoder in ("parallel", "autoregressive"):
        np.testing.assert_array_equal(torch_runtime(final, processor, decoder).predict(obs),
                                      torch_runtime(model, processor, decoder).predict(obs))
    with pytest.raises(ConfigError, match="LoRA"):
        train(config, index=FakeIndex(), resume="latest", progress=False)


def test_a_frozen_tower_keeps_its_weights_while_the_connector_trains(tmp_path):
    backbone = save_random_vlm("paligemma", tmp_path / "paligemma")
    model = train(recipe(tmp_path, backbone, {"vision": "frozen"}, patch_size=8), index=FakeIndex(), progress=False)
    pretrained = AutoModelForImageTextToText.from_pretrained(backbone).model
    tower = model.vision_tower.state_dict()
    assert all(torch.equal(tower[name], value) for name, value in pretrained.vision_tower.state_dict().items())
    assert not torch.equal(model.image_encoder.connector.linear.weight, pretrained.multi_modal_projector.linear.weight)


def test_the_gpu_recipe_loads():
    config = load_config("policies/configs/smolvlm-gpu.yaml")
    assert config.model.vision == "vlm" and config.model.image_tokens == 16 and config.finetune.vision == "frozen"


@pytest.mark.parametrize("change, message", [
    ({"finetune": {"vision": "frozen"}}, "needs a pretrained vision tower"),
    ({"finetune": {"lm": "lora"}}, "needs a pretrained LM"),
    ({"finetune": {"lm": "qlora"}}, "finetune.lm full or lora"),
    ({"finetune": {"lm": "lora", "lora_rank": 0}, "model": {"pretrained": "somewhere"}}, "lora_rank"),
])
def test_finetune_choices_that_cannot_apply_are_refused(tmp_path, change, message):
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(change))
    with pytest.raises(ConfigError, match=message):
        load_config(tmp_path / "recipe.yaml")
