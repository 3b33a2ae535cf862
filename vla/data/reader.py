"""Read one episode (a rosbag2 directory with MCAP storage, or a bare .mcap file) back into numpy,
and align its streams to control steps: observation t = the latest message of each sensor at or
before action t's stamp. /vla/action has no header, so an action's stamp is that of the twist
published with it (the policy node stamps a twist with the camera frame it answers): a recorder
that receives commands late then still pairs each with its own observation, not a newer one.

Any bag with the standard topics works (sim or robot); every problem is an EpisodeError naming the
file, one line. Nothing read is trusted: the MCAP file is verified against its CRCs before it is
parsed (vla.data.mcapfile), the metadata's types and ranges are checked, and states, IMU samples
and actions must be finite and plausible (the observation and action contracts' limits), so that
no NaN or absurd value reaches training. Messages are decoded with the standard ROS 2 message
definitions: an order of magnitude faster than rosbags' AnyReader, which builds a typestore from
every bag's embedded definitions (the tests use AnyReader as the independent reader).
"""
from __future__ import annotations

import json
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePath

import numpy as np
import yaml
from rosbags.serde import SerdeError

from vla.contracts.action import ACTION_HIGH, ACTION_LOW
from vla.contracts.observation import (
    IMAGE_SIZE,
    IMU_LIMITS,
    IMU_WINDOW,
    INSTRUCTION_MAX_LENGTH,
    STATE_LIMIT,
    ObservationSpec,
)
from vla.contracts.topics import MSG_TYPES, TOPICS
from vla.data.mcapfile import McapDamage, read_records
from vla.data.messages import (
    TYPESTORE,
    action_from_msg,
    image_from_msg,
    imu_sample_from_msg,
    stamp_from_header,
    state_from_msg,
    twist_vector,
)
from vla.data.writer import CUSTOM_DATA_KEY
from vla.images import fit_image

# Episode metadata fields (datasets/README.md) -> their types; seed and success are None in robot
# recordings. REQUIRED_INFO must be present.
INFO_TYPES = {"task": (str,), "instruction": (str,), "seed": (int, type(None)), "success": (bool, type(None)),
              "steps": (int,), "control_hz": (int, float), "imu_window": (int,), "image_size": (int,),
              "wrist_camera": (bool,), "imu_hz": (int, float), "episode": (int,), "sim_config": (dict,)}
REQUIRED_INFO = ("task", "instruction", "seed", "success", "steps", "control_hz")
MAX_CONTROL_HZ = 1000
MAX_NAME = 100  # characters of a task name
MAX_PROBLEM = 300  # characters of a problem description: values quoted in it are cut
REQUIRED_TOPICS = ("image", "joint_states", "imu", "action")
# Decoded topics (/vla/cmd_twist and /vla/gripper repeat /vla/action; only the twists' stamps are read).
DECODED = REQUIRED_TOPICS + ("wrist_image", "instruction", "episode_info", "cmd_twist")
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class EpisodeError(ValueError):
    """A bag that cannot be used as an episode; the message names the file and the problem, on one
    line of bounded length."""

    def __init__(self, path: Path, problem: str):
        problem = " ".join(str(problem).split())
        if len(problem) > MAX_PROBLEM:
            problem = problem[:MAX_PROBLEM] + "..."
        super().__init__(f"{path}: {problem}")
        self.path, self.problem = Path(path), problem


