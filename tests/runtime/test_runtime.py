"""Inference runtimes: torch (eager, static KV cache) and onnxruntime agree; ONNX export validates
before writing and refuses mismatched or damaged files."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from transformers import StaticCache

from vla.model import ModelConfig, create
from vla.model.checkpoint import save_checkpoint
from vla.runtime import load_runtime
from vla.runtime.export import ExportError, export_onnx
from vla.runtime.onnx_backend import PROVIDER_PREFERENCE, OnnxModelError, open_session

TINY = dict(image_size=32, patch_size=16, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
            vision_width=16, text_vocab_size=300, chunk=2, decoders=("parallel", "autoregressive"))
CORPUS = ["touch the red cube", "pick up the blue cube", "push the green cube to the left"]


def make_checkpoint(path, stats, seed=0):
    torch.manual_seed(seed)
    model, processor = create(ModelConfig(**TINY), stats, CORPUS)
    with torch.no_grad():  # a sharper head: decisive logits instead of an untrained model's near-ties
        model.lm.get_output_embeddings().weight.mul_(20.0)
    return save_checkpoint(path, model, processor)


def loaded(checkpoint):
    runtime = load_runtime(checkpoint, "torch", "cpu")
    return runtime.decode.model, runtime.processor


@pytest.fixture(scope="module")
def exported(tmp_path_factory, stats, observations):
    checkpoint = make_checkpoint(tmp_path_factory.mktemp("ckpt") / "model", stats)
    report = export_onnx(*loaded(checkpoint), checkpoint, checkpoint / "model.onnx", observations(8, seed=1))
    return checkpoint, report


def test_static_cache_decoding_matches_dynamic_cache(tmp_path, stats, observations):
    runtime = load_runtime(make_checkpoint(tmp_path / "m", stats), "torch", "cpu", "autoregressive")
    model = runtime.decode.model
    inputs = runtime.processor.inputs(observations(4))
    with torch.inference_mode():
        expected = model.generate_autoregressive(**inputs)
        cache = StaticCache(
            config=model.lm.config, max_cache_len=model.config.prefix_length + model.config.action_tokens
        )
        first = model.generate_autoregressive(**inputs, cache=cache)
        again = model.generate_autoregressive(**inputs, cache=cache)  # rewound and reused, as in a CUDA graph
    assert torch.equal(first, expected) and torch.equal(again, expected)


def test_onnx_matches_torch_bins_on_cpu(exported, observations):
    checkpoint, report = exported
    assert report["bins_disagreeing"] == 0 and report["logits_outside_tolerance"] == 0
    torch_rt = load_runtime(checkpoint, "torch", "cpu", "parallel")
    onnx_rt = load_runtime(checkpoint, "onnx", "cpu")
    assert "CPUExecutionProvider" in onnx_rt.name
    for batch in (1, 5):  # the exported batch axis is dynamic
        obs = observations(batch, seed=10 + batch)
        inputs = torch_rt.processor.inputs(obs)
        assert torch.equal(torch_rt.decode(inputs), onnx_rt.decode(inputs))
        assert np.array_equal(torch_rt.predict(obs), onnx_rt.predict(obs))
        assert torch_rt.predict(obs).shape == (batch, 2, 7)


@pytest.mark.parametrize("film", [{"film_text": "conv"}, {"film_text": "conv", "film_gripper": True},
                                  {"film_text": "conv", "film_gripper": True, "film_gripper_gate": True}])
def test_onnx_export_of_a_convolved_film_condition(tmp_path, stats, observations, film):
    torch.manual_seed(0)
    model, processor = create(ModelConfig(**{**TINY, **film}), stats, CORPUS)
    checkpoint = save_checkpoint(tmp_path / "model", model, processor)
    report = export_onnx(*loaded(checkpoint), checkpoint, checkpoint / "model.onnx", observations(4, seed=1))
    assert report["bins_disagreeing"] == 0 and report["logits_outside_tolerance"] == 0


def test_onnx_from_another_checkpoint_is_refused(exported, tmp_path, stats):
    checkpoint, _ = exported
    other = make_checkpoint(tmp_path / "other", stats, seed=1)
    with pytest.raises(OnnxModelError, match="does not match checkpoint"):
        load_runtime(other, "onnx", "cpu", onnx=checkpoint / "model.onnx")


def test_truncated_onnx_is_refused(exported, tmp_path):
    checkpoint, _ = exported
    data = (checkpoint / "model.onnx").read_bytes()
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(data[: len(data) // 2])
    with pytest.raises(OnnxModelError, match="truncated or corrupt"):
        load_runtime(checkpoint, "onnx", "cpu", onnx=broken)
    with pytest.raises(OnnxModelError, match="no such ONNX file"):
        load_runtime(checkpoint, "onnx", "cpu", onnx=tmp_path / "missing.onnx")


def test_export_that_fails_validation_writes_nothing(exported, tmp_path, observations):
    checkpoint, _ = exported
    out = tmp_path / "refused.onnx"
    with pytest.raises(ExportError, match="nothing written"):
        export_onnx(*loaded(checkpoint), checkpoint, out, observations(2), atol=-1.0)  # no tolerance can pass
    assert not out.exists() and not list(tmp_path.glob("*.partial"))


def test_bad_backend_and_device_fail_clearly(exported):
    checkpoint, _ = exported
    with pytest.raises(ValueError, match="backend must be one of"):
        load_runtime(checkpoint, "tensorflow", "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            load_runtime(checkpoint, "torch", "cuda")
    if set(ort.get_available_providers()) & set(PROVIDER_PREFERENCE) == {"CPUExecutionProvider"}:
        with pytest.raises(OnnxModelError, match="no GPU provider") as refused:
            open_session(checkpoint / "model.onnx", loaded(checkpoint)[0], checkpoint, "cuda")
        assert "corrupt" not in str(refused.value)  # the file is fine: say what is missing, not blame it


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_non_finite_or_absurd_observations_never_become_actions(exported, observations, backend):
    """NaN in the state once made every logit NaN and the action the 1 % quantile on every axis."""
    checkpoint, _ = exported
    runtime = load_runtime(checkpoint, backend, "cpu")
    obs = observations(1)[0]
    for bad in (
        {"state": np.full(15, np.nan, np.float32)},
        {"imu": np.full((12, 6), 1e300)},
        {"state": np.full(15, np.inf, np.float32)},
    ):
        with pytest.raises(ValueError, match=r"observation '(state|imu)'"):
            runtime.predict({**obs, **bad})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("decoder", ["parallel", "autoregressive"])
def test_cuda_graph_matches_eager_cuda(exported, observations, decoder):
    checkpoint, _ = exported
    graph = load_runtime(checkpoint, "torch", "cuda", decoder)
    eager = load_runtime(checkpoint, "torch", "cuda", decoder, cuda_graphs=False)
    obs = observations(3, seed=5)
    agree = (graph.predict(obs) == eager.predict(obs)).mean()
    assert agree > 0.95  # bf16 graph vs bf16 autocast eager: rare rounding ties only
    assert next(eager.decode.model.parameters()).dtype == torch.float32  # the graph casts its own copy


def test_large_model_weights_are_exported_beside_the_graph(exported, tmp_path, observations):
    """Weights over the threshold (protobuf caps a file at 2 GiB; here forced with a threshold of 0)
    go to <out>.data, and the pair loads and matches; a later small export removes the stale file."""
    checkpoint, _ = exported
    model, processor = loaded(checkpoint)
    out = tmp_path / "big.onnx"
    export_onnx(model, processor, checkpoint, out, observations(2), external_data_bytes=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data"]
    graph = onnx.load(str(out), load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in graph.graph.initializer)
    obs = observations(3, seed=7)
    assert np.array_equal(
        load_runtime(checkpoint, "onnx", "cpu", onnx=out).predict(obs),
        load_runtime(checkpoint, "torch", "cpu", "parallel").predict(obs),
    )
    export_onnx(model, processor, checkpoint, out, observations(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx"]
