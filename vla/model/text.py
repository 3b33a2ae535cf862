"""Text side of the multimodal sentence: instruction normalisation, the tokenizer, and the prompt ->
fixed-length token ids.

From scratch, the tokenizer is a byte-level BPE trained on a corpus of instructions the caller
hands in (training passes the simulator's instructions), so common words are single tokens and
unseen words still tokenize, as bytes. With a pretrained backbone it is the backbone's own
tokenizer. Either way our special tokens (padding, action start, sensor placeholders) are added,
and it is saved with the checkpoint as tokenizer.json, loadable with transformers'
PreTrainedTokenizerFast/AutoTokenizer.
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from vla.model.config import SENSOR_PLACEHOLDERS, ModelConfig
from vla.model.language_prior import LanguagePrior

PAD, ACTION_START = "<pad>", "<act>"
PRIOR_TEXT = "<text>"  # a position that takes a language prior's state (ModelConfig.language_prior)
SPECIAL_TOKENS = [PAD, ACTION_START, *SENSOR_PLACEHOLDERS.values(), PRIOR_TEXT]
_NOT_A_WORD = re.compile(r"[^\w\s'<>-]+")  # punctuation goes; <...> stays so special tokens are caught


def normalize_instruction(text: str) -> str:
    """What people type -> what the model reads: lower case, punctuation dropped, whitespace
    collapsed ("  Touch the RED ball!" -> "touch the red ball")."""
    return " ".join(_NOT_A_WORD.sub(" ", text.lower()).split())


def build_tokenizer(corpus: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on the (normalised) `corpus` (deterministic, a fraction of a second)."""
    if not corpus:
        raise ValueError("the tokenizer needs a non-empty corpus of instructions")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([normalize_instruction(text) for text in corpus], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token=PAD)


def load_pretrained_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """A pretrained backbone's own tokenizer, with our special tokens added."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.add_tokens(SPECIAL_TOKENS, special_tokens=True)
    return tokenizer


@dataclass(frozen=True)
class TokenIds:
    """The token ids the model itself needs: where sensors go, where actions start, where a language
    prior's states go (-1 without one), and the first action bin's id (bins are the ids
    action_offset .. action_offset + bins - 1)."""

    pad: int
    action_start: int
    placeholders: dict[str, int]
    action_offset: int
    prior_text: int = -1

    @classmethod
    def of(cls, tokenizer: PreTrainedTokenizerBase, config: ModelConfig) -> TokenIds:
        # tokenizers of checkpoints from before the language prior lack <text>: only the used ones count
        needed = [PAD, ACTION_START, *SENSOR_PLACEHOLDERS.values()] + ([PRIOR_TEXT] if config.language_prior else [])
        ids = dict(zip(needed, tokenizer.convert_tokens_to_ids(needed)))
        missing = [t for t, i in ids.items() if i is None or i == tokenizer.unk_token_id]
        if missing:
            raise ValueError(f"tokenizer lacks the special token(s) {missing}")
        placeholders = {s: ids[SENSOR_PLACEHOLDERS[s]] for s in config.sensors}
        return cls(ids[PAD], ids[ACTION_START], placeholders, len(tokenizer), ids.get(PRIOR_TEXT, -1))


class PromptEncoder:
    """Instructions -> the token ids of the multimodal sentence, always `config.prefix_length` long:
    the prompt with each sensor placeholder repeated once per sensor token, then padding, then the
    action-start token (so the first action is always predicted from the same position). With a
    language prior the instruction becomes one <text> per word piece of the prior's tokenizer."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, config: ModelConfig, prior: LanguagePrior | None = None):
        self.tokenizer, self.config, self.prior = tokenizer, config, prior
        self.ids = TokenIds.of(tokenizer, config)
        self._repeat = {self.ids.placeholders[s]: n for s, n in config.sensor_tokens.items()}
        self._cache: dict[str, list[int]] = {}

    def encode(self, instructions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (ids int64[B, L], mask bool[B, L]); the mask is False on padding."""
        rows = [self._cache.get(text) or self._encode_one(text) for text in instructions]
        ids = torch.tensor(rows, dtype=torch.long)
        return ids, ids != self.ids.pad

    def _encode_one(self, instruction: str) -> list[int]:
        special = [t for t in SPECIAL_TOKENS if t in instruction]
        if special:
            raise ValueError(f"instruction must not contain the special token(s) {special}: {instruction!r}")
        text = normalize_instruction(instruction)
        if self.prior is not None:
            text = PRIOR_TEXT * self.prior.length(text)
        text = self.config.prompt.replace("{instruction}", text)
        ids, n_text = [], 0
        for token in self.tokenizer(text)["input_ids"]:
            if token in self._repeat:
                ids += [token] * self._repeat[token]
            elif n_text < self.config.max_text_tokens:
                ids.append(token)
                n_text += 1
            elif n_text == self.config.max_text_tokens:
                warnings.warn(f"instruction cut to {n_text} text tokens: {instruction!r}", stacklevel=3)
                n_text += 1
        row = ids + [self.ids.pad] * (self.config.prefix_length - 1 - len(ids)) + [self.ids.action_start]
        if len(self._cache) < 10_000:
            self._cache[instruction] = row
        return row