@dataclass
class Episode:
    """The decoded streams of one bag, each with its stamps (ns)."""

    path: Path
    info: dict
    images: list[np.ndarray]
    image_stamps: np.ndarray
    wrist_images: list[np.ndarray] | None
    wrist_stamps: np.ndarray | None
    states: np.ndarray  # float32[N, 15], from /joint_states
    state_stamps: np.ndarray
    imu: np.ndarray  # float64[M, 6], one row per /imu/data message
    imu_stamps: np.ndarray
    actions: np.ndarray  # float32[T, 7]
    action_stamps: np.ndarray  # stamps of the observations the actions answer
    instructions: list[str]
    instruction_stamps: np.ndarray  # log times: std_msgs/String has no header
    action_logged: np.ndarray  # the actions' log times, to compare with the instructions'

    def __len__(self) -> int:
        return len(self.actions)

    def steps(self, image_size: int | None = None, imu_window: int | None = None) -> dict:
        """Per-step arrays for training: images [T,S,S,3] (resized with INTER_AREA to image_size),
        wrist_images (or None), states [T,15], imu [T,W,6], actions [T,7], instructions (T strings)."""
        window = imu_window or int(self.info.get("imu_window", 12))
        at = self.action_stamps
        images = [self.images[i] for i in self._latest("image", self.image_stamps, at)]
        wrist = None
        if self.wrist_images is not None:
            wrist = _stack(
                [self.wrist_images[i] for i in self._latest("wrist_image", self.wrist_stamps, at)], image_size
            )
        last_imu = self._latest("imu", self.imu_stamps, at)
        # Windows shorter than `window` (start of a recording) repeat their oldest sample.
        rows = np.clip(last_imu[:, None] + np.arange(1 - window, 1)[None, :], 0, None)
        instructions = [
            self.instructions[i] if i >= 0 else self.info["instruction"]
            for i in np.searchsorted(self.instruction_stamps, self.action_logged, side="right") - 1
        ]
        return {
            "images": _stack(images, image_size),
            "wrist_images": wrist,
            "states": self.states[self._latest("joint_states", self.state_stamps, at)],
            "imu": self.imu[rows].astype(np.float32),
            "actions": self.actions,
            "instructions": instructions,
        }

    def _latest(self, key: str, stamps: np.ndarray, at: np.ndarray) -> np.ndarray:
        index = np.searchsorted(stamps, at, side="right") - 1
        if index[0] < 0:
            raise EpisodeError(self.path, f"no {TOPICS[key]} message at or before the first action")
        return index


def _stack(images: list[np.ndarray], size: int | None) -> np.ndarray:
    if size is not None:
        images = [fit_image(im, size) for im in images]
    return np.stack(images)


def bag_path(path: str | Path) -> Path:
    """The path to open: a rosbag2 directory or a .mcap file; EpisodeError/FileNotFoundError otherwise."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"episode not found: {path}")
    if path.is_dir() and not (path / "metadata.yaml").is_file():
        raise EpisodeError(path, "not a rosbag2 directory (no metadata.yaml)")
    if path.is_file() and path.suffix != ".mcap":
        raise EpisodeError(path, "not a rosbag2 directory or .mcap file")
    return path


def read_episode(path: str | Path) -> Episode:
    """Decode every stream of the bag at `path`."""
    path = bag_path(path)
    meta = _bag_metadata(path) if path.is_dir() else {}
    streams: dict[str, list] = {key: [] for key in DECODED}
    stamps: dict[str, list] = {key: [] for key in DECODED}
    for file in _storage_files(path, meta):
        _read_mcap(file, streams, stamps)
    if not streams["action"]:
        raise EpisodeError(path, f"empty episode: no {TOPICS['action']} messages")
    silent = [TOPICS[k] for k in REQUIRED_TOPICS if not streams[k]]
    if silent:
        raise EpisodeError(path, f"missing topic(s) or no messages on {silent}")
    text = (meta.get("custom_data") or {}).get(CUSTOM_DATA_KEY)
    recorded = streams["episode_info"][-1] if streams["episode_info"] else None
    if text is not None and recorded is not None and text != recorded:  # the message is CRC-protected, the YAML not
        raise EpisodeError(path / "metadata.yaml", f"custom_data {CUSTOM_DATA_KEY!r} differs from the bag's "
                           f"{TOPICS['episode_info']} (damaged or edited)")
    if text is None and recorded is None:
        raise EpisodeError(path, f"no episode metadata (custom_data {CUSTOM_DATA_KEY!r} or {TOPICS['episode_info']})")
    info = _parse_info(path, text if text is not None else recorded)
    return _episode(path, info, streams, stamps)


def _bag_metadata(path: Path) -> dict:
    file = path / "metadata.yaml"
    try:
        meta = yaml.load(file.read_text(), Loader=_YAML_LOADER)["rosbag2_bagfile_information"]
    except (OSError, UnicodeDecodeError, yaml.YAMLError, RecursionError, KeyError, TypeError) as exc:
        raise EpisodeError(file, f"invalid rosbag2 metadata: {exc!r}") from None
    files = meta.get("relative_file_paths") if isinstance(meta, dict) else None
    if not isinstance(files, list) or not all(isinstance(name, str) for name in files):
        raise EpisodeError(file, "invalid rosbag2 metadata: relative_file_paths is not a list of file names")
    custom = meta.get("custom_data")
    if custom is not None and not (isinstance(custom, dict) and all(isinstance(v, str) for v in custom.values())):
        raise EpisodeError(file, "invalid rosbag2 metadata: custom_data is not a mapping of strings")
    return meta


def _storage_files(path: Path, meta: dict) -> list[Path]:
    if path.is_file():
        return [path]
    storage = meta.get("storage_identifier")
    if storage != "mcap":
        raise EpisodeError(path, f"storage {storage!r} is not supported, only mcap (`ros2 bag convert` converts)")
    if meta.get("compression_mode") or meta.get("compression_format"):
        raise EpisodeError(
            path, f"{meta.get('compression_mode')!r} compression is not supported (MCAP chunk compression is)"
        )
    files = [path / PurePath(name).name for name in meta["relative_file_paths"]]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise EpisodeError(path, f"storage file(s) missing: {missing}")
    return files


def _parse_info(path: Path, text: str) -> dict:
    try:
        info = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise EpisodeError(path, f"episode metadata is not valid JSON: {exc}") from None
    problem = info_problem(info)
    if problem:
        raise EpisodeError(path, problem)
    return info


def info_problem(info) -> str | None:
    """What is wrong with episode metadata (REQUIRED_INFO, INFO_TYPES and the observation contract's
    bounds), or None. Also used for the manifest's entries."""
    if not isinstance(info, dict):
        return f"episode metadata is a {type(info).__name__}, not a mapping"
    missing = [key for key in REQUIRED_INFO if key not in info]
    if missing:
        return f"episode metadata lacks {missing}"
    for key, types in INFO_TYPES.items():
        value = info.get(key)
        if key in info and (not isinstance(value, types) or (isinstance(value, bool) and bool not in types)):
            return f"episode metadata {key}={_quote(value)} is not {' or '.join(t.__name__ for t in types)}"
    if not 0 < info["control_hz"] <= MAX_CONTROL_HZ or info["steps"] < 0 or (info["seed"] or 0) < 0:
        return (f"episode metadata control_hz={info['control_hz']!r}, steps={info['steps']!r} or "
                f"seed={info['seed']!r} is out of range")
    if not 0 < len(info["task"]) <= MAX_NAME or len(info["instruction"]) > INSTRUCTION_MAX_LENGTH:
        return (f"episode metadata task={_quote(info['task'])} or instruction={_quote(info['instruction'])} "
                "is empty or too long")
    try:
        ObservationSpec(info.get("image_size", IMAGE_SIZE), info.get("imu_window", IMU_WINDOW))
    except ValueError as exc:
        return f"episode metadata: {exc}"
    return None


