"""Train a VLA policy from a YAML recipe.

    vla train --config policies/configs/quickstart-cpu.yaml [--override optim.lr=3e-4 ...] [--resume]
    torchrun --nproc_per_node N -m vla.train --config policies/configs/full-gpu.yaml   (DDP)

Records the dataset with the scripted expert first when the recipe has a `data.collect` section
and the dataset directory does not exist yet. Writes to `out_dir`: config.yaml (the resolved
recipe), metrics.jsonl and tb/ (TensorBoard: loss, token accuracy, learning rate, samples/s,
closed-loop success), checkpoints/step_N/ (model + optimizer, scheduler and RNG states, for
--resume, which continues exactly as if never interrupted) and final/ (the model to deploy).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
import yaml
from torch import distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler
from tqdm import tqdm

from sim import TASKS, SimConfig
from vla.config import ConfigError, from_dict, read_yaml, to_dict
from vla.model.checkpoint import load_checkpoint, save_checkpoint
from vla.model.config import ModelConfig
from vla.model.model import VLAModel


# ---- the recipe ---------------------------------------------------------------------------------
@dataclass
class CollectConfig:
    episodes: int = 0  # per task, recorded with the scripted expert if `dataset` is missing (0: never)
    workers: int = 2


@dataclass
class DataConfig:
    dataset: str = "datasets/quickstart"  # a directory of episodes (vla collect)
    tasks: tuple[str, ...] = ("reach",)  # recorded by `collect`, evaluated by `eval`
    collect: CollectConfig = field(default_factory=CollectConfig)
    stats_samples: int = 4096  # random samples for the state/IMU normalisation statistics
    image_shift: int = 0  # augmentation: shift training images by up to this many pixels (DrQ)


@dataclass
class OptimConfig:
    steps: int = 2000
    batch_size: int = 64  # global: split evenly across DDP processes
    lr: float = 1e-3
    min_lr: float = 1e-5  # cosine decay ends here
    warmup_steps: int = 100  # linear warmup from 0
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0  # max gradient norm (0: off)


@dataclass
class EvalConfig:
    every: int = 0  # steps between closed-loop evaluations in sim (0: only at the end)
    episodes: int = 10  # per task, on held-out seeds (vla.rollout.EVAL_SEED_OFFSET + i)
    decoder: str = ""  # "" = the model's first decoder
    execution: str = "ensemble"  # how VLAPolicy executes action chunks


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    out_dir: str = "runs/quickstart"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 0  # torch CPU threads (0: torch's default)
    log_every: int = 10
    save_every: int = 500  # steps between resumable checkpoints (the last step is always saved)
    keep_checkpoints: int = 2  # older step checkpoints are deleted

    def __post_init__(self):
        o = self.optim
        if o.steps <= 0 or o.batch_size <= 0 or o.lr <= 0 or o.warmup_steps < 0 or o.min_lr < 0 or o.grad_clip < 0:
            raise ValueError("optim: steps, batch_size and lr must be positive; warmup_steps, min_lr, grad_clip >= 0")
        if self.log_every <= 0 or self.save_every <= 0 or self.keep_checkpoints <= 0 or self.eval.every < 0 or self.eval.episodes < 0:
            raise ValueError("log_every, save_every, keep_checkpoints must be positive; eval.every, eval.episodes >= 0")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        unknown = [t for t in self.data.tasks if t not in TASKS]
        if unknown or not self.data.tasks:
            raise ValueError(f"data.tasks: unknown task(s) {unknown}; choose from {sorted(TASKS)}")
        if self.eval.decoder and self.eval.decoder not in self.model.decoders:
            raise ValueError(f"eval.decoder {self.eval.decoder!r} is not among model.decoders {list(self.model.decoders)}")


def load_config(path: str | Path, overrides: list[str] = ()) -> TrainConfig:
    """The recipe at `path` with `key.sub=value` overrides (values parsed as YAML)."""
    values = read_yaml(path)
    for override in overrides:
        key, sep, text = override.partition("=")
        if not sep or not key:
            raise ConfigError(f"--override expects key=value, got {override!r}")
        *parents, leaf = key.split(".")
        node = values
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--override {key}: {part!r} is not a section")
        node[leaf] = _parse_value(text)
    return from_dict(TrainConfig, values, str(path))


def _parse_value(text: str):
    try:
        value = yaml.safe_load(text) if text else ""
    except yaml.YAMLError:  # e.g. a prompt "{instruction} <image>": a plain string
        return text
    if isinstance(value, str):  # YAML reads "1e-3" as a string
        try:
            return float(value)
        except ValueError:
            pass
    return value


# ---- data ---------------------------------------------------------------------------------------
def ensure_dataset(config: TrainConfig) -> Path:
    """The dataset directory; with a `data.collect` section, `vla collect` first records what is
    missing of it (nothing when complete; it also resumes an interrupted recording)."""
    data, path = config.data, Path(config.data.dataset)
    if data.collect.episodes > 0:
        from vla.cli import main as vla_main

        args = ["collect", "--task", ",".join(data.tasks), "--episodes", str(data.collect.episodes), "--out", str(path),
                "--workers", str(data.collect.workers), "--image-size", str(config.model.image_size)]
        code = vla_main(args + (["--wrist-camera"] if config.model.wrist_camera else []))
        if code:
            raise RuntimeError(f"recording the dataset into {path} failed (exit code {code})")
    elif not path.exists():
        raise FileNotFoundError(f"dataset {path} not found: record it with `vla collect` or set data.collect.episodes")
    return path


def open_dataset(config: TrainConfig, progress: bool):
    from vla.episodes.index import EpisodeIndex

    return EpisodeIndex(config.data.dataset, image_size=config.model.image_size, chunk=config.model.chunk,
                        tasks=list(config.data.tasks), imu_window=config.model.imu_window, progress=progress)


def compute_stats(index, samples: int, seed: int) -> dict:
    """Normalisation statistics: the index's action statistics (quantiles for the action tokens)
    and the mean/std of state and IMU over a random subset of samples."""
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(len(index), size=min(samples, len(index)), replace=False))
    states, imus = [], []
    for start in range(0, len(chosen), 512):
        batch = index.batch(chosen[start:start + 512])
        states.append(np.asarray(batch["state"], dtype=np.float64))
        imus.append(np.asarray(batch["imu"], dtype=np.float64).reshape(-1, np.shape(batch["imu"])[-1]))
    state, imu = np.concatenate(states), np.concatenate(imus)
    action = {k: (np.asarray(v, dtype=np.float32).tolist() if k != "count" else int(v)) for k, v in index.action_stats.items()}
    return {"action": action,
            "state": {"mean": state.mean(0).astype(np.float32).tolist(), "std": state.std(0).astype(np.float32).tolist()},
            "imu": {"mean": imu.mean(0).astype(np.float32).tolist(), "std": imu.std(0).astype(np.float32).tolist()}}


class BatchSchedule:
    """Which samples make up step s's batch on this rank: a fresh DistributedSampler shuffle per
    epoch (seeded by seed and epoch), so any step's batch is known without replaying earlier ones."""

    def __init__(self, size: int, batch_size: int, seed: int, rank: int, world: int):
        if batch_size % world:
            raise ValueError(f"optim.batch_size ({batch_size}) must be divisible by the number of processes ({world})")
        self.sampler = DistributedSampler(range(size), num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.per_rank = batch_size // world
        self.per_epoch = len(self.sampler) // self.per_rank
        if self.per_epoch == 0:
            raise ValueError(f"the dataset ({size} samples) is smaller than one batch ({batch_size})")
        self.epoch, self.order = -1, []

    def indices(self, step: int) -> list[int]:
        epoch, i = divmod(step, self.per_epoch)
        if epoch != self.epoch:
            self.sampler.set_epoch(epoch)
            self.epoch, self.order = epoch, list(self.sampler)
        return self.order[i * self.per_rank:(i + 1) * self.per_rank]


def collate(raw: dict, model: VLAModel, device: torch.device, shift: int = 0, seed: int = 0) -> dict[str, torch.Tensor]:
    """index.batch(...) -> the keyword arguments of VLAModel.forward, images shifted by up to
    `shift` pixels (random per image, drawn from `seed`)."""
    images = ["image"] + (["wrist_image"] if model.config.wrist_camera else [])
    keys = images + ["state", "imu", "actions", "action_mask"]
    missing = [k for k in keys + ["instruction"] if k not in raw]
    if missing:
        raise ValueError(f"the dataset's samples lack {missing}")
    batch = {k: torch.as_tensor(np.asarray(raw[k])) for k in keys}
    if shift:
        generator = torch.Generator().manual_seed(seed)
        for key in images:
            batch[key] = random_shift(batch[key], shift, generator)
    batch["text_ids"], batch["text_mask"] = model.prompt.encode(list(raw["instruction"]))
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def random_shift(images: torch.Tensor, shift: int, generator: torch.Generator) -> torch.Tensor:
    """uint8 [B, H, W, 3]: pad by `shift` with the edge pixels, crop back at a random offset."""
    b, h, w, _ = images.shape
    padded = torch.nn.functional.pad(images.permute(0, 3, 1, 2).float(), (shift,) * 4, mode="replicate")
    offsets = torch.randint(0, 2 * shift + 1, (b, 2), generator=generator).tolist()
    crops = [padded[i, :, y:y + h, x:x + w] for i, (y, x) in enumerate(offsets)]
    return torch.stack(crops).permute(0, 2, 3, 1).to(torch.uint8)


# ---- optimisation -------------------------------------------------------------------------------
def make_optimizer(model: torch.nn.Module, optim: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not on norms and biases), as nanoGPT."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": optim.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=optim.lr, betas=optim.betas, fused=device.type == "cuda")


