"""The training loop: one process, or one per GPU / CPU slot under torchrun (DDP).

Writes to `out_dir`: config.yaml (the resolved recipe), metrics.jsonl and tb/ (TensorBoard: loss,
token accuracy, learning rate, samples/s, closed-loop success), learning_curve.png (success per
task against the step, redrawn at every evaluation), checkpoints/step_N/ (model and
processor + optimizer, scheduler and RNG states, for --resume, which continues exactly as if never
interrupted; a step directory appears only once complete) and final/ (the model to deploy).
With optim.ema, validation and every checkpoint's model are the averaged weights.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

from policies.vla_policy import VLAPolicy
from sim import SimConfig, language
from vla.apps import JobError
from vla.apps.curve import draw as draw_learning_curve
from vla.apps.rollout import TRAINING_EVAL_SEED_OFFSET, by_task, run_episodes, success_rate
from vla.apps.train.data import BatchSchedule, collate, ensure_corrections, ensure_dataset, open_dataset
from vla.apps.train.recipe import EnsembleRecipe, FinetuneConfig, OptimConfig, TrainConfig, is_recipe, load_config
from vla.apps.train.state import latest_checkpoint, load_training_state, save_training_state, step_checkpoints
from vla.config import ConfigError, to_dict
from vla.model.checkpoint import create, load_checkpoint, read_meta, save_checkpoint, save_ensemble, trained_tasks
from vla.model.finetune import apply_lora, enable_gradient_checkpointing, merge_lora, merged_copy
from vla.model.model import VLAModel
from vla.model.processor import Processor
from vla.runtime import torch_runtime


class TrainingError(JobError):
    """Training cannot go on (e.g. a non-finite loss); what was saved before stays."""


@dataclass
class Processes:
    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_processes(config: TrainConfig) -> Processes:
    """One process, or one per GPU / CPU slot under torchrun (DDP: nccl on GPUs, gloo on CPUs)."""
    cuda = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: cuda requested but torch sees no CUDA device")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if world > 1 and not dist.is_initialized():
        # Long timeout: rank 0 alone records the dataset and runs evaluations while the others wait.
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=60))
    return Processes(rank, world, device)


def make_optimizer(model: torch.nn.Module, optim: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not on norms and biases), as nanoGPT. Fused: one kernel
    for all parameters (on CPU 3x faster than the per-tensor loop: ~4 against ~13 ms a step)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": optim.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=optim.lr, betas=optim.betas, fused=device.type in ("cuda", "cpu"))


def mixed_precision(model: VLAModel, precision: str, device: torch.device):
    """The context the forward pass runs in: bf16 autocast (precision bf16, or auto on CUDA) or none.
    bf16 on a CPU without bf16 matrix units trains in fp32 (warned). On CPU the LM's attention then
    goes eager: SDPA's bf16 backward on CPU took ~7x its fp32 time (58 against 8 ms a layer, batch
    64 x 55 tokens), while eager attention's matmuls use AMX."""
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return nullcontext()
    if device.type == "cpu":
        if not bf16_matrix_units():
            warnings.warn("precision: bf16 on this CPU would be emulated (no AMX or AVX512-BF16: 8x slower); "
                          "training in fp32", stacklevel=2)
            return nullcontext()
        model.lm.set_attn_implementation("eager")
    return torch.autocast(device.type, torch.bfloat16)


