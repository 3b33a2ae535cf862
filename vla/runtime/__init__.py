"""One inference API for the policy, the eval loop and the ROS node:

    runtime = load_runtime(checkpoint, backend="torch" | "onnx", device="cpu" | "cuda")
    chunks = runtime.predict(observations)      # float32[B, k, 7]; observations: dict or list
    runtime.name                                # what ran, e.g. "torch cuda-graph bf16, parallel"
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from sim.contracts import ACTION_DIM
from vla.model.checkpoint import load_checkpoint
from vla.model.model import VLAModel

BACKENDS = ("torch", "onnx")


class Runtime:
    def __init__(self, model: VLAModel, decode, name: str):
        self.model, self.decode, self.name = model, decode, name
        self.chunk = model.config.chunk

    def predict(self, observations: dict | list[dict]) -> np.ndarray:
        """Observations (sim.contracts; images of any size) -> action chunks float32[B, k, 7]."""
        inputs = self.model.preprocess(observations)
        bins = self.decode(inputs).to(self.model.device)
        actions = self.model.action_tokenizer.decode(bins.view(len(bins), self.chunk, ACTION_DIM))
        return actions.cpu().numpy()


def torch_runtime(model: VLAModel, decoder: str | None = None, cuda_graphs: bool = False) -> Runtime:
    """A runtime around a model already in memory (e.g. evaluation during training)."""
    from vla.runtime.torch_backend import CudaGraphDecoder, TorchDecoder

    decoder = model.resolve_decoder(decoder)
    device = model.device.type
    if device == "cuda" and cuda_graphs:
        return Runtime(model, CudaGraphDecoder(model, decoder), f"torch cuda cuda-graph bf16, {decoder}")
    precision = "bf16 autocast" if device == "cuda" else "fp32"
    return Runtime(model.eval(), TorchDecoder(model, decoder), f"torch {device} eager {precision}, {decoder}")


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available here; use device 'cpu'")
    if not (device == "cpu" or device.startswith("cuda")):
        raise ValueError(f"device must be 'cpu', 'cuda[:N]' or 'auto', got {device!r}")
    return device


def load_runtime(checkpoint: str | Path, backend: str = "torch", device: str = "auto", decoder: str | None = None,
                 onnx: str | Path | None = None, cuda_graphs: bool = True, threads: int = 0) -> Runtime:
    """`onnx` defaults to <checkpoint>/model.onnx (written by `vla export`). `threads`: intra-op
    threads for CPU inference, torch's (process-wide) or the onnxruntime session's; 0 keeps the
    backend's default. On a CPU shared with other busy processes, 1 avoids busy-waiting workers."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if threads < 0:
        raise ValueError(f"threads must be >= 0 (0: the backend's default), got {threads}")
    device = resolve_device(device)
    if backend == "onnx":
        from vla.runtime.onnx_backend import OnnxDecoder, open_session

        if decoder not in (None, "parallel"):
            raise ValueError("the onnx backend runs the parallel decoder only (the exported graph)")
        model = load_checkpoint(checkpoint, "cpu")  # preprocessing and action decoding only
        session = open_session(onnx or Path(checkpoint) / "model.onnx", model, checkpoint, device, threads)
        run = OnnxDecoder(session, model)
        return Runtime(model, run, f"onnxruntime {run.provider}, parallel")

    if threads:
        torch.set_num_threads(threads)
    return torch_runtime(load_checkpoint(checkpoint, device), decoder, cuda_graphs)
