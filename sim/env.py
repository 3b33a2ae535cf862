"""The Gymnasium environment: a Panda on a table, one language-conditioned task per instance."""
from __future__ import annotations

import dataclasses
import math
import string

import gymnasium as gym
import numpy as np
import pybullet as p

from sim import language
from sim.config import DISTURBANCE_SHARE, SimConfig
from sim.robot import HAND_LINK, Panda
from sim.scene import BIN_INNER_HALF, BIN_WALL, Scene
from sim.sensors import SCENE_EYE, SCENE_TARGET, Camera, Imu, wrist_view
from sim.tasks import TOUCH_DISTANCE, make_task
from vla.contracts.action import ACTION_HIGH, ACTION_LOW, CLOSING, clip_action
from vla.contracts.observation import (
    IMU_CHANNELS,
    INSTRUCTION_CHARSET,
    INSTRUCTION_MAX_LENGTH,
    STATE_DIM,
    ObservationSpec,
)

VIDEO_SIZE = 256
# Episodes start with the grasp point somewhere in this box (base frame, metres), so that a policy
# cannot infer where to go from the arm's state alone.
START_LOW, START_HIGH = np.array([0.35, -0.15, 0.18]), np.array([0.55, 0.15, 0.32])
# Random streams of an episode besides its main one (np.random.default_rng(seed): start pose,
# objects, instruction, IMU), each derived from the seed alone, so that a randomisation switch
# never changes what another draws: a seed means the same scene whatever the switches. ("takeover":
# the step vla collect's scripted expert takes over from a checkpoint, --expert-takeover; "miss":
# whether and how far its first grasp misses, --missed-grasps.)
STREAMS = {"shades": 1, "camera": 2, "lighting": 3, "language": 4, "disturbance": 5, "takeover": 6, "same_colour": 7,
           "miss": 8}
RESET_OPTIONS = ("instruction",)


