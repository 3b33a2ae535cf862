"""The episode options of `vla sim`, `vla demo` (and `vla eval`, in test_evaluate.py), as people use
them: --randomize, --instruction, --threads; `vla collect --randomize`; bad values are one line."""
import json

import pytest
import torch

from policies import CHECKPOINT_DIR
from sim.config import CAMERA_JITTER
from vla.cli import main as vla


def _episodes(path) -> list[dict]:
    return json.loads(path.read_text())


def test_vla_sim_randomize_and_instruction_keep_each_seeds_scene(tmp_path, capsys):
    """The scripted expert reads the true state, so under randomisation (which only changes the
    picture) and other words it runs the very same episodes."""
    plain, varied = tmp_path / "plain.json", tmp_path / "varied.json"
    common = ["sim", "--task", "reach,place", "--episodes", "2", "--seed", "7"]
    assert vla([*common, "--report", str(plain)]) == 0
    assert vla([*common, "--report", str(varied), "--randomize", "lighting,shades,jitter",
                "--instruction", "grab the {colour} {shape} now"]) == 0
    before, after = _episodes(plain), _episodes(varied)
    keys = ("task", "seed", "success", "steps", "target", "touched")
    assert [[e[k] for k in keys] for e in after] == [[e[k] for k in keys] for e in before]
    assert [e["instruction"] for e in after] == [f"grab the {e['target']} now" for e in before]
    assert all(e["success"] for e in after)
    assert "reach" in capsys.readouterr().out


def test_vla_sim_threads_sets_the_checkpoints_inference_threads(tmp_path):
    checkpoint = CHECKPOINT_DIR / "default"
    if not checkpoint.is_dir():
        pytest.skip(f"no shipped checkpoint at {checkpoint}")
    report, threads = tmp_path / "r.json", torch.get_num_threads()
    want = 2 if threads != 2 else 1
    try:
        assert vla(["sim", "--policy", str(checkpoint), "--task", "reach", "--episodes", "1",
                    "--threads", str(want), "--randomize", "all", "--report", str(report)]) == 0
        assert torch.get_num_threads() == want
    finally:
        torch.set_num_threads(threads)
    assert len(_episodes(report)) == 1


def test_vla_demo_takes_the_same_options(tmp_path):
    report = tmp_path / "demo.json"
    assert vla(["demo", "--policy", "expert", "--task", "push", "--episodes", "1", "--video", str(tmp_path / "d.gif"),
                "--report", str(report), "--randomize", "all", "--instruction", "move the {colour} cube {place}"]) == 0
    (episode,) = _episodes(report)
    assert episode["instruction"].startswith(f"move the {episode['target']} ") and episode["success"]


def test_vla_collect_records_the_randomisation_in_the_manifest(tmp_path):
    out = tmp_path / "data"
    command = ["collect", "--task", "reach", "--episodes", "1", "--out", str(out), "--randomize", "lighting,jitter"]
    assert vla(command) == 0
    (episode,) = json.loads((out / "manifest.json").read_text())["episodes"]
    config = episode["sim_config"]
    assert config["randomize_lighting"] and not config["randomize_shades"] and config["camera_jitter"] == CAMERA_JITTER


@pytest.mark.parametrize("command", ["sim", "demo", "eval", "collect"])
@pytest.mark.parametrize("option, message", [
    (["--threads", "-1"], "--threads must be >= 0"),
    (["--randomize", "fog"], "--randomize: unknown randomisation 'fog'; choose from lighting, shades, jitter"),
    (["--randomize", "jitter=0.5"], "--randomize: 'jitter=0.5': expected 0 to 0.1 metres"),
    (["--instruction", "grab the {size} ball"], r"unknown field(s) ['size']; the reach task fills"),
])
def test_bad_episode_options_are_one_line(command, option, message, tmp_path, capsys):
    if command == "collect" and option[0] != "--randomize":
        pytest.skip("vla collect has --randomize only")
    if command == "eval" and option[0] == "--instruction" and not (CHECKPOINT_DIR / "default").is_dir():
        pytest.skip("no shipped checkpoint")
    where = {
        "sim": ["--task", "reach", "--episodes", "1"],
        "demo": ["--policy", "expert", "--task", "reach", "--episodes", "1", "--video", str(tmp_path / "v.gif"),
                 "--report", str(tmp_path / "r.json")],
        "eval": ["--checkpoint", str(CHECKPOINT_DIR / "default"), "--task", "reach", "--episodes", "1",
                 "--video-episodes", "0", "--device", "cpu", "--out", str(tmp_path)],
        "collect": ["--task", "reach", "--episodes", "1", "--out", str(tmp_path / "data")],
    }[command]
    assert vla([command, *where, *option]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error") == 1
    line = err.strip().splitlines()[-1]  # after any progress bar
    assert line.startswith(f"vla {command}: error: ") and message in line
    assert not (tmp_path / "data").exists()
