"""Latency per control step (observation in, action chunk out, preprocessing included) of every
decoder and backend, against a naive Hugging Face `generate` baseline measured in the same run.

    python benchmarks/inference_latency.py [--checkpoint DIR] [--device cpu|cuda]
        [--models default,0.5b,smolvlm-250m,smolvlm-500m]

Rows: hf-generate (baseline: `lm.generate` over the multimodal prefix, logits restricted to the
action ids), autoregressive and parallel decoders (eager; on CUDA also as CUDA graphs with a
static KV cache), onnxruntime. Models: the given checkpoint (default: the shipped one, else a
randomly initialised default model; a checkpoint trained without the autoregressive decoder is
timed as a random-weight model of its config with both decoders), a ~0.5B-parameter Llama-style
backbone, and pretrained-style VLM backbones of the shapes of SmolVLM-256M and -500M (vision tower,
connector and LM, the model section of policies/configs/smolvlm-gpu.yaml: 256 px, 16 image tokens,
chunks of 8), all with random weights (timing does not depend on the weights).
With a language prior (model.language_prior) it also prints what encoding a new instruction costs.
Targets: H100, default model <= 1 ms p50 and 0.5B <= 4 ms p50, both >= 20x the baseline;
2 CPU cores with onnxruntime, default model <= 10 ms p50.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from transformers import LogitsProcessor, LogitsProcessorList

from policies import CHECKPOINT_DIR
from sim import language
from vla.apps.train.recipe import load_config
from vla.config import from_dict
from vla.model import ModelConfig, VLAModel, create
from vla.model.checkpoint import ensemble_members, read_meta, save_checkpoint, untrained_stats
from vla.model.random_backbones import save_random_vlm
from vla.runtime import Runtime, load_runtime
from vla.runtime.export import export_onnx
from vla.runtime.onnx_backend import OnnxModelError, choose_providers

BIG_BACKBONE = dict(hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=5504)
VLMS = {"smolvlm-250m": "250m", "smolvlm-500m": "500m"}
VLM_RECIPE = Path(__file__).parents[1] / "policies" / "configs" / "smolvlm-gpu.yaml"


class OnlyActions(LogitsProcessor):
    def __init__(self, offset: int, bins: int):
        self.offset, self.bins = offset, bins

    def __call__(self, input_ids, scores):
        masked = torch.full_like(scores, float("-inf"))
        masked[:, self.offset:self.offset + self.bins] = scores[:, self.offset:self.offset + self.bins]
        return masked


class HFGenerate:
    """The baseline: transformers' generate() over the prefix embeddings, as OpenVLA decodes."""

    def __init__(self, model: VLAModel):
        self.model = model
        self.processors = LogitsProcessorList([OnlyActions(model.action_offset, model.config.action_bins)])
        self.autocast = (
            torch.autocast("cuda", torch.bfloat16)
            if model.device.type == "cuda"
            else torch.autocast("cpu", enabled=False)
        )

    @torch.inference_mode()
    def __call__(self, inputs):
        with self.autocast:
            embeds, mask, _ = self.model.embed_prefix(**inputs)
            n = self.model.config.action_tokens
            tokens = self.model.lm.generate(
                inputs_embeds=embeds,
                attention_mask=mask.long(),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                logits_processor=self.processors,
                pad_token_id=self.model.ids.pad,
            )
        return tokens[:, -n:] - self.model.action_offset


def observations(batch: int, image_size: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [
        {
            "image": rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8),
            "state": rng.normal(size=15).astype(np.float32),
            "imu": rng.normal(size=(12, 6)).astype(np.float32),
            "instruction": "pick up the red cube",
        }
        for _ in range(batch)
    ]


def time_runtime(runtime: Runtime, batch: int, iters: int, device: str) -> dict:
    obs = observations(batch, runtime.config.image_size, 0)
    for _ in range(3):
        runtime.predict(obs)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        runtime.predict(obs)  # returns numpy: the device work is finished when it returns
        times.append(time.perf_counter() - start)
    p50 = float(np.median(times))
    return {
        "p50_ms": 1e3 * p50,
        "p99_ms": 1e3 * float(np.percentile(times, 99)),
        "actions_per_s": batch * runtime.chunk / float(np.mean(times)),
    }


def new_instruction_ms(processor, count: int = 30) -> float:
    """The language prior's cost for an instruction it has not seen (CPU, outside the model's graph)."""
    corpus = list(dict.fromkeys(language.corpus("heldout", per_task=count, seed=7)))[:count]
    times = []
    for text in corpus:
        start = time.perf_counter()
        processor.prior.encode([text])
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def make_checkpoint(directory: Path, config: ModelConfig) -> Path:
    """A random-weight model of `config` with both decoders."""
    model, processor = create(dataclasses.replace(config, decoders=("parallel", "autoregressive")), untrained_stats(),
                              language.corpus())
    return save_checkpoint(directory, model, processor)


