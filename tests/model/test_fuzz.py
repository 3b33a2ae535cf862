"""Fault injection on checkpoints and runtime inputs (benchmarks/fuzz.py, which runs the same at
scale): damaged config.json values (wrong types, absurd sizes, statistics out of range), flipped,
overwritten and truncated bytes in every checkpoint file, and malformed observations for
`runtime.predict` on torch and onnxruntime. A checkpoint loads with the same actions or fails with
a one-line CheckpointError; predict returns finite actions inside the limits or raises a one-line
ValueError: never another exception, a hang, or damage silently accepted."""
import pytest


@pytest.fixture(scope="module")
def fixtures(fuzz, tmp_path_factory):
    return fuzz.Fixtures(tmp_path_factory.mktemp("fuzz"), families=("checkpoint", "runtime"))


def campaign(fuzz, fixtures, family: str, count: int, accepted=()):
    """Runs the cases; `accepted`: (family, kind, outcome) that are known limitations, not failures."""
    counts, bad = fuzz.campaign(fixtures, count, 0, [family], lambda case, work: fuzz.run_in_process(case, work, 60))
    bad = [b for b in bad if (b[0], b[1], b[3]) not in accepted]
    assert not bad, "\n".join(map(str, bad[:10]))
    return {(family, kind, outcome): n for (family, kind, outcome), n in counts.items()}


def test_damaged_checkpoints_fail_clearly_or_load_unchanged(fuzz, fixtures):
    # Without a checksum (checkpoints saved before there was one) damaged weights can
    # load if they stay finite: the actions are still inside the limits.
    counts = campaign(fuzz, fixtures, "checkpoint", 60, accepted={("checkpoint-legacy", "model_bytes", "silent")})
    assert counts.get(("checkpoint", "model_bytes", "same"), 0) == 0  # the weights' sha256 catches every byte
    assert counts[("checkpoint", "model_bytes", "error")] > 3 and counts[("checkpoint", "config_edit", "error")] > 5


def test_malformed_observations_are_clear_errors_or_valid_actions(fuzz, fixtures):
    counts = campaign(fuzz, fixtures, "runtime", 200)
    for backend in ("torch", "onnx"):
        assert counts[("runtime", backend, "error")] > 20 and counts[("runtime", backend, "valid")] > 5
