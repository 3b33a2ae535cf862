"""ONNX export: the parallel decoder (encoders + LM + action head) as one ONNX graph with a dynamic
batch axis, validated with onnxruntime against PyTorch on observations and written only if the
greedy bins agree and the logits are within tolerance (`vla export`)."""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from vla.files import staging_directory
from vla.model.model import VLAModel
from vla.model.processor import Processor
from vla.runtime.onnx_backend import METADATA_KEY, OnnxDecoder, export_metadata, input_names, open_session

OPSET = 18
RTOL = 1e-4
# protobuf caps one file at 2 GiB: weights from this size on go to <out>.data beside the graph
EXTERNAL_DATA_BYTES = 1 << 30


class ExportError(ValueError):
    pass


class ParallelLogits(torch.nn.Module):
    """forward_parallel with its inputs in the order of the graph's input names."""

    def __init__(self, model: VLAModel):
        super().__init__()
        self.model, self.names = model, input_names(model)

    def forward(self, *inputs):
        return self.model.forward_parallel(**dict(zip(self.names, inputs)))


def export_onnx(
    model: VLAModel,
    processor: Processor,
    checkpoint: str | Path,
    out: str | Path,
    observations: list[dict],
    atol: float = 1e-3,
    external_data_bytes: int = EXTERNAL_DATA_BYTES,
) -> dict:
    """Export `model` (loaded from `checkpoint` on the CPU), validate, then move into place (weights
    of `external_data_bytes` or more in `<out>.data`); raises ExportError (writing nothing) on failure."""
    out = Path(out)
    if "parallel" not in model.config.decoders:
        raise ExportError(
            f"{checkpoint}: the ONNX graph is the parallel decoder, which this model was not trained with "
            f"(decoders: {list(model.config.decoders)})"
        )
    inputs = processor.inputs(observations)
    names = input_names(model)
    # whatever fails, nothing is left behind but what was there before
    with staging_directory(out.with_name(out.name + ".partial")) as staging:
        partial, data_name = staging / out.name, out.name + ".data"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer chatter about transformers' Python-side mask checks
            batch = torch.export.Dim("batch", min=1, max=1024)
            torch.onnx.export(
                ParallelLogits(model),
                tuple(inputs[n] for n in names),
                str(partial),
                input_names=names,
                output_names=["logits"],
                dynamic_shapes=(tuple({0: batch} for _ in names),),  # forward(*inputs)
                opset_version=OPSET,
                dynamo=True,
                external_data=False,
                verbose=False,
            )
        graph = onnx.load(str(partial))  # with the weights the exporter itself put beside a large graph
        for written in staging.iterdir():
            written.unlink()
        onnx.helper.set_model_props(graph, {METADATA_KEY: json.dumps(export_metadata(model, checkpoint))})
        external = sum(p.numel() * p.element_size() for p in model.parameters()) >= external_data_bytes
        onnx.save(graph, str(partial), save_as_external_data=external, all_tensors_to_one_file=True, location=data_name)
        report = validate(partial, model, checkpoint, inputs, atol)
        # the weights first, then the graph that names them; a weights file of an earlier export goes
        if external:
            os.replace(staging / data_name, out.with_name(data_name))
        else:
            out.with_name(data_name).unlink(missing_ok=True)
        os.replace(partial, out)
    return report


def validate(path: Path, model: VLAModel, checkpoint, inputs: dict, atol: float) -> dict:
    """Greedy bins must agree wherever PyTorch's top two logits differ by more than 2 * atol (a
    closer call is a tie that rounding may break either way) and logits must be within
    atol + RTOL * |logit|, as numpy.allclose."""
    with torch.inference_mode():
        expected = model.forward_parallel(**inputs).numpy()
    got = OnnxDecoder(open_session(path, model, checkpoint), model).logits(inputs)
    top2 = np.sort(expected, axis=-1)[..., -2:]
    decisive = (top2[..., 1] - top2[..., 0]) > 2 * atol
    disagree = int(((got.argmax(-1) != expected.argmax(-1)) & decisive).sum())
    error = np.abs(got - expected)
    outside = int((error > atol + RTOL * np.abs(expected)).sum())
    report = {
        "samples": len(expected),
        "tokens": int(expected.shape[0] * expected.shape[1]),
        "bins_disagreeing": disagree,
        "max_abs_logit_error": float(error.max()),
        "logits_outside_tolerance": outside,
        "atol": atol,
        "rtol": RTOL,
        "bytes": sum(f.stat().st_size for f in (path, path.with_name(path.name + ".data")) if f.exists()),
    }
    if disagree or outside:
        raise ExportError(
            f"ONNX validation failed, nothing written: {disagree} bins disagree, {outside} logits outside "
            f"atol {atol:.0e} + rtol {RTOL:.0e} (max error {error.max():.2e})"
        )
    return report
