"""Checkpoints: a directory like Hugging Face's save_pretrained.

    config.json        format + version, ModelConfig, normalisation statistics (action quantiles,
                       state and IMU mean/std), the LM's transformers config, tokenizer facts,
                       library versions, and whatever the trainer adds (its config, the step)
    model.safetensors  all weights (safetensors: loading never unpickles code)
    tokenizer.json     the text tokenizer (+ tokenizer_config.json), PreTrainedTokenizerFast

The checkpoint is self-contained: a pretrained backbone is rebuilt from the saved LM config, not
from its original directory. Loading checks each file and fails with CheckpointError naming the
file and the problem.
"""
from __future__ import annotations

import json
import os
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import safetensors
import safetensors.torch
import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import vla
from sim.contracts import ACTION_DIM, IMU_CHANNELS
from vla.config import ConfigError, from_dict, to_dict
from vla.model.config import ModelConfig
from vla.model.model import VLAModel

FORMAT, FORMAT_VERSION = "vla-checkpoint", 1
CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE = "config.json", "model.safetensors", "tokenizer.json"
STATS_SHAPES = {("action", "q01"): ACTION_DIM, ("action", "q99"): ACTION_DIM,
                ("state", "mean"): None, ("state", "std"): None, ("imu", "mean"): IMU_CHANNELS, ("imu", "std"): IMU_CHANNELS}


class CheckpointError(ValueError):
    pass


def versions() -> dict[str, str]:
    return {"vla": vla.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "safetensors": safetensors.__version__}


def save_checkpoint(model: VLAModel, path: str | Path, extra: dict | None = None) -> Path:
    """Write the checkpoint directory (replacing one already there). It is written beside `path`
    first and then renamed, so an interrupted save never leaves a half-written checkpoint."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    model.tokenizer.save_pretrained(partial)
    # save_model drops the duplicate names of tied weights, which safetensors cannot store twice.
    safetensors.torch.save_model(model, str(partial / WEIGHTS_FILE), metadata={"format": FORMAT})
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "model": to_dict(model.config), "stats": model.stats, "lm_config": model.lm.config.to_dict(),
        "tokenizer": {"text_vocab_size": model.action_offset, "action_token_offset": model.action_offset},
        "versions": versions(), **(extra or {}),
    }
    (partial / CONFIG_FILE).write_text(json.dumps(meta, indent=1, default=_jsonable))
    if path.exists():
        shutil.rmtree(path)
    os.replace(partial, path)
    return path


def _jsonable(value):
    if isinstance(value, (np.ndarray, np.generic)):
        return value.tolist()
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def read_meta(path: str | Path) -> dict:
    """config.json of a checkpoint, checked for format and version."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory")
    file = path / CONFIG_FILE
    if not file.is_file():
        raise CheckpointError(f"{file}: missing (not a checkpoint directory, or an interrupted save)")
    try:
        meta = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{file}: not valid JSON ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{file}: not a VLA checkpoint (format {meta.get('format') if isinstance(meta, dict) else None!r}, expected {FORMAT!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{file}: checkpoint format version {meta.get('format_version')!r}; this code reads version {FORMAT_VERSION}")
    for key in ("model", "stats", "lm_config", "tokenizer"):
        if not isinstance(meta.get(key), dict):
            raise CheckpointError(f"{file}: missing section {key!r}")
    return meta


def trained_tasks(path: str | Path) -> list[str]:
    """The tasks a checkpoint was trained on (recorded by `vla train`), without loading the model."""
    return list(read_meta(path).get("training", {}).get("data", {}).get("tasks") or ["reach"])


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> VLAModel:
    """The model of a checkpoint directory, on `device`, in eval mode."""
    path = Path(path)
    meta = read_meta(path)
    config_file = path / CONFIG_FILE
    try:
        config = from_dict(ModelConfig, meta["model"], f"{config_file}: model")
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from exc
    stats = _check_stats(meta["stats"], config, config_file)
    tokenizer = _load_tokenizer(path, meta)
    lm_config = dict(meta["lm_config"])
    try:
        lm_config = AutoConfig.for_model(lm_config.pop("model_type"), **lm_config)
        _check_lm_config(config, lm_config, config_file)
        model = VLAModel(config, stats, tokenizer, AutoModelForCausalLM.from_config(lm_config))
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"{config_file}: cannot build the model: {exc}") from exc
    _load_weights(model, path / WEIGHTS_FILE)
    return model.to(device).eval()


def _check_lm_config(config: ModelConfig, lm_config, file: Path) -> None:
    """A from-scratch LM was built from the model section: both must still agree."""
    if config.pretrained:
        return
    pairs = {"hidden_size": "hidden_size", "num_layers": "num_hidden_layers", "num_heads": "num_attention_heads"}
    differ = [f"model.{ours}={getattr(config, ours)} but lm_config.{theirs}={getattr(lm_config, theirs, None)}"
              for ours, theirs in pairs.items() if getattr(config, ours) != getattr(lm_config, theirs, None)]
    if config.lm_type != lm_config.model_type:
        differ.append(f"model.lm_type={config.lm_type} but lm_config is {lm_config.model_type}")
    if differ:
        raise CheckpointError(f"{file}: the model section does not match the LM config ({'; '.join(differ)})")


def _check_stats(stats: dict, config: ModelConfig, file: Path) -> dict:
    for (group, key), size in STATS_SHAPES.items():
        size = size or config.state_dim
        value = stats.get(group, {}).get(key)
        if value is None or np.shape(value) != (size,) or not np.all(np.isfinite(value)):
            raise CheckpointError(f"{file}: stats.{group}.{key} must be {size} finite numbers, got {value!r}")
    return stats


def _load_tokenizer(path: Path, meta: dict):
    if not (path / TOKENIZER_FILE).is_file():
        raise CheckpointError(f"{path / TOKENIZER_FILE}: missing (the text tokenizer)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # tokenizers raises bare Exceptions on malformed JSON
        raise CheckpointError(f"{path / TOKENIZER_FILE}: cannot load the tokenizer: {exc}") from exc
    expected = meta["tokenizer"].get("text_vocab_size")
    if len(tokenizer) != expected:
        raise CheckpointError(f"{path / TOKENIZER_FILE}: {len(tokenizer)} tokens, but config.json says {expected}")
    return tokenizer


def _load_weights(model: VLAModel, file: Path) -> None:
    if not file.is_file():
        raise CheckpointError(f"{file}: missing (the weights)")
    try:
        with safetensors.safe_open(str(file), "pt") as f:
            shapes = {name: list(f.get_slice(name).get_shape()) for name in f.keys()}
    except (safetensors.SafetensorError, OSError) as exc:
        raise CheckpointError(f"{file}: not a readable safetensors file (truncated or corrupt?): {exc}") from exc
    expected = model.state_dict()
    tied = defaultdict(list)  # tied weights share storage and are stored under one of their names
    for name, tensor in expected.items():
        tied[(tensor.data_ptr(), tuple(tensor.shape))].append(name)
    problems = [f"missing {names[0]}" for names in tied.values() if not any(n in shapes for n in names)]
    problems += [f"unexpected {name}" for name in shapes if name not in expected]
    problems += [f"{name} has shape {shape}, the model expects {list(expected[name].shape)}"
                 for name, shape in shapes.items() if name in expected and shape != list(expected[name].shape)]
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise CheckpointError(f"{file}: does not match config.json ({shown})")
    try:
        safetensors.torch.load_model(model, str(file), strict=True)
    except (safetensors.SafetensorError, RuntimeError, OSError) as exc:
        raise CheckpointError(f"{file}: cannot load the weights: {exc}") from exc
