"""One inference API for the policy, the eval loop and the ROS node:

    runtime = load_runtime(checkpoint, backend="torch" | "onnx", device="cpu" | "cuda")
    chunks = runtime.predict(observations)      # float32[B, k, 7]; observations: dict or list
    runtime.name                                # what ran, e.g. "torch cuda-graph bf16, parallel"

An ensemble checkpoint (vla.model.checkpoint.save_ensemble) runs every member and averages their chunks.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from vla.model.checkpoint import ensemble_members, load_checkpoint
from vla.model.model import VLAModel
from vla.model.processor import Processor

BACKENDS = ("torch", "onnx")


class Runtime:
    """`decode(inputs) -> bins` runs the model (torch or onnxruntime); the processor turns
    observations into its inputs and its bins into actions."""

    def __init__(self, processor: Processor, decode, device: torch.device | str, name: str):
        self.processor, self.decode, self.device, self.name = processor, decode, device, name
        self.config = processor.config
        self.chunk = processor.config.chunk

    def predict(self, observations: dict | list[dict]) -> np.ndarray:
        """Observations (vla.contracts; images of any size) -> action chunks float32[B, k, 7],
        always inside the action limits. ValueError for an unusable observation."""
        return self.processor.actions(self.decode(self.processor.inputs(observations, self.device)))


class EnsembleRuntime:
    """Members' runtimes on the same observations, their chunks averaged: policies trained apart (seeds,
    data) err apart, and their mean less (docs/all-tasks-cpu.md). Speaks for the first member otherwise
    (its processor, config and chunk length, which the others share: ensemble_members checks)."""

    def __init__(self, members: list[Runtime]):
        first = members[0]
        self.members, self.processor, self.device = members, first.processor, first.device
        self.config, self.chunk = first.config, first.chunk
        self.name = f"ensemble of {len(members)}, {first.name}"

    def predict(self, observations: dict | list[dict]) -> np.ndarray:
        """As Runtime.predict: the mean of chunks inside the limits is inside them."""
        return np.mean([member.predict(observations) for member in self.members], axis=0, dtype=np.float32)


def torch_runtime(
    model: VLAModel, processor: Processor, decoder: str | None = None, cuda_graphs: bool = False
) -> Runtime:
    """A runtime around a model already in memory (e.g. evaluation during training)."""
    from vla.runtime.torch_backend import CudaGraphDecoder, TorchDecoder

    decoder = model.resolve_decoder(decoder)
    device = model.device
    if device.type == "cuda" and cuda_graphs:
        return Runtime(processor, CudaGraphDecoder(model, decoder), device, f"torch cuda cuda-graph bf16, {decoder}")
    precision = "bf16 autocast" if device.type == "cuda" else "fp32"
    return Runtime(
        processor, TorchDecoder(model.eval(), decoder), device, f"torch {device.type} eager {precision}, {decoder}"
    )


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available here; use device 'cpu'")
    if not (device == "cpu" or device.startswith("cuda")):
        raise ValueError(f"device must be 'cpu', 'cuda[:N]' or 'auto', got {device!r}")
    return device


def load_runtime(
    checkpoint: str | Path,
    backend: str = "torch",
    device: str = "auto",
    decoder: str | None = None,
    onnx: str | Path | None = None,
    cuda_graphs: bool = True,
    threads: int = 0,
) -> Runtime | EnsembleRuntime:
    """`onnx` defaults to <checkpoint>/model.onnx (written by `vla export`; an ensemble's members each
    have theirs, and take no `onnx`). `threads`: intra-op
    threads for CPU inference, torch's (process-wide) or the onnxruntime session's; 0 keeps the
    backend's default. On a CPU shared with other busy processes, 1 avoids busy-waiting workers."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if threads < 0:
        raise ValueError(f"threads must be >= 0 (0: the backend's default), got {threads}")
    device = resolve_device(device)
    members = ensemble_members(checkpoint)
    if members:
        if onnx is not None:
            raise ValueError(f"{checkpoint} is an ensemble: each member runs its own model.onnx, no other")
        return EnsembleRuntime([load_runtime(m, backend, device, decoder, None, cuda_graphs, threads) for m in members])
    if backend == "onnx":
        from vla.runtime.onnx_backend import OnnxDecoder, open_session

        if decoder not in (None, "parallel"):
            raise ValueError("the onnx backend runs the parallel decoder only (the exported graph)")
        model, processor = load_checkpoint(checkpoint, "cpu")  # for the export's metadata check only
        session = open_session(onnx or Path(checkpoint) / "model.onnx", model, checkpoint, device, threads)
        run = OnnxDecoder(session, model)
        return Runtime(processor, run, "cpu", f"onnxruntime {run.provider}, parallel")

    if threads:
        torch.set_num_threads(threads)
    return torch_runtime(*load_checkpoint(checkpoint, device), decoder, cuda_graphs)
