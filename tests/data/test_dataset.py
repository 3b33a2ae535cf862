"""The dataset's repair on open: a complete bag missing from the manifest is listed again, and one
that does not read is set aside, never deleted."""
import numpy as np

from vla.data.dataset import DAMAGED, DatasetWriter, load_manifest


def test_an_unlisted_bag_that_does_not_read_is_set_aside(tmp_path, handmade):
    root = tmp_path / "data"
    DatasetWriter(root).close()
    info = {"task": "reach", "instruction": "touch the red ball", "seed": 0, "success": True, "steps": 2,
            "control_hz": 10}
    handmade(root / "episode_000000", info=info | {"episode": 0})
    nan_state = lambda key, t, fields: fields | {"position": np.full(9, np.nan)} if key == "joint_states" else fields
    handmade(root / "episode_000001", info=info | {"episode": 1}, edit=nan_state)
    log = []
    DatasetWriter(root, log=log.append).close()
    assert [e["path"] for e in load_manifest(root)] == ["episode_000000"]
    assert "repaired: " in log[0] and "/joint_states: 3 message(s) with NaN" in log[1]
    [aside] = (root / DAMAGED).iterdir()
    assert aside.name.startswith("episode_000001-") and (aside / "metadata.yaml").is_file()
