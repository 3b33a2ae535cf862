"""Training data: the dataset (recorded first if the recipe says so), its index, which samples make
up each step's batch, and image augmentation."""
from __future__ import annotations

import functools
import string
import zlib
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DistributedSampler

from sim import SimConfig, language
from vla.apps.collect import record_dataset
from vla.apps.rollout import CORRECTIONS_SEED_OFFSET
from vla.apps.train.recipe import DataConfig, TrainConfig
from vla.data.index import EpisodeIndex, IndexUnion
from vla.model.model import drop_padding
from vla.model.processor import Processor
from vla.model.text import normalize_instruction

LETTERS = list(string.ascii_lowercase)


def ensure_dataset(config: TrainConfig) -> Path:
    """The dataset directory; with a `data.collect` section, the scripted expert first records what
    is missing of it (nothing when complete; an interrupted recording resumes)."""
    data, path = config.data, Path(config.data.dataset)
    if data.collect.episodes > 0:
        record_dataset(path, list(data.tasks), data.collect.episodes, "expert", _collect_sims(config, data.tasks),
                       workers=data.collect.workers, missed_grasps=data.collect.missed_grasps)
    elif not path.exists():
        raise FileNotFoundError(f"dataset {path} not found: record it with `vla collect` or set data.collect.episodes")
    return path


def ensure_corrections(config: TrainConfig, init: Path | None) -> None:
    """data.corrections recorded with their policy (else the `init` checkpoint) into out_dir/corrections
    (what is missing of them), from their own seeds (vla.apps.rollout.CORRECTIONS_SEED_OFFSET)."""
    corrections = config.data.corrections
    if corrections.episodes:
        policy = corrections.policy or str(init)
        record_dataset(corrections_dir(config), list(corrections.takeover), corrections.episodes, policy,
                       _collect_sims(config, corrections.takeover), seed=CORRECTIONS_SEED_OFFSET,
                       workers=corrections.workers, expert_takeover=corrections.takeover)


def _collect_sims(config: TrainConfig, tasks) -> dict[str, SimConfig]:
    """Per task, the SimConfig its episodes are recorded with."""
    return {task: SimConfig.for_spec(config.model.spec, **config.data.collect.sim_settings(task)) for task in tasks}


def corrections_dir(config: TrainConfig) -> Path:
    return Path(config.out_dir) / "corrections"


def open_dataset(config: TrainConfig, progress: bool) -> EpisodeIndex | IndexUnion:
    """The recipe's dataset, and its corrections after it if it has any."""
    roots = [config.data.dataset] + ([corrections_dir(config)] if config.data.corrections.episodes else [])
    parts = [EpisodeIndex(root, image_size=config.model.image_size, chunk=config.model.chunk,
                          tasks=list(config.data.tasks), imu_window=config.model.imu_window, progress=progress)
             for root in roots]
    return parts[0] if len(parts) == 1 else IndexUnion(parts)


class BatchSchedule:
    """Which samples make up step s's batch on this rank: a fresh DistributedSampler shuffle per
    epoch (seeded by seed and epoch), so any step's batch is known without replaying earlier ones.
    With `groups` (a label per sample: its task), every batch holds the groups in equal shares
    instead of in proportion to their samples (short reach episodes are ~12 % of an all-task
    dataset), each slot a sample of its group drawn from a generator seeded by seed, step and rank."""

    def __init__(self, size: int, batch_size: int, seed: int, rank: int, world: int,
                 groups: np.ndarray | None = None):
        if batch_size % world:
            raise ValueError(f"optim.batch_size ({batch_size}) must be divisible by the number of processes ({world})")
        self.sampler = DistributedSampler(
            range(size), num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True
        )
        self.per_rank = batch_size // world
        self.per_epoch = len(self.sampler) // self.per_rank
        if self.per_epoch == 0:
            raise ValueError(f"the dataset ({size} samples) is smaller than one batch ({batch_size})")
        self.epoch, self.order = -1, []
        self.seed, self.rank = seed, rank
        self.members = None if groups is None else [np.flatnonzero(groups == g) for g in np.unique(groups)]

    def indices(self, step: int) -> list[int]:
        if self.members is not None:
            return self._balanced(step)
        epoch, i = divmod(step, self.per_epoch)
        if epoch != self.epoch:
            self.sampler.set_epoch(epoch)
            self.epoch, self.order = epoch, list(self.sampler)
        return self.order[i * self.per_rank : (i + 1) * self.per_rank]

    def _balanced(self, step: int) -> list[int]:
        rng = np.random.default_rng((self.seed, step, self.rank))
        slots = rng.permutation(np.arange(self.per_rank) % len(self.members))
        return [int(self.members[g][rng.integers(len(self.members[g]))]) for g in slots]


