"""Training recipes: typed YAML (policies/configs/*.yaml), with `key.sub=value` overrides."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from sim import TASKS
from sim.config import MAX_PUSH_TOLERANCE, PUSH_TOLERANCE, randomization
from vla.config import ConfigError, apply_overrides, from_dict, read_yaml, to_dict
from vla.model.checkpoint import MAX_MEMBERS, read_meta
from vla.model.config import ModelConfig


@dataclass
class CollectConfig:
    episodes: int = 0  # per task, recorded with the scripted expert if `dataset` is missing (0: never)
    workers: int = 2
    # domain randomisation of the recorded episodes (sim.config.randomization names), e.g.
    # "disturbance" for demonstrations with the expert's corrections
    randomize: str = ""
    # the tasks whose demonstrations get `randomize` (empty: every task), e.g. [push] for pushes shown
    # with recoveries while the other tasks keep their clean demonstrations
    randomize_tasks: tuple[str, ...] = ()
    # share of pick and place demonstrations whose first grasp closes beside the cube, then retries
    # (trained on from the miss on: how to notice a missed grasp and try again)
    missed_grasps: float = 0.0
    # a push's success radius while recording (SimConfig.push_tolerance): with less than the 4 cm that
    # evaluation keeps, push demonstrations (and corrections) go on into the ring
    push_tolerance: float = PUSH_TOLERANCE

    def __post_init__(self):
        try:
            randomization(self.randomize)
        except ValueError as exc:
            raise ValueError(f"data.collect.randomize: {exc}") from None
        if not set(self.randomize_tasks) <= set(TASKS):
            raise ValueError(f"data.collect.randomize_tasks must name tasks ({sorted(TASKS)}), "
                             f"got {list(self.randomize_tasks)!r}")
        if not 0 <= self.missed_grasps <= 1:
            raise ValueError(f"data.collect.missed_grasps must be in [0, 1], got {self.missed_grasps!r}")
        if not 0 < self.push_tolerance <= MAX_PUSH_TOLERANCE:
            raise ValueError(f"data.collect.push_tolerance must be in (0, {MAX_PUSH_TOLERANCE}] metres, "
                             f"got {self.push_tolerance!r}")

    def sim_settings(self, task: str) -> dict:
        """The SimConfig settings `task`'s episodes are recorded with (besides the model's observation spec)."""
        randomized = not self.randomize_tasks or task in self.randomize_tasks
        return (randomization(self.randomize) if randomized else {}) | {"push_tolerance": self.push_tolerance}


@dataclass
class CorrectionsConfig:
    """DAgger-style corrections, recorded before training with a checkpoint (`policy`, else the recipe's
    `init`): it drives each episode for a random 0..takeover[task] steps, then the scripted expert
    finishes; the expert's steps are trained on beside data.dataset. They teach recovering from the
    states the checkpoint itself reaches (a cube dropped on the way to the bin, a grasp beside the
    cube, a push drifting off its line), which demonstrations alone never show."""

    episodes: int = 0  # per task in `takeover` (0: none), into out_dir/corrections
    # the checkpoint directory that drives them, for a model trained from scratch on the demonstrations
    # and these (DAgger's aggregated dataset); "": the recipe's `init`, which training continues
    policy: str = ""
    takeover: dict[str, int] = field(default_factory=dict)  # task -> the most steps the checkpoint drives
    workers: int = 2

    def __post_init__(self):
        if not isinstance(self.takeover, dict) or not all(
            task in TASKS and isinstance(n, int) and not isinstance(n, bool) and n >= 0
            for task, n in self.takeover.items()
        ):
            raise ValueError(f"data.corrections.takeover must map tasks ({sorted(TASKS)}) to steps >= 0, "
                             f"got {self.takeover!r}")
        if self.episodes < 0 or self.workers <= 0 or (self.episodes and not self.takeover):
            raise ValueError("data.corrections: episodes must be >= 0 (with a takeover per task), workers positive")


@dataclass
class DataConfig:
    dataset: str = "datasets/quickstart"  # a directory of episodes (vla collect)
    tasks: tuple[str, ...] = ("reach",)  # recorded by `collect`, evaluated by `eval`
    collect: CollectConfig = field(default_factory=CollectConfig)
    image_shift: int = 0  # augmentation: shift training images by up to this many pixels (DrQ)
    # augmentation: the share of instructions that get 1-2 made-up words inserted at random places, so
    # that the policy learns to act on the words it knows and pass over those it does not (what a
    # person's own phrasing brings); 0: off
    instruction_noise: float = 0.0
    # augmentation: each instruction the training grammar (sim.language) could have written is replaced
    # by one of this many phrasings of its request (task, object, bin, direction), the same few for
    # every episode asking for it: the text then says what to do, never which episode it came from
    # (1928 of 2000 recorded instructions are distinct, and a pretrained text encoder tells them
    # apart); 0: off
    rephrase: int = 0
    # augmentation: the share of push and place requests whose verb is a made-up word, so that a
    # direction or a bin names the task when the verb is one training never saw (the default: push
    # 82 % told "push the {obj} {direction}", 30 % told "shift ..."); 0: off
    unknown_verb: float = 0.0
    # every batch holds the tasks in equal shares, not in proportion to their samples (reach
    # episodes are the shortest: ~12 % of the samples of an all-task dataset)
    task_balance: bool = False
    corrections: CorrectionsConfig = field(default_factory=CorrectionsConfig)


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
    # decay of an exponential moving average of the weights (0: off); validation and every saved
    # checkpoint then hold the averaged weights, the trained ones travel in the trainer state
    ema: float = 0.0


@dataclass
class EvalConfig:
    every: int = 0  # steps between closed-loop evaluations in sim (0: only at the end)
    episodes: int = 10  # per task, on validation seeds (vla.apps.rollout.TRAINING_EVAL_SEED_OFFSET + i)
    decoder: str = ""  # "" = the model's first decoder


@dataclass
class FinetuneConfig:
    """How a model with a pretrained backbone trains."""

    # "frozen": a pretrained vision tower (model.vision: pretrained or vlm) keeps its weights; its
    # projector or connector still trains
    vision: str = "trainable"
    # "lora": low-rank adapters on the pretrained LM's attention and MLP layers (peft), merged into
    # the weights whenever a checkpoint is saved; its embedding table trains only the action rows
    lm: str = "full"
    lora_rank: int = 16
    lora_alpha: int = 32
    gradient_checkpointing: bool = False  # recompute activations in the backward pass: less memory, slower


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    # start from a trained policy's weights and processor (the optimizer starts afresh): a checkpoint
    # directory, or a recipe (the final checkpoint of its run, trained first if it has none). The
    # model section is the init's (leave it out of the recipe, or repeat it exactly).
    init: str = ""
    out_dir: str = "runs/quickstart"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    # auto: bf16 autocast on CUDA, fp32 on CPU. bf16 on CPU pays only where the CPU has bf16
    # matrix units (AMX, AVX512-BF16): there the all-task model trains ~1.7x faster (benchmarks/
    # train_throughput.py); elsewhere torch would emulate it (8x slower), so bf16 trains in fp32.
    precision: str = "auto"  # auto | bf16 | fp32
    # torch.compile the training forward and backward (inductor): it fuses the casts and elementwise
    # work that dominate a small model's step. The first steps compile (minutes on 2 cores; on CPU
    # inductor writes C++, so a compiler is needed). Validation and checkpoints use the plain model.
    compile: bool = False
    threads: int = 0  # torch CPU threads (0: torch's default)
    log_every: int = 10
    save_every: int = 500  # steps between resumable checkpoints (the last step is always saved)
    keep_checkpoints: int = 2  # older step checkpoints are deleted

    def __post_init__(self):
        o = self.optim
        if o.steps <= 0 or o.batch_size <= 0 or o.lr <= 0 or o.warmup_steps < 0 or o.min_lr < 0 or o.grad_clip < 0:
            raise ValueError("optim: steps, batch_size and lr must be positive; warmup_steps, min_lr, grad_clip >= 0")
        if not 0 <= o.ema < 1:
            raise ValueError(f"optim.ema must be in [0, 1) (0: off), got {o.ema}")
        if (
            self.log_every <= 0
            or self.save_every <= 0
            or self.keep_checkpoints <= 0
            or self.eval.every < 0
            or self.eval.episodes < 0
        ):
            raise ValueError("log_every, save_every, keep_checkpoints must be positive; eval.every, eval.episodes >= 0")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision must be auto, bf16 or fp32, got {self.precision!r}")
        if not (0 <= self.data.instruction_noise <= 1 and 0 <= self.data.unknown_verb <= 1):
            raise ValueError("data.instruction_noise and data.unknown_verb must be in 0..1")
        if self.data.image_shift < 0 or self.data.rephrase < 0:
            raise ValueError("data.image_shift and data.rephrase must be >= 0")
        unknown = [t for t in self.data.tasks if t not in TASKS]
        if unknown or not self.data.tasks:
            raise ValueError(f"data.tasks: unknown task(s) {unknown}; choose from {sorted(TASKS)}")
        self.check_finetune()
        if self.data.corrections.episodes and not (self.init or self.data.corrections.policy):
            raise ValueError("data.corrections need a checkpoint to drive them: set data.corrections.policy or init")
        if set(self.data.corrections.takeover) - set(self.data.tasks):
            raise ValueError(f"data.corrections.takeover names tasks outside data.tasks {list(self.data.tasks)}")
        if self.eval.decoder and self.eval.decoder not in self.model.decoders:
            raise ValueError(
                f"eval.decoder {self.eval.decoder!r} is not among model.decoders {list(self.model.decoders)}"
            )

    def check_finetune(self) -> None:
        f = self.finetune
        if f.vision not in ("trainable", "frozen") or f.lm not in ("full", "lora"):
            raise ValueError(f"finetune.vision must be trainable or frozen, finetune.lm full or lora; "
                             f"got {f.vision!r}, {f.lm!r}")
        if f.vision == "frozen" and self.model.vision not in ("pretrained", "vlm"):
            raise ValueError("finetune.vision: frozen needs a pretrained vision tower (model.vision pretrained or vlm)")
        if f.lm == "lora" and not self.model.pretrained:
            raise ValueError("finetune.lm: lora needs a pretrained LM (model.pretrained)")
        if f.lora_rank <= 0 or f.lora_alpha <= 0:
            raise ValueError("finetune.lora_rank and finetune.lora_alpha must be positive")


@dataclass
class EnsembleRecipe:
    """Runs of one recipe, each with its own overrides (its own out_dir at least), bundled into one
    checkpoint that plays the mean of their action chunks (vla.model.checkpoint.save_ensemble)."""

    recipe: str  # the YAML recipe every member runs
    members: list[list[str]] = field(default_factory=list)  # each member's `key=value` overrides of it
    out: str = ""  # the ensemble checkpoint directory

    def __post_init__(self):
        if not 2 <= len(self.members) <= MAX_MEMBERS or not self.out:
            raise ValueError(f"an ensemble recipe needs 2-{MAX_MEMBERS} members and an out directory")

    def member_configs(self) -> list[TrainConfig]:
        configs = [load_config(self.recipe, overrides) for overrides in self.members]
        if len({config.out_dir for config in configs}) < len(configs):
            raise ConfigError("ensemble.members: each member needs its own out_dir (-o out_dir=...)")
        return configs


def load_recipe(path: str | Path, overrides: list[str] = ()) -> TrainConfig | EnsembleRecipe:
    """The recipe at `path`: a training run's, or with a single `ensemble` section, an ensemble's."""
    values = apply_overrides(read_yaml(path), overrides)
    if "ensemble" in values:
        if len(values) > 1:
            raise ConfigError(f"{path}: an ensemble recipe holds only its `ensemble` section")
        return from_dict(EnsembleRecipe, values["ensemble"], f"{path}: ensemble")
    return load_config(path, overrides)


def load_config(path: str | Path, overrides: list[str] = ()) -> TrainConfig:
    """The recipe at `path` with `key.sub=value` overrides (values parsed as YAML); with `init` and no
    model section, the init's model section."""
    values = apply_overrides(read_yaml(path), overrides)
    if values.get("init") and "model" not in values:
        values["model"] = init_model_section(str(values["init"]))
    return from_dict(TrainConfig, values, str(path))


def is_recipe(init: str) -> bool:
    return init.endswith((".yaml", ".yml"))


def init_model_section(init: str) -> dict:
    """The model section of `init`: a recipe's, or the one a checkpoint was built from."""
    if is_recipe(init):
        return to_dict(load_config(init).model)
    return read_meta(init)["model"]