def _quote(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:40] + "..."


def _read_mcap(file: Path, streams: dict, stamps: dict) -> None:
    """Append the decoded messages of the known topics in `file` to streams/stamps."""
    keys = {TOPICS[key]: key for key in DECODED}
    try:
        schemas, channels, messages = read_records(file.read_bytes())
        topics = _check_channels(file, schemas, channels)
        for message in messages:
            channel = channels.get(message.channel_id)
            if channel is None:
                raise EpisodeError(file, f"a message on channel {message.channel_id}, which the file does not define")
            key = keys.get(topics.get(channel.id))
            if key is None:
                continue
            msg = TYPESTORE.deserialize_cdr(message.data, schemas[channel.schema_id].name)
            if key == "cmd_twist":  # ordered by when it was logged, beside the action logged with it
                stamps[key].append(message.log_time)
                streams[key].append((stamp_from_header(msg.header), twist_vector(msg)))
                continue
            stamps[key].append(stamp_from_header(msg.header) if hasattr(msg, "header") else message.log_time)
            streams[key].append(_convert(file, key, msg))
    except EpisodeError:
        raise
    except McapDamage as exc:
        raise EpisodeError(file, str(exc)) from None
    except OSError as exc:
        raise EpisodeError(file, f"cannot read: {exc!r}") from None
    except (SerdeError, struct.error, ValueError, KeyError, IndexError, TypeError, AssertionError) as exc:
        raise EpisodeError(file, f"bad message: {exc!r}") from None


def _check_channels(file: Path, schemas: dict, channels: dict) -> dict[int, str]:
    """channel id -> topic of the channels of known topics, each with its standard type in CDR."""
    keys = {topic: key for key, topic in TOPICS.items()}
    known = {cid: channel.topic for cid, channel in channels.items() if channel.topic in keys}
    for cid, topic in known.items():
        channel, expected = channels[cid], MSG_TYPES[keys[topic]]
        schema = schemas.get(channel.schema_id)
        if channel.message_encoding != "cdr":
            raise EpisodeError(file, f"{topic}: message encoding {channel.message_encoding!r}, expected 'cdr'")
        if schema is None or schema.name != expected:
            raise EpisodeError(file, f"{topic}: type {getattr(schema, 'name', None)}, expected {expected}")
    repeated = sorted(topic for topic, n in Counter(known.values()).items() if n > 1)
    if repeated:
        raise EpisodeError(file, f"topic(s) {repeated} recorded on several channels")
    return known