def make_scheduler(optimizer, optim: OptimConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup, then cosine decay from lr to min_lr at the last step."""
    floor = optim.min_lr / optim.lr

    def factor(step: int) -> float:
        if step < optim.warmup_steps:
            return (step + 1) / optim.warmup_steps
        progress = min(1.0, (step - optim.warmup_steps) / max(1, optim.steps - optim.warmup_steps))
        return floor + (1 - floor) * 0.5 * (1 + np.cos(np.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ---- resumable training state (safetensors + JSON: nothing is unpickled) ---------------------------
STATE_TENSORS, STATE_JSON = "trainer_state.safetensors", "trainer_state.json"


def save_training_state(path: Path, step: int, optimizer, scheduler) -> None:
    optimizer_state = optimizer.state_dict()
    tensors = {f"optimizer.{pid}.{key}": value.detach().cpu().contiguous()
               for pid, state in optimizer_state["state"].items() for key, value in state.items()}
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    numpy_state = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(numpy_state[1].astype(np.int64))
    safetensors.torch.save_file(tensors, str(path / STATE_TENSORS))
    meta = {"step": step, "param_groups": optimizer_state["param_groups"], "scheduler": scheduler.state_dict(),
            "rng_numpy": [numpy_state[0], *numpy_state[2:]], "rng_python": random.getstate()}
    (path / STATE_JSON).write_text(json.dumps(meta))


def load_training_state(path: Path, optimizer, scheduler) -> int:
    """Restore optimizer, scheduler and RNG states; -> the step to continue from."""
    for name in (STATE_TENSORS, STATE_JSON):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path / name}: missing; {path} is not a resumable checkpoint")
    meta = json.loads((path / STATE_JSON).read_text())
    tensors = safetensors.torch.load_file(str(path / STATE_TENSORS))
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


def latest_checkpoint(out_dir: Path) -> Path:
    steps = sorted((out_dir / "checkpoints").glob("step_*"))
    if not steps:
        raise FileNotFoundError(f"no checkpoint to resume from in {out_dir / 'checkpoints'}")
    return steps[-1]


# ---- processes -----------------------------------------------------------------------------------
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


# ---- the loop ------------------------------------------------------------------------------------
def train(config: TrainConfig, index=None, resume: str | Path | None = None, progress: bool = True) -> VLAModel:
    """Train; -> the trained (unwrapped) model. `index` replaces the recipe's dataset (tests);
    `resume` is a step checkpoint directory, or "latest" for the newest one in out_dir."""
    procs = setup_processes(config)
    out_dir = Path(config.out_dir)
    if config.threads:
        torch.set_num_threads(config.threads)
    seed_everything(config.seed)
    if index is None:  # rank 0 records and caches the dataset, then the others open it
        if procs.main:
            ensure_dataset(config)
            index = open_dataset(config, progress)
        if procs.world > 1:
            dist.barrier()
        if index is None:
            index = open_dataset(config, False)

    resume_dir = None if resume is None else latest_checkpoint(out_dir) if resume == "latest" else Path(resume)
    if resume_dir is not None:
        model = load_checkpoint(resume_dir)
        if to_dict(model.config) != to_dict(config.model):
            raise ConfigError(f"the recipe's model section differs from the checkpoint's ({resume_dir}); resume with the same model")
    else:
        model = VLAModel.create(config.model, compute_stats(index, config.data.stats_samples, config.seed))
    model.to(procs.device).train()
    wrapped = DistributedDataParallel(model, device_ids=[procs.device.index] if procs.device.type == "cuda" else None) if procs.world > 1 else model
    optimizer = make_optimizer(model, config.optim, procs.device)
    scheduler = make_scheduler(optimizer, config.optim)
    start = load_training_state(resume_dir, optimizer, scheduler) if resume_dir is not None else 0
    schedule = BatchSchedule(len(index), config.optim.batch_size, config.seed, procs.rank, procs.world)
    autocast = torch.autocast("cuda", torch.bfloat16) if procs.device.type == "cuda" else nullcontext()

    logger = Logger(out_dir, config, start) if procs.main else None
    if procs.main:
        print(f"model: {count_parameters(model) / 1e6:.2f} M parameters, {len(index)} samples, "
              f"{schedule.per_epoch} steps per epoch, device {procs.device}, {procs.world} process(es)")
    bar = tqdm(range(start, config.optim.steps), initial=start, total=config.optim.steps, desc="train",
               disable=not (progress and procs.main), dynamic_ncols=True)
    for step in bar:
        batch = collate(index.batch(schedule.indices(step)), model, procs.device, config.data.image_shift,
                        seed=(config.seed * 1_000_003 + step) * 64 + procs.rank)
        with autocast:
            out = wrapped(**batch)
        out["loss"].backward()
        if config.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        done = step + 1
        if done % config.log_every == 0 or done == config.optim.steps:
            metrics = reduce_metrics(out, procs)
            if logger:
                logger.log(done, metrics, scheduler.get_last_lr()[0], config.optim.batch_size)
                bar.set_postfix(loss=f"{metrics['loss']:.3f}", **{f"acc_{d[:3]}": f"{metrics[f'accuracy_{d}']:.3f}" for d in config.model.decoders})
        save = done % config.save_every == 0 or done == config.optim.steps
        evaluate_now = (config.eval.every and done % config.eval.every == 0) or done == config.optim.steps
        if procs.main and (save or evaluate_now):
            logger.pause()  # samples/s counts training only
            if save:
                save_step(model, config, out_dir, done, optimizer, scheduler)
            if evaluate_now:
                logger.log_eval(done, evaluate(model, config))
                model.train()
            logger.resume()
    bar.close()
    if procs.main:
        save_checkpoint(model, out_dir / "final", {"training": to_dict(config), "step": config.optim.steps})
        logger.close()
        print(f"final checkpoint: {out_dir / 'final'}")
    if procs.world > 1:
        dist.barrier()
    return model


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def reduce_metrics(out: dict, procs: Processes) -> dict[str, float]:
    """Scalar outputs averaged over processes."""
    names = sorted(out)
    values = torch.stack([out[n].detach().float() for n in names])
    if procs.world > 1:
        dist.all_reduce(values)
        values /= procs.world
    return dict(zip(names, values.tolist()))


def save_step(model, config: TrainConfig, out_dir: Path, step: int, optimizer, scheduler) -> None:
    path = save_checkpoint(model, out_dir / "checkpoints" / f"step_{step:07d}", {"training": to_dict(config), "step": step})
    save_training_state(path, step, optimizer, scheduler)
    for old in sorted((out_dir / "checkpoints").glob("step_*"))[:-config.keep_checkpoints]:
        shutil.rmtree(old)


def evaluate(model: VLAModel, config: TrainConfig) -> dict[str, float]:
    """Closed-loop success rate per task on held-out seeds, with VLAPolicy in sim."""
    from policies.vla_policy import VLAPolicy  # policies sit above vla: imported on use
    from vla.rollout import EVAL_SEED_OFFSET, by_task, run_episodes, success_rate
    from vla.runtime import torch_runtime

    if config.eval.episodes == 0:
        return {}
    policy = VLAPolicy(torch_runtime(model, config.eval.decoder or None), execution=config.eval.execution)
    sim = SimConfig(image_size=config.model.image_size, wrist_camera=config.model.wrist_camera, imu_window=config.model.imu_window)
    results = run_episodes(config.data.tasks, lambda env: policy, config.eval.episodes, EVAL_SEED_OFFSET, sim, progress=False)
    return {task: success_rate(rows) for task, rows in by_task(results).items()}


class Logger:
    """TensorBoard, metrics.jsonl and samples/s (measured without evaluation time)."""

    def __init__(self, out_dir: Path, config: TrainConfig, start: int):
        from torch.utils.tensorboard import SummaryWriter

        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(yaml.safe_dump(json.loads(json.dumps(to_dict(config))), sort_keys=False))
        self.writer = SummaryWriter(str(out_dir / "tb"), purge_step=start or None)
        self.metrics = (out_dir / "metrics.jsonl").open("a")
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
            tqdm.write(f"step {step}: closed-loop success " + ", ".join(f"{t} {100 * r:.0f} %" for t, r in success.items()))

    def pause(self) -> None:
        self._pause_start = time.perf_counter()

    def resume(self) -> None:
        self.paused += time.perf_counter() - self._pause_start

    def close(self) -> None:
        self.writer.close()
        self.metrics.close()


# ---- command line --------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML recipe, e.g. policies/configs/quickstart-cpu.yaml")
    parser.add_argument("--override", "-o", action="append", default=[], metavar="KEY=VALUE",
                        help="change a recipe value, e.g. optim.lr=3e-4 or model.chunk=4 (repeatable)")
    parser.add_argument("--resume", nargs="?", const="latest", metavar="CHECKPOINT",
                        help="continue from a step checkpoint (default: the newest in out_dir/checkpoints)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")


def run(args) -> int:
    config = load_config(args.config, args.override)
    train(config, resume=args.resume, progress=not args.no_progress)
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    from vla.cli import main

    sys.exit(main(["train", *sys.argv[1:]]))
