"""Fault injection on episodes and datasets (benchmarks/fuzz.py, which runs the same at scale): a
few hundred seeded cases of flipped, overwritten and truncated bytes, wrong types and absurd values
in metadata.yaml and manifest.json, damaged training caches and statistics, and bags recorded with
NaN, implausible values, broken images or duplicated topics. Each outcome must be a clean one-line
error or a documented skip (or, where the damage hit bytes nobody reads, the same data): never
another exception, a hang, or damaged data silently accepted."""
import pytest


@pytest.fixture(scope="module")
def fixtures(fuzz, expert_dataset, tmp_path_factory):
    return fuzz.Fixtures(tmp_path_factory.mktemp("fuzz"), expert_dataset[0], families=("episode", "dataset"))


def campaign(fuzz, fixtures, family: str, count: int):
    counts, bad = fuzz.campaign(fixtures, count, 0, [family], lambda case, work: fuzz.run_in_process(case, work, 20))
    assert not bad, "\n".join(map(str, bad[:10]))
    return {(kind, outcome): n for (_, kind, outcome), n in counts.items()}


def test_damaged_episodes_are_clean_errors(fuzz, fixtures):
    counts = campaign(fuzz, fixtures, "episode", 250)
    assert counts.get(("mcap_bytes", "same"), 0) == 0  # the CRCs cover every byte of the MCAP file
    assert counts[("mcap_bytes", "error")] > 100 and counts[("yaml_edit", "error")] > 20
    assert counts[("content", "error")] > 10 and counts[("content", "valid")] > 0  # and legal bags read


def test_damaged_datasets_are_clean_errors_or_skips(fuzz, fixtures):
    counts = campaign(fuzz, fixtures, "dataset", 100)
    assert counts[("manifest_edit", "error")] > 5 and counts[("episode", "skip")] > 2
    assert counts[("cache", "same")] > 10  # a damaged cache is rebuilt: the same samples