def _convert(file: Path, key: str, msg):
    try:
        if key in ("image", "wrist_image"):
            return image_from_msg(msg)
        converters = {"joint_states": state_from_msg, "imu": imu_sample_from_msg, "action": action_from_msg}
        if key in converters:
            return converters[key](msg)
    except ValueError as exc:
        raise EpisodeError(file, f"{TOPICS[key]}: {exc}") from None
    return msg.data  # std_msgs/String


def _episode(path: Path, info: dict, streams: dict, stamps: dict) -> Episode:
    def ordered(key):  # messages sorted by stamp (log order may differ from header stamps on robots)
        try:
            times = np.asarray(stamps[key], dtype=np.int64)
        except OverflowError:  # a log time beyond 2^63 ns
            raise EpisodeError(path, f"{TOPICS[key]}: a time stamp out of range") from None
        order = np.argsort(times, kind="stable")
        return [streams[key][i] for i in order], times[order]

    images, image_stamps = ordered("image")
    wrist, wrist_stamps = ordered("wrist_image") if streams["wrist_image"] else (None, None)
    states, state_stamps = ordered("joint_states")
    imu, imu_stamps = ordered("imu")
    actions, action_logged = ordered("action")
    twists, twist_logged = ordered("cmd_twist")
    action_stamps = _answered_stamps(np.stack(actions) if actions else np.zeros((0, 7)), action_logged, twists,
                                     twist_logged, float(info["control_hz"]))
    instructions, instruction_stamps = ordered("instruction")
    episode = Episode(
        path,
        info,
        images,
        image_stamps,
        wrist,
        wrist_stamps,
        np.stack(states),
        state_stamps,
        np.stack(imu),
        imu_stamps,
        np.stack(actions),
        action_stamps,
        instructions,
        instruction_stamps,
        action_logged,
    )
    if info["steps"] != len(episode.actions):
        raise EpisodeError(path, f"the metadata says {info['steps']} steps, but the bag has {len(episode)} actions")
    _check_values(episode)
    return episode


def _check_values(episode: Episode) -> None:
    """Finite states, IMU samples and actions within the contracts' limits (what the runtime accepts,
    so that training never sees NaN or absurd values), and camera images of one size."""
    for key, values, low, high in (
        ("joint_states", episode.states, -STATE_LIMIT, STATE_LIMIT),
        ("imu", episode.imu, -IMU_LIMITS, IMU_LIMITS),
        ("action", episode.actions, ACTION_LOW - 1e-6, ACTION_HIGH + 1e-6),
    ):
        bad = ~(np.isfinite(values) & (values >= low) & (values <= high)).all(axis=1)
        if bad.any():
            first = np.round(values[bad][0], 4).tolist()
            raise EpisodeError(episode.path, f"{TOPICS[key]}: {bad.sum()} message(s) with NaN, inf or values beyond "
                               f"the limits (first: {first})")
    for key, images in (("image", episode.images), ("wrist_image", episode.wrist_images or [])):
        shapes = sorted({image.shape for image in images})
        if len(shapes) > 1:
            raise EpisodeError(episode.path, f"{TOPICS[key]}: the image size changes within the episode ({shapes[:2]})")


def _answered_stamps(actions: np.ndarray, action_logged: np.ndarray, twists: list, twist_logged: np.ndarray,
                     control_hz: float) -> np.ndarray:
    """Each action's stamp: the header stamp of the twist published with it, which commands the same
    motion (twist = delta x control_hz) and was logged nearest to it; the twists of a holding policy
    node, and any a loaded recorder logged in a burst, do not pair with the wrong action. Without a
    twist commanding it (or no twists at all), the nearest logged twist, or its own log time."""
    if not twists:
        return action_logged
    stamps = np.array([stamp for stamp, _ in twists], dtype=np.int64)
    commanded = np.stack([vector for _, vector in twists]) / control_hz
    paired = []
    for action, logged in zip(actions, action_logged):
        distance = np.abs(twist_logged - logged).astype(np.float64)
        same = np.all(np.abs(commanded - action[:6]) <= 1e-6 + 1e-5 * np.abs(action[:6]), axis=1)
        paired.append(stamps[np.argmin(np.where(same, distance, np.inf)) if same.any() else np.argmin(distance)])
    return np.asarray(paired, dtype=np.int64)
