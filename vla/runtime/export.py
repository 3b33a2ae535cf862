"""`vla export --checkpoint DIR --onnx OUT.onnx`: the parallel decoder (encoders + LM + action
head) as one ONNX graph with a dynamic batch axis. It is validated with onnxruntime against
PyTorch on recorded observations (a dataset, or observations the scripted expert meets in sim)
and written only if the greedy bins agree and the logits are within tolerance."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from vla.model.checkpoint import load_checkpoint, trained_tasks
from vla.model.model import VLAModel
from vla.runtime.onnx_backend import METADATA_KEY, OnnxDecoder, export_metadata, input_names, open_session

OPSET = 18
RTOL = 1e-4
# protobuf caps one file at 2 GiB: weights from this size on go to <out>.data beside the graph
EXTERNAL_DATA_BYTES = 1 << 30


class ExportError(ValueError):
    pass


class ParallelLogits(torch.nn.Module):
    def __init__(self, model: VLAModel):
        super().__init__()
        self.model = model

    def forward(self, image, state, imu, text_ids, text_mask, wrist_image=None):
        return self.model.forward_parallel(image, state, imu, text_ids, text_mask, wrist_image)


def sim_observations(model: VLAModel, tasks: list[str], count: int, seed: int = 2_000_000) -> list[dict]:
    """Observations along scripted-expert episodes (seeds outside training and evaluation)."""
    from policies import load_policy
    from sim import SimConfig, make_env

    observations = []
    for i in range(count):
        env = make_env(tasks[i % len(tasks)], SimConfig(image_size=model.config.image_size, wrist_camera=model.config.wrist_camera))
        expert = load_policy("expert", env)
        obs, _ = env.reset(seed=seed + i)
        expert.reset(obs["instruction"])
        for _ in range(1 + i % 5):  # a few steps in, so the arm is somewhere else each time
            obs, *_ = env.step(expert.act(obs))
        observations.append(obs)
        env.close()
    return observations


def dataset_observations(dataset: str | Path, model: VLAModel, count: int) -> list[dict]:
    from vla.episodes.index import EpisodeIndex

    index = EpisodeIndex(dataset, image_size=model.config.image_size, progress=False)
    picks = np.random.default_rng(0).choice(len(index), size=min(count, len(index)), replace=False)
    return [index[int(i)] for i in picks]


def export_onnx(model: VLAModel, checkpoint: str | Path, out: str | Path, observations: list[dict], atol: float = 1e-3,
                external_data_bytes: int = EXTERNAL_DATA_BYTES) -> dict:
    """Export `model` (loaded from `checkpoint` on the CPU), validate, then move into place (weights
    of `external_data_bytes` or more in `<out>.data`); raises ExportError (writing nothing) on failure."""
    out = Path(out)
    if "parallel" not in model.config.decoders:
        raise ExportError(f"{checkpoint}: the ONNX graph is the parallel decoder, which this model was not trained with "
                          f"(decoders: {list(model.config.decoders)})")
    inputs = model.preprocess(observations)
    names = input_names(model)
    staging = out.with_name(out.name + ".partial")  # a directory: the graph and its weights file
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    partial, data_name = staging / out.name, out.name + ".data"
    try:  # whatever fails, nothing is left behind but what was there before
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer chatter about transformers' Python-side mask checks
            batch = torch.export.Dim("batch", min=1, max=1024)
            torch.onnx.export(ParallelLogits(model), tuple(inputs[n] for n in names), str(partial), input_names=names,
                              output_names=["logits"], dynamic_shapes={n: {0: batch} for n in names},
                              opset_version=OPSET, dynamo=True, external_data=False, verbose=False)
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
    finally:
        shutil.rmtree(staging, ignore_errors=True)
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
    report = {"samples": len(expected), "tokens": int(expected.shape[0] * expected.shape[1]), "bins_disagreeing": disagree,
              "max_abs_logit_error": float(error.max()), "logits_outside_tolerance": outside, "atol": atol, "rtol": RTOL,
              "bytes": sum(f.stat().st_size for f in (path, path.with_name(path.name + ".data")) if f.exists())}
    if disagree or outside:
        raise ExportError(f"ONNX validation failed, nothing written: {disagree} bins disagree, {outside} logits outside "
                          f"atol {atol:.0e} + rtol {RTOL:.0e} (max error {error.max():.2e})")
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--onnx", help="output file (default: <checkpoint>/model.onnx, where the onnx runtime looks)")
    parser.add_argument("--data", help="a dataset directory to take validation observations from (default: sim)")
    parser.add_argument("--samples", type=int, default=32, help="validation observations")
    parser.add_argument("--atol", type=float, default=1e-3, help="logit tolerance")


def run(args) -> int:
    out = Path(args.onnx or Path(args.checkpoint) / "model.onnx")
    model = load_checkpoint(args.checkpoint, "cpu")
    if args.data:
        observations = dataset_observations(args.data, model, args.samples)
    else:
        observations = sim_observations(model, trained_tasks(args.checkpoint), args.samples)
    report = export_onnx(model, args.checkpoint, out, observations, args.atol)
    print(f"wrote {out} ({report['bytes'] / 1e6:.1f} MB); validated on {report['samples']} observations: "
          f"{report['bins_disagreeing']} bins disagree, max logit error {report['max_abs_logit_error']:.2e}")
    return 0