def collate(samples: dict, processor: Processor, device: torch.device, data: DataConfig, seed: int = 0,
            text_multiple: int = 1) -> dict[str, torch.Tensor]:
    """index.batch(...) -> the keyword arguments of VLAModel.forward on `device`, augmented as `data`
    says (random per sample, drawn from `seed`): instructions rephrased, a share with made-up words,
    images shifted; the text trimmed to the batch's longest instruction (to a multiple of
    `text_multiple` columns)."""
    rng = np.random.default_rng(seed)
    texts = samples["instruction"]
    if data.rephrase or data.unknown_verb:
        texts = [rephrased(text, data.rephrase, rng, data.unknown_verb) for text in texts]
    if data.instruction_noise:
        texts = [noisy_instruction(text, rng) if rng.random() < data.instruction_noise else text for text in texts]
    samples = {**samples, "instruction": texts}
    batch = processor.batch(samples)
    batch["text_ids"], batch["text_mask"] = drop_padding(batch["text_ids"], batch["text_mask"], text_multiple)
    if data.image_shift:
        generator = torch.Generator().manual_seed(seed)
        for key in ("image", "wrist_image"):
            if key in batch:
                batch[key] = random_shift(batch[key], data.image_shift, generator)
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def random_shift(images: torch.Tensor, shift: int, generator: torch.Generator) -> torch.Tensor:
    """uint8 [B, H, W, 3]: pad by `shift` with the edge pixels, crop back at a random offset."""
    b, h, w, _ = images.shape
    padded = torch.nn.functional.pad(images.permute(0, 3, 1, 2).float(), (shift,) * 4, mode="replicate")
    offsets = torch.randint(0, 2 * shift + 1, (b, 2), generator=generator).tolist()
    crops = [padded[i, :, y : y + h, x : x + w] for i, (y, x) in enumerate(offsets)]
    return torch.stack(crops).permute(0, 2, 3, 1).to(torch.uint8)


def rephrased(text: str, variants: int, rng: np.random.Generator, unknown_verb: float = 0.0) -> str:
    """One of `variants` training phrasings of `text`'s request (0: `text` itself), or `text` when the
    training grammar could not have written it (a person's words, another dataset's). A share
    `unknown_verb` of push and place requests get a made-up verb instead: what else they say (a
    direction, a bin) names the task, which a verb training never saw ("shift") must not hide."""
    parsed = request(text)
    if parsed is None:
        return text
    task, words = parsed
    if unknown_verb and task in language.NAMED_WITHOUT_VERB and rng.random() < unknown_verb:
        return language.instruction(task, dict(words), "train", rng, verb_word=made_up_word(rng))
    return phrasing(task, words, int(rng.integers(variants))) if variants else text


@functools.lru_cache(maxsize=65536)
def request(text: str) -> tuple[str, tuple[tuple[str, str], ...]] | None:
    """(task, sorted words) of `text` if the training grammar could have written it (kept: a dataset
    repeats its instructions at every step, and parsing tries every template)."""
    parsed = language.parse(normalize_instruction(text))
    return None if parsed is None else (parsed[0], tuple(sorted(parsed[1].items())))


@functools.lru_cache(maxsize=65536)
def phrasing(task: str, words: tuple[tuple[str, str], ...], variant: int) -> str:
    """The `variant`-th training phrasing of a request: the same sentence for every episode asking
    for it (seeded by the request, not the episode)."""
    request = zlib.crc32(repr((task, words)).encode())
    return language.instruction(task, dict(words), "train", np.random.default_rng((request, variant)))


def noisy_instruction(text: str, rng: np.random.Generator) -> str:
    """`text` with 1-2 made-up words (2-6 random letters) inserted at random places (at most 12 more
    tokens: the longest training phrasing, 17 tokens, still fits 32)."""
    words = text.split()
    for _ in range(rng.integers(1, 3)):
        words.insert(rng.integers(len(words) + 1), made_up_word(rng))
    return " ".join(words)


def made_up_word(rng: np.random.Generator) -> str:
    return "".join(rng.choice(LETTERS, rng.integers(2, 7)))