def bf16_matrix_units() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (AMX, AVX512-BF16). Elsewhere torch emulates
    them: 0.6 against 39 GFLOP/s for fp32 on 2 threads of an AVX2 EPYC, a training step 8x slower."""
    return torch.ops.mkldnn._is_mkldnn_bf16_supported()


def text_multiple(config: TrainConfig) -> int:
    """The multiple a batch's text columns are padded to. A compiled model recompiled for every new
    sequence length (torch's automatic dynamic shapes did not take, and it stops compiling after 8):
    at a multiple of 8 the all-task recipe meets 3 lengths (32, 40 and its full 43)."""
    return 8 if config.compile else 1


def compile_model(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """torch.compile (inductor), for batches of a few lengths (text_multiple)."""
    compiler = os.environ.get("CXX", "g++")
    if device.type == "cpu" and shutil.which(compiler) is None:
        raise ConfigError(f"compile: true on CPU needs a C++ compiler for inductor; {compiler!r} was not found "
                          "(install g++ or set CXX, or set compile: false)")
    return torch.compile(module)


def make_scheduler(optimizer, optim: OptimConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup, then cosine decay from lr to min_lr at the last step."""
    floor = optim.min_lr / optim.lr

    def factor(step: int) -> float:
        if step < optim.warmup_steps:
            return (step + 1) / optim.warmup_steps
        progress = min(1.0, (step - optim.warmup_steps) / max(1, optim.steps - optim.warmup_steps))
        return floor + (1 - floor) * 0.5 * (1 + np.cos(np.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def other_busy_cores(interval: float = 0.5) -> float | None:
    """Cores other processes keep busy now, from /proc/stat's counters over `interval` while this one
    sleeps; None where there is no /proc/stat. (The load average lags by a minute: just after other
    work it still reads busy.)"""
    try:
        busy_before, total_before = _cpu_times()
        time.sleep(interval)
        busy_after, total_after = _cpu_times()
    except OSError:
        return None
    return (os.cpu_count() or 1) * (busy_after - busy_before) / max(1, total_after - total_before)


def _cpu_times() -> tuple[int, int]:
    """(busy, total) clock ticks of all CPUs since boot."""
    with open("/proc/stat") as stat:
        user, nice, system, idle, iowait, irq, softirq, steal = map(int, stat.readline().split()[1:9])
    total = user + nice + system + idle + iowait + irq + softirq + steal
    return total - idle - iowait, total


def busy_warning(threads: int, busy: float, cores: int) -> str | None:
    """Why training may crawl: more compute threads than the cores other work leaves free. Each
    parallel region waits for its slowest thread, so a descheduled one stalls them all (measured
    2026-12-03, a 2 M-parameter model: 2 threads beside a 1-thread run on 2 cores, 0.5 steps/s against
    ~3.9 with 1 thread)."""
    free = max(1, round(cores - busy))
    if threads <= free:
        return None
    return (f"the machine is busy (other processes use {busy:.1f} of {cores} cores): {threads} training threads "
            f"may run several times slower than {free}; set threads: {free} (-o threads={free})")


def warn_if_busy(threads: int) -> None:
    """One line when `threads` exceed the cores other processes leave free (one thread always has one)."""
    busy = other_busy_cores() if threads > 1 else None
    message = None if busy is None else busy_warning(threads, busy, os.cpu_count() or 1)
    if message:
        warnings.warn(message, stacklevel=3)


def train(config: TrainConfig, index=None, resume: str | Path | None = None, progress: bool = True) -> VLAModel:
    """Train; -> the trained (unwrapped) model. `index` replaces the recipe's dataset (tests);
    `resume` is a step checkpoint directory, or "latest" for the newest complete one in out_dir."""
    init = initial_checkpoint(config, progress)
    if config.data.corrections.policy:
        trained_tasks(config.data.corrections.policy)  # as init's: a clear error before the demonstrations are recorded
    procs = setup_processes(config)
    out_dir = Path(config.out_dir)
    if config.threads:
        torch.set_num_threads(config.threads)
    if procs.main and procs.device.type == "cpu":
        warn_if_busy(torch.get_num_threads())
    seed_everything(config.seed)
    if index is None:  # rank 0 records and caches the dataset, then the others open it
        if procs.main:
            ensure_dataset(config)
            ensure_corrections(config, init)
            index = open_dataset(config, progress)
        if procs.world > 1:
            dist.barrier()
        if index is None:
            index = open_dataset(config, False)

    resume_dir = None if resume is None else latest_checkpoint(out_dir) if resume == "latest" else Path(resume)
    if resume_dir is not None and config.finetune.lm == "lora":
        raise ConfigError("--resume does not continue a LoRA run exactly (its checkpoints hold the merged weights, "
                          "not the adapters); start it again")
    if resume_dir is not None:
        model, processor = load_same_model(resume_dir, config, "resume with the same model")
    elif init is not None:
        model, processor = load_same_model(init, config, "leave the model section out to take the init's")
    else:
        model, processor = create(config.model, index.stats, language.corpus(), index.instructions)
    prepare_finetuning(model, config.finetune)
    model.to(procs.device).train()
    average = weight_average(model, config.optim.ema)  # from the checkpoint's weights: the average
    deployed = model if average is None else average.module  # what is validated and saved
    trained = None if average is None else model  # kept in the trainer state beside the average
    wrapped = (
        DistributedDataParallel(model, device_ids=[procs.device.index] if procs.device.type == "cuda" else None)
        if procs.world > 1
        else model
    )
    if config.compile:
        wrapped = compile_model(wrapped, procs.device)
    optimizer = make_optimizer(model, config.optim, procs.device)
    scheduler = make_scheduler(optimizer, config.optim)
    start = 0
    if resume_dir is not None:
        start = load_training_state(resume_dir, optimizer, scheduler, trained)
        if average is not None:
            average.n_averaged.fill_(start)
    tasks = index.sample_tasks if config.data.task_balance else None
    schedule = BatchSchedule(len(index), config.optim.batch_size, config.seed, procs.rank, procs.world, tasks)
    autocast = mixed_precision(model, config.precision, procs.device)

    logger = Logger(out_dir, config, start) if procs.main else None
    if procs.main:
        print(
            f"model: {count_parameters(model) / 1e6:.2f} M parameters "
            f"({count_parameters(model, trainable=True) / 1e6:.2f} M trained), {len(index)} samples, "
            f"{schedule.per_epoch} steps per epoch, device {procs.device}, {procs.world} process(es)"
        )
    bar = tqdm(
        range(start, config.optim.steps),
        initial=start,
        total=config.optim.steps,
        desc="train",
        disable=not (progress and procs.main),
        dynamic_ncols=True,
    )
    for step in bar:
        batch = collate(
            index.batch(schedule.indices(step)),
            processor,
            procs.device,
            config.data,
            seed=(config.seed * 1_000_003 + step) * 64 + procs.rank,
            text_multiple=text_multiple(config),
        )
        with autocast:
            out = wrapped(**batch)
        if not loss_is_finite(out["loss"], procs):
            raise TrainingError(
                f"step {step + 1}: the loss is not finite (non-finite data, or a learning rate too "
                f"high); stopped, checkpoints up to here are kept in {out_dir}"
            )
        out["loss"].backward()
        if config.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if average is not None:
            average.update_parameters(model)

        done = step + 1
        if done % config.log_every == 0 or done == config.optim.steps:
            metrics = reduce_metrics(out, procs)
            if logger:
                logger.log(done, metrics, scheduler.get_last_lr()[0], config.optim.batch_size)
                bar.set_postfix(
                    loss=f"{metrics['loss']:.3f}",
                    **{f"acc_{d[:3]}": f"{metrics[f'accuracy_{d}']:.3f}" for d in config.model.decoders},
                )
        save = done % config.save_every == 0 or done == config.optim.steps
        evaluate_now = (config.eval.every and done % config.eval.every == 0) or done == config.optim.steps
        if procs.main and (save or evaluate_now):
            logger.pause()  # samples/s counts training only
            if save:
                save_step(deployed, processor, config, out_dir, done, optimizer, scheduler, trained)
            if evaluate_now:
                logger.log_eval(done, evaluate(deployed, processor, config))
                model.train()
            logger.resume()
    bar.close()
    merge_lora(deployed)
    if procs.main:
        meta = {"training": to_dict(config), "step": config.optim.steps}
        save_checkpoint(out_dir / "final", deployed, processor, meta)
        logger.close()
        print(f"final checkpoint: {out_dir / 'final'}")
    if procs.world > 1:
        dist.barrier()
    return deployed


def initial_checkpoint(config: TrainConfig, progress: bool) -> Path | None:
    """The checkpoint `config.init` names (None without one). A recipe means its run's final
    checkpoint: that run is trained first when it has none (resumed if it was interrupted)."""
    if not config.init:
        return None
    if not is_recipe(config.init):
        read_meta(config.init)  # a clear error now, before anything is recorded with it
        return Path(config.init)
    return final_checkpoint(load_config(config.init), progress)


def final_checkpoint(config: TrainConfig, progress: bool) -> Path:
    """The final checkpoint of `config`'s run, which is trained first when it has none (resumed if it
    was interrupted)."""
    final = Path(config.out_dir) / "final"
    if not final.is_dir():  # saved atomically: present means complete
        print(f"{final} not found; training it first")
        resume = "latest" if step_checkpoints(Path(config.out_dir)) else None
        train(config, resume=resume, progress=progress)
    return final


def train_ensemble(recipe: EnsembleRecipe, progress: bool = True) -> Path:
    """Each member's run (those without a final checkpoint), then the ensemble of their final checkpoints."""
    finals = [final_checkpoint(config, progress) for config in recipe.member_configs()]
    out = save_ensemble(recipe.out, finals)
    print(f"ensemble of {len(finals)}: {out}")
    return out


def load_same_model(path: Path, config: TrainConfig, advice: str) -> tuple[VLAModel, Processor]:
    model, processor = load_checkpoint(path)
    if to_dict(model.config) != to_dict(config.model):
        raise ConfigError(f"the recipe's model section differs from the checkpoint's ({path}); {advice}")
    return model, processor


def weight_average(model: VLAModel, decay: float) -> AveragedModel | None:
    """An exponential moving average of `model`'s weights (None for decay 0). Its decay grows as
    (1 + n) / (10 + n) up to `decay` after n updates (as diffusers' EMA), so that early averages are
    not mostly the random start. Averaged weights are what behaviour-cloning policies deploy
    (Diffusion Policy): they vary less from one step to the next than the trained ones."""
    if not decay:
        return None

    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], n: torch.Tensor) -> None:
        weight = 1 - ((1 + n) / (10 + n)).clamp(max=decay)  # a tensor: no device sync per step
        for a, c in zip(averaged, current):
            a.lerp_(c, weight)

    return AveragedModel(model, multi_avg_fn=update, use_buffers=False)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def prepare_finetuning(model: VLAModel, finetune: FinetuneConfig) -> None:
    if finetune.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if finetune.lm == "lora":
        apply_lora(model, finetune.lora_rank, finetune.lora_alpha)
    if finetune.vision == "frozen":
        model.freeze_vision_tower()


def count_parameters(model: torch.nn.Module, trainable: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)


def loss_is_finite(loss: torch.Tensor, procs: Processes) -> bool:
    """Whether every process's loss is finite (all stop together, none waits for the others)."""
    bad = (~torch.isfinite(loss.detach())).float()
    if procs.world > 1:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return not bad.item()


def reduce_metrics(out: dict, procs: Processes) -> dict[str, float]:
    """Scalar outputs averaged over processes."""
    names = sorted(out)
    values = torch.stack([out[n].detach().float() for n in names])
    if procs.world > 1:
        dist.all_reduce(values)
        values /= procs.world
    return dict(zip(names, values.tolist()))


def save_step(
    model: VLAModel, processor: Processor, config: TrainConfig, out_dir: Path, step: int, optimizer, scheduler,
    trained: VLAModel | None,
) -> None:
    """A resumable checkpoint of `model` (the trained weights, or their average with the `trained`
    ones in the trainer state): it appears, trainer state included, only once complete."""
    save_checkpoint(
        out_dir / "checkpoints" / f"step_{step:07d}",
        merged_copy(model),
        processor,
        {"training": to_dict(config), "step": step},
        also=lambda staging: save_training_state(staging, step, optimizer, scheduler, trained),
    )
    for old in step_checkpoints(out_dir)[: -config.keep_checkpoints]:
        shutil.rmtree(old)


def evaluate(model: VLAModel, processor: Processor, config: TrainConfig) -> dict[str, float]:
    """Closed-loop success rate per task on validation seeds (disjoint from the training data and
    from vla eval's test seeds), with VLAPolicy in sim."""
    if config.eval.episodes == 0:
        return {}
    policy = VLAPolicy(torch_runtime(model, processor, config.eval.decoder or None))
    results = run_episodes(
        config.data.tasks,
        lambda env: policy,
        config.eval.episodes,
        TRAINING_EVAL_SEED_OFFSET,
        SimConfig.for_spec(policy.spec),
        progress=False,
    )
    return {task: success_rate(rows) for task, rows in by_task(results).items()}


class Logger:
    """TensorBoard, metrics.jsonl and samples/s (measured without evaluation time). Resuming at
    step s drops the records after s, which the resumed run writes again."""

    def __init__(self, out_dir: Path, config: TrainConfig, start: int):
        from torch.utils.tensorboard import SummaryWriter

        out_dir.mkdir(parents=True, exist_ok=True)
        self.out_dir = out_dir
        (out_dir / "config.yaml").write_text(yaml.safe_dump(json.loads(json.dumps(to_dict(config))), sort_keys=False))
        self.writer = SummaryWriter(str(out_dir / "tb"), purge_step=start or None)
        path = out_dir / "metrics.jsonl"
        kept = [line for line in _lines(path) if _step(line) is not None and _step(line) <= start]
        path.write_text("".join(line + "\n" for line in kept))
        self.metrics = path.open("a")
        self.last_step, self.last_time, self.paused = start, time.perf_counter(), 0.0

    def log(self, step: int, metrics: dict, lr: float, batch_size: int) -> None:
        now = time.perf_counter()
        samples_per_s = (step - self.last_step) * batch_size / max(now - self.last_time - self.paused, 1e-9)
        self.last_step, self.last_time, self.paused = step, now, 0.0
        record = {"step": step, **metrics, "lr": lr, "samples_per_s": samples_per_s}
        for name, value in record.items():
            if name != "step":
                self.writer.add_scalar(f"train/{name}", value, step)
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()

    def log_eval(self, step: int, success: dict[str, float]) -> None:
        for task, rate in success.items():
            self.writer.add_scalar(f"eval/success_{task}", rate, step)
        if success:
            self.metrics.write(json.dumps({"step": step, **{f"success_{t}": r for t, r in success.items()}}) + "\n")
            self.metrics.flush()
            tqdm.write(
                f"step {step}: closed-loop success " + ", ".join(f"{t} {100 * r:.0f} %" for t, r in success.items())
            )
            draw_learning_curve(self.out_dir)

    def pause(self) -> None:
        self._pause_start = time.perf_counter()

    def resume(self) -> None:
        self.paused += time.perf_counter() - self._pause_start

    def close(self) -> None:
        self.writer.close()
        self.metrics.close()


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.is_file() else []


def _step(line: str) -> int | None:
    """The step of a metrics.jsonl record (None for a line a crash cut short)."""
    try:
        step = json.loads(line).get("step")
    except (json.JSONDecodeError, AttributeError):
        return None
    return step if isinstance(step, int) else None
