"""Resumable training state beside a step checkpoint's model: optimizer, scheduler and RNG states
(safetensors + JSON: nothing is unpickled), so that --resume continues exactly as if never
interrupted. With a weight average (optim.ema) the checkpoint's model is the average and the
trained weights are kept here."""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np
import safetensors.torch
import torch

from vla.config import ConfigError
from vla.model.checkpoint import CheckpointError, read_meta

STATE_TENSORS, STATE_JSON = "trainer_state.safetensors", "trainer_state.json"
TRAINED = "trained."  # prefix of the trained weights' tensors


def save_training_state(path: Path, step: int, optimizer, scheduler, trained: torch.nn.Module | None = None) -> None:
    """`trained`: the weights being trained, when the checkpoint beside holds their average."""
    optimizer_state = optimizer.state_dict()
    tensors = {f"optimizer.{pid}.{key}": value.detach().cpu().contiguous()
               for pid, state in optimizer_state["state"].items() for key, value in state.items()}
    if trained is not None:
        tensors.update({f"{TRAINED}{name}": p.detach().cpu().clone() for name, p in trained.named_parameters()})
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    numpy_state = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(numpy_state[1].astype(np.int64))
    safetensors.torch.save_file(tensors, str(path / STATE_TENSORS))
    meta = {"step": step, "param_groups": optimizer_state["param_groups"], "scheduler": scheduler.state_dict(),
            "rng_numpy": [numpy_state[0], *numpy_state[2:]], "rng_python": random.getstate()}
    (path / STATE_JSON).write_text(json.dumps(meta))


def load_training_state(path: Path, optimizer, scheduler, trained: torch.nn.Module | None = None) -> int:
    """Restore optimizer, scheduler and RNG states (and, given `trained`, the trained weights that
    the checkpoint's average came from); -> the step to continue from."""
    check_resumable(path)
    meta = json.loads((path / STATE_JSON).read_text())
    tensors = safetensors.torch.load_file(str(path / STATE_TENSORS))
    load_trained_weights(path, tensors, trained)
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = value
    param_groups = meta["param_groups"]
    for group in param_groups:
        group["betas"] = tuple(group["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})
    scheduler.load_state_dict(meta["scheduler"])
    torch.set_rng_state(tensors["rng.torch"])
    if torch.cuda.is_available():
        cuda = [tensors[f"rng.cuda.{i}"] for i in range(torch.cuda.device_count()) if f"rng.cuda.{i}" in tensors]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
    kind, *rest = meta["rng_numpy"]
    np.random.set_state((kind, tensors["rng.numpy"].numpy().astype(np.uint32), *rest))
    version, internal, gauss = meta["rng_python"]
    random.setstate((version, tuple(internal), gauss))
    return int(meta["step"])


def load_trained_weights(path: Path, tensors: dict, trained: torch.nn.Module | None) -> None:
    saved = any(name.startswith(TRAINED) for name in tensors)
    if saved != (trained is not None):
        raise ConfigError(f"{path} was saved {'with' if saved else 'without'} a weight average (optim.ema); "
                          "resume with the recipe it was trained with")
    with torch.no_grad():
        for name, p in (trained.named_parameters() if trained is not None else ()):
            p.copy_(tensors[f"{TRAINED}{name}"])


def check_resumable(path: Path) -> None:
    """FileNotFoundError unless `path` is a complete step checkpoint with its trainer state."""
    for name in (STATE_TENSORS, STATE_JSON):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path / name}: missing; {path} is not a resumable checkpoint")
    try:
        read_meta(path)
    except CheckpointError as exc:
        raise FileNotFoundError(f"{path} is not a resumable checkpoint: {exc}") from None


def step_checkpoints(out_dir: Path) -> list[Path]:
    """out_dir/checkpoints/step_N directories (not the staging directories of a save under way)."""
    return sorted(p for p in (out_dir / "checkpoints").glob("step_*") if re.fullmatch(r"step_\d+", p.name))


def latest_checkpoint(out_dir: Path) -> Path:
    """The newest complete step checkpoint in out_dir/checkpoints (incomplete ones are passed over)."""
    for step in sorted(step_checkpoints(out_dir), reverse=True):
        try:
            check_resumable(step)
            return step
        except FileNotFoundError:
            continue
    raise FileNotFoundError(f"no complete checkpoint to resume from in {out_dir / 'checkpoints'}")