def make_vlm_checkpoint(directory: Path, scale: str) -> Path:
    """A random-weight SmolVLM-shaped backbone in the GPU recipe's model, with both decoders."""
    backbone = save_random_vlm("smolvlm", directory / "backbone", scale)
    return make_checkpoint(directory / "checkpoint", dataclasses.replace(load_config(VLM_RECIPE).model,
                                                                         pretrained=str(backbone)))


def checkpoint_to_time(shipped: Path, work: Path) -> tuple[Path, str]:
    """The checkpoint (an ensemble's first member: the ensemble takes the sum of its members') if it has
    both decoders, else a random-weight model of its config that has."""
    shipped = (ensemble_members(shipped) or [shipped])[0]
    if not (shipped / "config.json").is_file():
        return make_checkpoint(work / "default", ModelConfig()), "default (random)"
    config = from_dict(ModelConfig, read_meta(shipped)["model"])
    if set(config.decoders) >= {"parallel", "autoregressive"}:
        return shipped, "default"
    return make_checkpoint(work / "default", config), "default (random)"


def variants(checkpoint: Path, device: str, onnx: Path | None):
    """(name, runtime factory) pairs; the baseline first."""

    def hf():
        runtime = load_runtime(checkpoint, "torch", device, "autoregressive", cuda_graphs=False)
        return Runtime(runtime.processor, HFGenerate(runtime.decode.model), runtime.device, "hf-generate")

    rows = [("hf-generate (baseline)", hf)]
    rows += [
        (f"{d} eager", lambda d=d: load_runtime(checkpoint, "torch", device, d, cuda_graphs=False))
        for d in ("autoregressive", "parallel")
    ]
    if device == "cuda":
        rows += [
            (f"{d} cuda-graph", lambda d=d: load_runtime(checkpoint, "torch", device, d))
            for d in ("autoregressive", "parallel")
        ]
    if onnx:
        rows.append(("onnxruntime parallel", lambda: load_runtime(checkpoint, "onnx", device, onnx=onnx)))
    return rows


def onnx_runs_on(device: str) -> bool:
    """Whether onnxruntime has a provider for `device`; if not, say why its rows are skipped."""
    try:
        choose_providers(device)
    except OnnxModelError as exc:
        print(f"skipping the onnxruntime rows: {exc}", flush=True)
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="default: policies/checkpoints/default, else a random default model")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--models", default="default,0.5b")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: all cores)")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    device = (
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="vla-bench-"))
    shipped = Path(args.checkpoint) if args.checkpoint else CHECKPOINT_DIR / "default"
    rows = []
    onnx_runs = onnx_runs_on(device)
    for name in args.models.split(","):
        if name == "default":
            checkpoint, label = checkpoint_to_time(shipped, work)
        elif name in VLMS:
            checkpoint, label = make_vlm_checkpoint(work / name, VLMS[name]), f"{name} (random)"
        else:
            checkpoint, label = make_checkpoint(work / name, ModelConfig(**BIG_BACKBONE)), f"{name} (random)"
        runtime = load_runtime(checkpoint, "torch", "cpu")
        model = runtime.decode.model
        params = sum(p.numel() for p in model.parameters())
        if runtime.processor.prior is not None:
            print(f"{label}: {new_instruction_ms(runtime.processor):.1f} ms p50 to encode a new instruction "
                  f"with the language prior (once per instruction; the rows below reuse it)", flush=True)
        onnx = None
        # the 0.5B Llama's export alone takes minutes on 2 CPU cores
        if (name != "0.5b" or device == "cuda") and onnx_runs:
            onnx = checkpoint / "model.onnx"
            if not onnx.is_file():
                onnx = work / f"{name}.onnx"
                export_onnx(model, runtime.processor, checkpoint, onnx, observations(4, model.config.image_size, 1))
        del model, runtime
        for variant, factory in variants(checkpoint, device, onnx):
            runtime = factory()
            for batch in map(int, args.batches.split(",")):
                iters = args.iters if batch == 1 or device == "cuda" else max(10, args.iters // 5)
                rows.append(
                    {
                        "model": label,
                        "params_M": params / 1e6,
                        "variant": variant,
                        "ran": runtime.name,
                        "batch": batch,
                        **time_runtime(runtime, batch, iters, device),
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
            del runtime
            if device == "cuda":
                torch.cuda.empty_cache()
    show(rows, device)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


def show(rows: list[dict], device: str) -> None:
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    table = Table(title=f"latency per control step, preprocessing included ({name})")
    for column in ("model", "params", "variant", "batch", "p50 ms", "p99 ms", "actions/s", "x baseline (p50)"):
        table.add_column(column, justify="left" if column in ("model", "variant") else "right")
    for row in rows:
        base = next(
            r for r in rows if r["model"] == row["model"] and r["batch"] == row["batch"] and "baseline" in r["variant"]
        )
        table.add_row(
            row["model"],
            f"{row['params_M']:.1f}M",
            row["variant"],
            str(row["batch"]),
            f"{row['p50_ms']:.2f}",
            f"{row['p99_ms']:.2f}",
            f"{row['actions_per_s']:,.0f}",
            f"{base['p50_ms'] / row['p50_ms']:.1f}x",
        )
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