def stream(seed: int, purpose: str) -> np.random.Generator:
    """The episode's random stream for `purpose` (one of STREAMS), independent of the main one."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(STREAMS[purpose],)))


def observation_space(spec: ObservationSpec) -> gym.spaces.Dict:
    """The observation contract (vla.contracts.observation) as a Gymnasium space."""
    image = gym.spaces.Box(0, 255, (spec.image_size, spec.image_size, 3), np.uint8)
    spaces = {
        "image": image,
        "state": gym.spaces.Box(-np.inf, np.inf, (STATE_DIM,), np.float32),
        "imu": gym.spaces.Box(-np.inf, np.inf, (spec.imu_window, IMU_CHANNELS), np.float32),
        "instruction": gym.spaces.Text(INSTRUCTION_MAX_LENGTH, charset=INSTRUCTION_CHARSET),
    }
    if spec.wrist_camera:
        spaces["wrist_image"] = image
    return gym.spaces.Dict(spaces)


class TabletopEnv(gym.Env):
    """A Panda on a table, one language-conditioned task. Observations and actions follow
    vla.contracts. Each reset rebuilds the world from scratch (resetSimulation), so an episode
    depends only on its seed and options: info["seed"] replays it. The randomisation switches of
    SimConfig (lighting, shades, camera jitter) draw from streams of their own, so a seed gives the
    same objects, colours, instruction and start pose whichever of them are on.

    `reset(seed=..., options=...)` takes these options, for that episode only:
    - "instruction": str, the instruction instead of the task's own phrasing. Fields in braces are
      filled in from the episode's scene: {colour} and {shape} of the object the task is about,
      and the task's own words ({bin_colour} for place, {place} for push: "to the left"), e.g.
      "grab the {colour} {shape}". The result must be a valid instruction (INSTRUCTION_CHARSET,
      at most INSTRUCTION_MAX_LENGTH characters). It changes the words, not the goal: success
      and info["target"] stay the task's. (Setting `env.instruction` after a reset also works;
      the option does it before the first observation.)
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}  # noqa: RUF012 (gymnasium's convention)

    def __init__(
        self, task: str = "reach", config: SimConfig | None = None, render_mode: str | None = None, **overrides
    ):
        config = config or SimConfig()
        if overrides:
            config = dataclasses.replace(config, **overrides)
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode must be None or 'rgb_array', got {render_mode!r}")
        self.config, self.render_mode = config, render_mode
        self.task = make_task(task, config.push_tolerance)
        self.max_steps = config.max_steps or self.task.max_steps
        self.observation_space = observation_space(config.spec)
        self.action_space = gym.spaces.Box(ACTION_LOW, ACTION_HIGH, dtype=np.float32)
        self.client = p.connect(p.GUI if config.gui else p.DIRECT)
        self.camera = Camera(self.client, config.image_size, shadows=config.shadows)
        self._seeds = np.random.default_rng()
        self.episode_seed: int | None = None
        self.instruction = ""

    # ---- gymnasium API --------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        """A new episode: the world rebuilt for `seed` (None: the next of this env's seeds).
        `options`: see the class docstring (unknown ones are refused)."""
        if not isinstance(options, (dict, type(None))):
            raise ValueError(f"reset options must be a dict, got {type(options).__name__}")
        options = options or {}
        unknown = sorted(set(options) - set(RESET_OPTIONS))
        if unknown:
            raise ValueError(f"unknown reset option(s) {unknown}; known: {list(RESET_OPTIONS)}")
        super().reset(seed=seed)
        if seed is not None:
            self._seeds = np.random.default_rng(seed)
            self.episode_seed = int(seed)
        else:
            self.episode_seed = int(self._seeds.integers(2**31))
        rng = np.random.default_rng(self.episode_seed)
        self._build_world(rng)
        if "instruction" in options:
            self.instruction = self._phrase(options["instruction"])
        self.steps, self.touched, self.stages, self.first_close = 0, None, set(), None
        self.closures, self._last_opening = 0, 1.0  # times the hand was commanded shut from open: 2+ is a retry
        self._settle()
        return self._observation(), self._info(False)

    def step(self, action):
        """Execute `action` clipped to the limits (the robot's own; info["action"] is that command,
        without the push that SimConfig.disturbance may add)."""
        action = clip_action(action)
        self.robot.command(self._disturbed(action))
        self._simulate(self.config.substeps)
        self.steps += 1
        ee = self.robot.ee_pose()[0]
        success = self.task.success(self.scene, ee, self.robot.body)
        self.touched = self.touched or self._first_touched(ee)
        if action[-1] < CLOSING <= self._last_opening:
            self.closures += 1
        if self.first_close is None and action[-1] < CLOSING:
            self.first_close = self._nearest_object(ee)
        self._last_opening = action[-1]
        self.stages |= self.task.reached_stages(self.scene, ee, self.robot.body)
        truncated = self.steps >= self.max_steps and not success
        return self._observation(), float(success), success, truncated, self._info(success) | {"action": action}

    def render(self):
        if self.render_mode == "rgb_array":
            return self.camera.render(VIDEO_SIZE)
        return None

    def close(self):
        if p.isConnected(self.client):
            p.disconnect(self.client)

    # ---- internals ------------------------------------------------------------------------
    def _build_world(self, rng: np.random.Generator) -> None:
        c, cfg = self.client, self.config
        p.resetSimulation(physicsClientId=c)
        p.setGravity(0, 0, -9.81, physicsClientId=c)
        p.setTimeStep(1.0 / cfg.physics_hz, physicsClientId=c)
        p.setPhysicsEngineParameter(deterministicOverlappingPairs=1, physicsClientId=c)
        self.scene = Scene(c)
        self.scene.build_table()
        self.robot = Panda(c)
        start = rng.uniform(START_LOW, START_HIGH), rng.uniform(-0.4, 0.4)  # drawn either way: same objects
        if cfg.randomize_start:
            self.robot.reset_to(*start)
        shades = stream(self.episode_seed, "shades") if cfg.randomize_shades else None
        twin = stream(self.episode_seed, "same_colour")
        self.task.build(self.scene, rng, list(cfg.colours), shades, twin if twin.random() < cfg.same_colour else None)
        self.instruction = language.instruction(self.task.name, self.task.words, cfg.phrasing,
                                                stream(self.episode_seed, "language"))
        jitter = np.zeros((2, 3))
        if cfg.camera_jitter:
            jitter = stream(self.episode_seed, "camera").uniform(-cfg.camera_jitter, cfg.camera_jitter, (2, 3))
        self.camera.look_at(SCENE_EYE + jitter[0], SCENE_TARGET + jitter[1])
        if cfg.randomize_lighting:
            light = stream(self.episode_seed, "lighting")
            self.camera.light_direction = tuple(light.uniform([-1, -1, 0.6], [1, 1, 1.4]))
            self.camera.light_colour = tuple(light.uniform(0.75, 1.0, 3))
        self.imu = Imu(c, self.robot.body, HAND_LINK, cfg.imu_hz, cfg.imu_window, rng, cfg.imu_noise)
        self._imu_every = cfg.physics_hz // cfg.imu_hz
        self._pushes = stream(self.episode_seed, "disturbance")

    def _disturbed(self, action: np.ndarray) -> np.ndarray:
        """`action` with this step's push, if any (SimConfig.disturbance), still inside the limits."""
        if not self.config.disturbance:
            return action
        push = self._pushes.normal(0.0, self.config.disturbance, 2) * (self._pushes.random() < DISTURBANCE_SHARE)
        return clip_action(np.concatenate([action[:2] + push, action[2:]]))

    def _phrase(self, template) -> str:
        """The instruction option for this episode: `template` with its fields filled in."""
        if not isinstance(template, str):
            raise ValueError(f"reset option 'instruction' must be a str, got {type(template).__name__}")
        words = self.task.words
        try:
            fields = [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]
        except ValueError as exc:  # an unmatched brace
            raise ValueError(f"instruction {template!r}: {exc}") from None
        unknown = [field for field in fields if field not in words]
        if unknown:
            raise ValueError(
                f"instruction {template!r}: unknown field(s) {unknown}; the {self.task.name} task fills {sorted(words)}"
            )
        instruction = template.format(**words)
        if not instruction.strip() or len(instruction) > INSTRUCTION_MAX_LENGTH:
            raise ValueError(f"instruction {instruction!r}: expected 1 to {INSTRUCTION_MAX_LENGTH} characters")
        bad = "".join(sorted(set(instruction) - set(INSTRUCTION_CHARSET)))
        if bad:
            raise ValueError(f"instruction {instruction!r}: characters {bad!r} are not allowed (allowed: letters, "
                             f"digits and {''.join(c for c in INSTRUCTION_CHARSET if not c.isalnum())!r})")
        return instruction

    def _settle(self) -> None:
        """Let objects come to rest and fill the IMU window before the first observation."""
        samples_per_step = self.config.substeps // self._imu_every
        self._simulate(self.config.substeps * max(1, math.ceil(self.config.imu_window / samples_per_step)))

    def _simulate(self, substeps: int) -> None:
        for k in range(1, substeps + 1):
            p.stepSimulation(physicsClientId=self.client)
            if k % self._imu_every == 0:
                self.imu.sample()

    def _observation(self) -> dict:
        obs = {
            "image": self.camera.render(),
            "state": self.robot.state(),
            "imu": self.imu.window(),
            "instruction": self.instruction,
        }
        if self.config.wrist_camera:
            saved = self.camera.view
            self.camera.look_at(*wrist_view(*self.robot.ee_pose()))
            obs["wrist_image"] = self.camera.render()
            self.camera.view = saved
        return obs

    def _first_touched(self, ee: np.ndarray) -> str | None:
        """The object the gripper reaches first (grasp point within touch distance, or contact):
        which object a policy went for, for language-grounding reports. Bins are not handled."""
        for obj in self.scene.objects:
            if obj.shape != "bin" and (
                np.linalg.norm(self.scene.position(obj) - ee) < TOUCH_DISTANCE
                or self.scene.in_contact(obj.body, self.robot.body)
            ):
                return obj.name
        return None

    def _nearest_object(self, ee: np.ndarray) -> dict:
        """The object (bins too) nearest the grasp point seen from above, and how far [m] from its
        centre (from a bin's outline: 0 over it): where a policy closed its gripper."""
        def distance(obj) -> float:
            offset = np.abs(self.scene.position(obj)[:2] - ee[:2])
            if obj.shape == "bin":
                offset = np.maximum(offset - (BIN_INNER_HALF + BIN_WALL), 0.0)
            return float(np.linalg.norm(offset))

        distances = {obj.name: distance(obj) for obj in self.scene.objects}
        name = min(distances, key=distances.get)
        return {"object": name, "distance": round(distances[name], 4)}

    def _info(self, success: bool) -> dict:
        return {
            "success": success,
            "is_success": success,
            "task": self.task.name,
            "seed": self.episode_seed,
            "steps": self.steps,
            "target": self.task.target.name,
            "touched": self.touched,
            # the gripper first commanded closed (opening < CLOSING): the nearest object; None before
            "first_close": self.first_close,
            "closures": self.closures,
            "stages": [stage for stage in self.task.stages if stage in self.stages],  # reached so far
        }
