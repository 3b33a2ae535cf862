"""The onnxruntime backend: the exported parallel decoder (encoders + LM + action head in one
graph), on the best execution provider installed: TensorRT, then CUDA, then CPU."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from vla.model.checkpoint import weights_sha256
from vla.model.model import VLAModel

PROVIDER_PREFERENCE = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
METADATA_KEY = "vla"


class OnnxModelError(ValueError):
    pass


def export_metadata(model: VLAModel, checkpoint: str | Path) -> dict:
    c = model.config
    # the fingerprint ties the file to the checkpoint it came from
    return {"fingerprint": weights_sha256(checkpoint), "prefix_length": c.prefix_length,
            "action_tokens": c.action_tokens, "action_bins": c.action_bins, "image_size": c.image_size,
            "wrist_camera": c.wrist_camera, "decoder": "parallel",
            **({"language_prior": c.language_prior} if c.language_prior else {})}  # older files lack the key


def input_names(model: VLAModel) -> list[str]:
    """The graph's inputs: the processor's tensors; a language prior's states come from outside the
    graph (the processor runs the encoder once per instruction), as text_features."""
    c = model.config
    return (["image", "state", "imu", "text_ids", "text_mask"] + (["wrist_image"] if c.wrist_camera else [])
            + (["text_features"] if c.language_prior else []))


def choose_providers(device: str) -> list[str]:
    available = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    chosen = [p for p in PROVIDER_PREFERENCE if p in available]
    if chosen == ["CPUExecutionProvider"]:
        raise OnnxModelError(f"device {device!r}: onnxruntime has no GPU provider here (available: {available}); "
                             "install onnxruntime-gpu (pip install '.[gpu]') or use device=cpu")
    return chosen


def open_session(path: str | Path, model: VLAModel, checkpoint: str | Path, device: str = "cpu",
                 threads: int = 0) -> ort.InferenceSession:
    """An inference session for `path`, checked against the checkpoint it must come from."""
    path = Path(path)
    if not path.is_file():
        raise OnnxModelError(
            f"{path}: no such ONNX file (export one with `vla export --checkpoint {checkpoint} --onnx {path}`)"
        )
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or min(4, os.cpu_count() or 1)
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    providers = choose_providers(device)  # outside the try: a missing provider is not a corrupt file
    try:
        session = ort.InferenceSession(str(path), options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own exception types for unreadable models
        raise OnnxModelError(f"{path}: not a readable ONNX model (truncated or corrupt?): {exc}") from exc
    found = session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
    if found is None:
        raise OnnxModelError(f"{path}: not exported by `vla export` (no '{METADATA_KEY}' metadata)")
    expected = export_metadata(model, checkpoint)
    found = json.loads(found)
    wrong = {k: (found.get(k), v) for k, v in expected.items() if found.get(k) != v}
    if wrong:
        details = "; ".join(f"{k}: file has {a!r}, checkpoint has {b!r}" for k, (a, b) in wrong.items())
        raise OnnxModelError(
            f"{path}: does not match checkpoint {checkpoint} ({details}); re-export it with `vla export`"
        )
    return session


class OnnxDecoder:
    """Preprocessed inputs -> action bins int64[B, k * 7] through an onnxruntime session."""

    def __init__(self, session: ort.InferenceSession, model: VLAModel):
        self.session, self.names = session, input_names(model)
        self.provider = session.get_providers()[0]

    def logits(self, inputs: dict[str, torch.Tensor]) -> np.ndarray:
        feed = {name: inputs[name].cpu().numpy() for name in self.names}
        return self.session.run(["logits"], feed)[0]

    def __call__(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.from_numpy(self.logits(inputs).argmax(-1))
