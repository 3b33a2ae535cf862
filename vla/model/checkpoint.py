"""Checkpoints: a directory like Hugging Face's save_pretrained, holding a model and its processor.

    config.json        format + version, ModelConfig, the dataset's statistics (action quantiles,
                       state and IMU mean/std; a pretrained image encoder's mean/std), the LM's (or
                       VLM's) transformers config, a pretrained vision encoder's, tokenizer facts
                       (its size, the first action bin's id, its file's sha256), the weights' sha256, library
                       versions, and whatever the trainer adds (its config, the step)
    model.safetensors  all weights (safetensors: loading never unpickles code)
    tokenizer.json     the text tokenizer (+ tokenizer_config.json), PreTrainedTokenizerFast

An ensemble is a directory of such checkpoints (member_0, member_1, ...) and ensemble.json naming them;
vla.runtime averages their action chunks.

The checkpoint is self-contained: a pretrained backbone is rebuilt from the saved transformers
configs, not from its original directory. A checkpoint directory appears only once complete. Loading checks
every file (the config's types and bounds, the statistics, the weights' and tokenizer's checksums, the
shapes) and fails with CheckpointError naming the file and the problem.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np
import safetensors
import safetensors.torch
import torch
import transformers
from transformers import AutoConfig, AutoModel, AutoTokenizer

import vla
from vla.config import ConfigError, from_dict, to_dict
from vla.contracts.action import ACTION_DIM, ACTION_HIGH, ACTION_LOW
from vla.contracts.observation import IMU_CHANNELS, IMU_LIMITS, STATE_DIM, STATE_LIMIT
from vla.files import atomic_directory
from vla.model.config import ModelConfig
from vla.model.language_prior import LanguagePriorError
from vla.model.model import VLAModel, build_lm, lm_from_config, load_backbone
from vla.model.processor import Processor, vocabulary
from vla.model.text import build_tokenizer
from vla.model.vlm import image_statistics, load_vision_encoder

FORMAT, FORMAT_VERSION = "vla-checkpoint", 1
CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE = "config.json", "model.safetensors", "tokenizer.json"
MAX_VOCABULARY = 100_000  # words of the training instructions
MAX_ERROR_CHARS = 300  # values quoted in errors are cut to this
ENSEMBLE_FORMAT, ENSEMBLE_FILE, MAX_MEMBERS = "vla-ensemble", "ensemble.json", 8


class CheckpointError(ValueError):
    pass


def versions() -> dict[str, str]:
    return {"vla": vla.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "safetensors": safetensors.__version__}


def untrained_stats() -> dict:
    """Statistics for a model that has seen no data (tests, benchmarks of random weights): the action
    limits as its 1 %/99 % quantiles, state and IMU as standard normal."""
    return {"action": {"q01": ACTION_LOW.tolist(), "q99": ACTION_HIGH.tolist()},
            "state": {"mean": [0.0] * STATE_DIM, "std": [1.0] * STATE_DIM},
            "imu": {"mean": [0.0] * IMU_CHANNELS, "std": [1.0] * IMU_CHANNELS}}


def create(config: ModelConfig, stats: dict, corpus: list[str], instructions=()) -> tuple[VLAModel, Processor]:
    """A new, untrained model and its processor: a from-scratch LM with a BPE tokenizer trained on
    the instruction `corpus` (and the training `instructions`, whose words the processor keeps as
    the words it knows), or the pretrained backbone of `config.pretrained` and its tokenizer;
    a pretrained vision encoder for vision: pretrained. vlm.BackboneError (one line) for a backbone
    directory that does not hold what the config asks for."""
    if config.vision in ("pretrained", "vlm"):  # checked before any weights are read
        stats = {**stats, "image": image_statistics(config)}
    if config.pretrained:
        tokenizer, lm = load_backbone(config)
    else:
        tokenizer = build_tokenizer([*corpus, *instructions], config.text_vocab_size)
        lm = build_lm(config, len(tokenizer) + config.action_bins, tokenizer.pad_token_id)
    vision = load_vision_encoder(config.vision_pretrained) if config.vision == "pretrained" else None
    processor = Processor(config, stats, tokenizer, vocabulary(instructions) if instructions else None)
    # the bins are the table's last rows (after the tokenizer, and after a pretrained table's padding)
    ids = replace(processor.ids, action_offset=lm.get_input_embeddings().num_embeddings - config.action_bins)
    return VLAModel(config, stats, ids, lm, vision), processor


def save_checkpoint(path: str | Path, model: VLAModel, processor: Processor, extra: dict | None = None,
                    also=None) -> Path:
    """Write the checkpoint directory (replacing one already there, which stays intact until the new
    one is complete). `also(directory)` may add files (a trainer's state) before it appears."""
    path = Path(path)
    with atomic_directory(path) as staging:
        processor.tokenizer.save_pretrained(staging)
        # save_model drops the duplicate names of tied weights, which safetensors cannot store twice.
        safetensors.torch.save_model(model, str(staging / WEIGHTS_FILE), metadata={"format": FORMAT})
        meta = {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "model": to_dict(model.config), "stats": processor.stats, "lm_config": model.lm.config.to_dict(),
            **({"vision_config": model.vision_tower.config.to_dict()} if model.config.vision == "pretrained" else {}),
            "tokenizer": {"text_vocab_size": len(processor.tokenizer), "action_token_offset": model.action_offset,
                          "sha256": file_sha256(staging / TOKENIZER_FILE)},
            **({"vocabulary": sorted(processor.vocabulary)} if processor.vocabulary is not None else {}),
            "weights_sha256": weights_sha256(staging), "versions": versions(), **(extra or {}),
        }
        (staging / CONFIG_FILE).write_text(json.dumps(meta, indent=1, default=_jsonable))
        if also is not None:
            also(staging)
    return path


def weights_sha256(checkpoint: str | Path) -> str:
    """sha256 of a checkpoint's weights file (also what ties an ONNX export to its checkpoint)."""
    return file_sha256(Path(checkpoint) / WEIGHTS_FILE)


def file_sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _jsonable(value):
    if isinstance(value, (np.ndarray, np.generic)):
        return value.tolist()
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _quote(value) -> str:
    text = repr(value)
    return text if len(text) <= MAX_ERROR_CHARS else text[:MAX_ERROR_CHARS] + "..."


def read_meta(path: str | Path) -> dict:
    """config.json of a checkpoint, checked for format and version."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory")
    file = path / CONFIG_FILE
    if not file.is_file() and (path / ENSEMBLE_FILE).is_file():
        raise CheckpointError(f"{path}: an ensemble of checkpoints, not one; name one of its members "
                              f"({path / 'member_0'}, ...) where a single one is needed")
    if not file.is_file():
        raise CheckpointError(f"{file}: missing (not a checkpoint directory, or an interrupted save)")
    try:
        meta = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{file}: not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise CheckpointError(f"{file}: not a VLA checkpoint (format {_quote(found)}, expected {FORMAT!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{file}: checkpoint format version {_quote(meta.get('format_version'))}; "
                              f"this code reads version {FORMAT_VERSION}")
    for key in ("model", "stats", "lm_config", "tokenizer"):
        if not isinstance(meta.get(key), dict):
            raise CheckpointError(f"{file}: missing section {key!r}")
    return meta


def trained_tasks(path: str | Path) -> list[str]:
    """The tasks a checkpoint (or an ensemble's first member) was trained on (recorded by `vla train`),
    without loading the model."""
    training = read_meta((ensemble_members(path) or [path])[0]).get("training")
    data = training.get("data") if isinstance(training, dict) else None
    tasks = data.get("tasks") if isinstance(data, dict) else None
    return [str(t) for t in tasks] if isinstance(tasks, list) and tasks else ["reach"]


def ensemble_members(path: str | Path) -> list[Path]:
    """The member checkpoints of an ensemble directory, [] for a single checkpoint."""
    file = Path(path) / ENSEMBLE_FILE
    if not file.is_file():
        return []
    try:
        meta = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{file}: not valid JSON ({exc})") from None
    members = meta.get("members") if isinstance(meta, dict) else None
    if not (isinstance(meta, dict) and meta.get("format") == ENSEMBLE_FORMAT and isinstance(members, list)
            and 1 <= len(members) <= MAX_MEMBERS
            and all(isinstance(m, str) and m.startswith("member_") and Path(m).name == m for m in members)):
        raise CheckpointError(f"{file}: not a VLA ensemble (format {ENSEMBLE_FORMAT!r} and 1-{MAX_MEMBERS} "
                              f"member_* directory names), got {_quote(meta)}")
    members = [Path(path) / m for m in members]
    _check_alike(members)  # on disk, members may have been replaced since the ensemble was saved
    return members


def _check_alike(checkpoints: list[str | Path]) -> None:
    """Ensemble members must be trained on the same tasks, take the same observations and predict
    chunks of the same length."""
    def signature(checkpoint):
        model = from_dict(ModelConfig, read_meta(checkpoint)["model"])
        return model.spec, model.chunk, trained_tasks(checkpoint)

    first = signature(checkpoints[0])
    for checkpoint in checkpoints[1:]:
        if signature(checkpoint) != first:
            raise CheckpointError(f"{checkpoint}: trained on other tasks, or takes other observations or predicts "
                                  f"chunks of another length than {checkpoints[0]}; an ensemble's members must agree")


def save_ensemble(path: str | Path, checkpoints: list[str | Path]) -> Path:
    """An ensemble directory holding copies of `checkpoints`, which must be trained on the same tasks,
    take the same observations and predict chunks of the same length (replacing one already there once
    complete)."""
    if not 2 <= len(checkpoints) <= MAX_MEMBERS:
        raise CheckpointError(f"an ensemble takes 2-{MAX_MEMBERS} checkpoints, got {len(checkpoints)}")
    _check_alike(checkpoints)
    names = [f"member_{i}" for i in range(len(checkpoints))]
    with atomic_directory(path) as staging:
        for name, checkpoint in zip(names, checkpoints):
            shutil.copytree(checkpoint, staging / name)
        (staging / ENSEMBLE_FILE).write_text(json.dumps({"format": ENSEMBLE_FORMAT, "members": names}, indent=1))
    return Path(path)


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[VLAModel, Processor]:
    """The model (on `device`, in eval mode) and processor of a checkpoint directory."""
    path = Path(path)
    meta = read_meta(path)
    config_file = path / CONFIG_FILE
    try:
        config = from_dict(ModelConfig, meta["model"], f"{config_file}: model")
    except ConfigError as exc:
        raise CheckpointError(str(exc)[:MAX_ERROR_CHARS * 2]) from None
    stats = _check_stats(meta["stats"], config, config_file)
    tokenizer = _load_tokenizer(path, meta)
    offset = meta["tokenizer"].get("action_token_offset")
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < len(tokenizer):
        raise CheckpointError(f"{config_file}: tokenizer.action_token_offset must be an integer from the tokenizer's "
                              f"size {len(tokenizer)} on, got {_quote(offset)}")
    known = _vocabulary(meta.get("vocabulary"), config_file)
    shapes = _stored_shapes(path, meta.get("weights_sha256"))
    lm_config = _lm_config(meta["lm_config"], config, config_file)
    vision_config = _vision_config(meta.get("vision_config"), config, config_file)

    try:
        processor = Processor(config, stats, tokenizer, known)
    except LanguagePriorError as exc:
        raise CheckpointError(f"{config_file}: {exc}") from None
    except ValueError as exc:
        raise CheckpointError(f"{config_file}: cannot build the processor: {_quote(str(exc))}") from None

    def build() -> VLAModel:
        try:
            ids = replace(processor.ids, action_offset=offset)
            vision = AutoModel.from_config(vision_config, dtype=torch.float32) if vision_config else None
            return VLAModel(config, stats, ids, lm_from_config(lm_config), vision)
        except Exception as exc:  # transformers and torch raise many types for values they cannot build
            raise CheckpointError(f"{config_file}: cannot build the model: {_quote(str(exc))}") from None

    with torch.device("meta"):  # the architecture without memory
        _check_shapes(build(), shapes, path / WEIGHTS_FILE)
    model = build()
    _load_weights(model, path / WEIGHTS_FILE)
    return model.to(device).eval(), processor


# Switches of a transformers config that change what the LM returns; VLAModel relies on these values.
LM_OUTPUTS = {"return_dict": True, "output_hidden_states": False, "output_attentions": False}


def _lm_config(values: dict, config: ModelConfig, file: Path):
    """The LM's transformers config from config.json's lm_config, checked against the model section."""
    lm_config = _transformers_config(values, "lm_config", file)
    _check_lm_config(config, lm_config, file)
    return lm_config


def _vision_config(values, config: ModelConfig, file: Path):
    """The vision encoder's transformers config (vision: pretrained), else None."""
    if (config.vision == "pretrained") != isinstance(values, dict):
        raise CheckpointError(f"{file}: a vision_config section goes with model.vision: pretrained, and only with it")
    return _transformers_config(values, "vision_config", file) if values else None


def _transformers_config(values: dict, section: str, file: Path):
    values = dict(values)
    try:
        transformers_config = AutoConfig.for_model(values.pop("model_type"), **values)
    except Exception as exc:  # transformers validates field types with its own exception types
        raise CheckpointError(f"{file}: invalid {section}: {_quote(str(exc))}") from None
    changed = {key: getattr(transformers_config, key, None) for key, value in LM_OUTPUTS.items()
               if getattr(transformers_config, key, None) is not value}
    if changed:
        raise CheckpointError(f"{file}: {section} sets {_quote(changed)}; a VLA model needs {LM_OUTPUTS}")
    return transformers_config


def _check_lm_config(config: ModelConfig, lm_config, file: Path) -> None:
    """A from-scratch LM was built from the model section: both must still agree."""
    if config.pretrained:
        return
    pairs = {"hidden_size": "hidden_size", "num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
             "intermediate_size": "intermediate_size"}
    differ = [f"model.{ours}={getattr(config, ours)} but lm_config.{theirs}={_quote(getattr(lm_config, theirs, None))}"
              for ours, theirs in pairs.items() if getattr(config, ours) != getattr(lm_config, theirs, None)]
    if config.lm_type != lm_config.model_type:
        differ.append(f"model.lm_type={_quote(config.lm_type)} but lm_config is {_quote(lm_config.model_type)}")
    if differ:
        raise CheckpointError(f"{file}: the model section does not match the LM config ({'; '.join(differ)})")


# What the statistics may hold: (group, key) -> (channels, largest magnitude, must be positive).
# Recorded actions are clipped to the limits, so their quantiles lie within them.
_STATS = {("action", "q01"): (ACTION_DIM, None, False), ("action", "q99"): (ACTION_DIM, None, False),
          ("state", "mean"): (None, STATE_LIMIT, False), ("state", "std"): (None, STATE_LIMIT, True),
          ("imu", "mean"): (IMU_CHANNELS, IMU_LIMITS, False), ("imu", "std"): (IMU_CHANNELS, IMU_LIMITS, True)}
# a pretrained image encoder's normalisation, in pixel values
_IMAGE_STATS = {("image", "mean"): (3, 1e4, False), ("image", "std"): (3, 1e4, True)}


def _check_stats(stats: dict, config: ModelConfig, file: Path) -> dict:
    groups = _STATS | (_IMAGE_STATS if config.vision in ("pretrained", "vlm") else {})
    for (group, key), (size, limit, positive) in groups.items():
        size = size or config.state_dim
        section = stats.get(group)
        value = section.get(key) if isinstance(section, dict) else None
        where = f"{file}: stats.{group}.{key}"
        try:
            array = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError):
            raise CheckpointError(f"{where} must be {size} numbers, got {_quote(value)}") from None
        if array.shape != (size,) or not np.all(np.isfinite(array)):
            raise CheckpointError(f"{where} must be {size} finite numbers, got {_quote(value)}")
        low, high = (ACTION_LOW, ACTION_HIGH) if group == "action" else (-limit, limit)
        if np.any(array < low - 1e-6) or np.any(array > high + 1e-6) or (positive and np.any(array < 0)):
            raise CheckpointError(f"{where} is outside what the data can hold ({_quote(array.tolist())})")
    if np.any(np.asarray(stats["action"]["q99"]) < np.asarray(stats["action"]["q01"])):
        raise CheckpointError(f"{file}: stats.action.q99 is below q01")
    return stats


def _vocabulary(words, file: Path) -> frozenset[str] | None:
    """The words the model was trained on (None for checkpoints from before they were kept)."""
    if words is None:
        return None
    if not (isinstance(words, list) and len(words) <= MAX_VOCABULARY
            and all(isinstance(w, str) and 0 < len(w) <= 64 for w in words)):
        raise CheckpointError(f"{file}: vocabulary must be a list of at most {MAX_VOCABULARY} words, "
                              f"got {_quote(words)}")
    return frozenset(words)


def _load_tokenizer(path: Path, meta: dict):
    if not (path / TOKENIZER_FILE).is_file():
        raise CheckpointError(f"{path / TOKENIZER_FILE}: missing (the text tokenizer)")
    # The tokenizer is trained on each run's instructions: another run's file loads without complaint
    # and turns every instruction into other ids (a reach policy fell from 100 to 10 %). Checkpoints
    # saved before the checksum have none.
    sha256 = meta["tokenizer"].get("sha256")
    if sha256 is not None and file_sha256(path / TOKENIZER_FILE) != sha256:
        raise CheckpointError(
            f"{path / TOKENIZER_FILE}: does not match the checksum in config.json (from another checkpoint?)"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # tokenizers raises bare Exceptions on malformed JSON
        raise CheckpointError(f"{path / TOKENIZER_FILE}: cannot load the tokenizer: {_quote(str(exc))}") from None
    expected = meta["tokenizer"].get("text_vocab_size")
    if len(tokenizer) != expected:
        raise CheckpointError(
            f"{path / TOKENIZER_FILE}: {len(tokenizer)} tokens, but config.json says {_quote(expected)}"
        )
    return tokenizer


def _stored_shapes(path: Path, sha256: str | None) -> dict[str, list[int]]:
    """The name and shape of every tensor in the weights file, after checking its checksum."""
    file = path / WEIGHTS_FILE
    if not file.is_file():
        raise CheckpointError(f"{file}: missing (the weights)")
    if sha256 is not None and weights_sha256(path) != sha256:  # checkpoints before the checksum have none
        raise CheckpointError(f"{file}: the weights do not match the checksum in config.json (damaged or replaced)")
    try:
        with safetensors.safe_open(str(file), "pt") as f:
            return {name: list(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118 (a safe_open handle, not a dict)
    except (safetensors.SafetensorError, OSError) as exc:
        raise CheckpointError(
            f"{file}: not a readable safetensors file (truncated or corrupt?): {_quote(str(exc))}"
        ) from None


def _check_shapes(skeleton: VLAModel, shapes: dict[str, list[int]], file: Path) -> None:
    """The weights file holds exactly the tensors of the model config.json describes (checked on the
    meta device, before building a model that could ask for terabytes)."""
    expected = skeleton.state_dict(keep_vars=True)
    tied = defaultdict(list)  # tied weights are one tensor under several names, stored under one of them
    for name, tensor in expected.items():
        tied[id(tensor)].append(name)
    problems = [f"missing {names[0]}" for names in tied.values() if not any(n in shapes for n in names)]
    problems += [f"unexpected {name}" for name in shapes if name not in expected]
    problems += [
        f"{name} has shape {shape}, the model expects {list(expected[name].shape)}"
        for name, shape in shapes.items()
        if name in expected and shape != list(expected[name].shape)
    ]
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise CheckpointError(f"{file}: does not match config.json ({shown})")


def _load_weights(model: VLAModel, file: Path) -> None:
    try:
        safetensors.torch.load_model(model, str(file), strict=True)
    except (safetensors.SafetensorError, RuntimeError, OSError) as exc:
        raise CheckpointError(f"{file}: cannot load the weights: {_quote(str(exc))}") from None
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise CheckpointError(f"{file}: the weights contain NaN or inf")
