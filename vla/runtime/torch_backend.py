"""The torch backend: eager on CPU; on CUDA, bf16 weights, static shapes, a preallocated KV cache
and CUDA graphs, so that a control step is one graph replay plus two small copies.

The autoregressive decoder on CUDA runs RT-2's loop (prefix pass, then one token at a time with
the KV cache) inside a single captured graph: the argmax, the next token's embedding and the cache
writes all stay on the GPU, so nothing waits on the host between tokens.
"""
from __future__ import annotations

import copy
from contextlib import nullcontext

import torch
from transformers import StaticCache

from vla.model.model import VLAModel


class TorchDecoder:
    """Preprocessed inputs -> action bins int64[B, k * 7], eagerly (CPU, or CUDA without graphs)."""

    def __init__(self, model: VLAModel, decoder: str):
        self.model, self.decoder = model, decoder
        cuda = model.device.type == "cuda"
        self.autocast = torch.autocast("cuda", torch.bfloat16) if cuda else nullcontext()

    @torch.inference_mode()
    def __call__(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        with self.autocast:
            return self.model.decode_bins(inputs, self.decoder)


class CudaGraphDecoder:
    """One CUDA graph per batch size, captured on first use, on a bf16 copy of the model (the
    caller's stays as it is): parameters in bf16, buffers such as normalisation statistics fp32,
    matmuls under bf16 autocast."""

    def __init__(self, model: VLAModel, decoder: str):
        if model.device.type != "cuda":
            raise ValueError("CUDA graphs need the model on a CUDA device")
        model = copy.deepcopy(model).eval()
        for parameter in model.parameters():
            parameter.data = parameter.data.to(torch.bfloat16)
        self.model, self.decoder = model, decoder
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, dict, torch.Tensor]] = {}

    def _function(self, batch: int):
        model = self.model
        if self.decoder == "parallel":
            return lambda **inputs: model.forward_parallel(**inputs).argmax(-1)
        length = model.config.prefix_length + model.config.action_tokens
        cache = StaticCache(config=model.lm.config, max_cache_len=length)
        return lambda **inputs: model.generate_autoregressive(**inputs, cache=cache)

    @torch.inference_mode()
    def _capture(self, inputs: dict[str, torch.Tensor]):
        static = {name: tensor.clone() for name, tensor in inputs.items()}
        function = self._function(len(inputs["state"]))
        autocast = torch.autocast("cuda", torch.bfloat16, cache_enabled=False)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), autocast:  # warm-up: lazy allocations happen outside the graph
            for _ in range(2):
                function(**static)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), autocast:
            output = function(**static)
        return graph, static, output

    @torch.inference_mode()
    def __call__(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        batch = len(inputs["state"])
        if batch not in self.graphs:
            self.graphs[batch] = self._capture(inputs)
        graph, static, output = self.graphs[batch]
        for name, tensor in inputs.items():
            static[name].copy_(tensor, non_blocking=True)
        graph.replay()
        return output.clone()
