"""The VLA policy: a trained VLAModel behind the Policy interface, executing its action chunks.

The model predicts k future actions per call. Two ways to execute them (the checkpoint names
its own, ModelConfig.execution; `execution` overrides it):
- "ensemble": predict a chunk at every step and execute, for the current step, the
  weighted mean of every chunk's prediction for it, weight exp(-ensemble_decay * age) with age in
  steps since the chunk was predicted (temporal ensembling as in ACT, newest weighted most).
  Closed-loop at every step, and smooth.
- "chunk": predict a chunk, execute its first `execute_steps` actions open-loop (all k when 0),
  then predict again. Fewer model calls; with k = 1 both schemes are the same.
Either way a closed gripper opens only once the model has asked for `gripper_open_steps`
consecutive steps (policies.gripper; the checkpoint's ModelConfig.gripper_open_steps unless given).
"""
from __future__ import annotations

from collections import deque
from pathlib import Path

import numpy as np

from policies.ensemble import temporal_ensemble
from policies.gripper import GripperLatch
from vla.contracts.action import ACTION_DIM
from vla.contracts.observation import ObservationSpec
from vla.model.config import EXECUTIONS
from vla.runtime import Runtime, load_runtime


class VLAPolicy:
    """Executes the action chunks of a Runtime (vla.runtime: torch or onnx, CPU or CUDA)."""

    def __init__(
        self,
        runtime: Runtime,
        execution: str | None = None,
        execute_steps: int = 0,
        ensemble_decay: float = 0.5,
        gripper_open_steps: int | None = None,
    ):
        execution = execution or runtime.config.execution
        if execution not in EXECUTIONS:
            raise ValueError(f"execution must be one of {EXECUTIONS}, got {execution!r}")
        chunk = runtime.chunk
        if not 0 <= execute_steps <= chunk:
            raise ValueError(f"execute_steps must be in 0..{chunk} (the chunk length; 0 = all), got {execute_steps}")
        if ensemble_decay < 0:
            raise ValueError(f"ensemble_decay must be >= 0, got {ensemble_decay}")
        self.runtime, self.execution = runtime, execution
        self.execute_steps = execute_steps or chunk
        self.ensemble_decay = ensemble_decay
        self.gripper = GripperLatch(
            runtime.config.gripper_open_steps if gripper_open_steps is None else gripper_open_steps
        )
        self.reset("")

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        backend: str = "torch",
        device: str = "auto",
        decoder: str | None = None,
        onnx: str | Path | None = None,
        threads: int = 0,
        **kwargs,
    ) -> VLAPolicy:
        return cls(load_runtime(path, backend, device, decoder, onnx, threads=threads), **kwargs)

    @property
    def spec(self) -> ObservationSpec:
        """What the model's observations hold (image size, IMU window, wrist camera)."""
        return self.runtime.config.spec

    def unknown_words(self, instruction: str) -> list[str]:
        """Words of `instruction` the model was not trained on (it still acts: they are worth a warning)."""
        return self.runtime.processor.unknown_words(instruction)

    def reset(self, instruction: str) -> None:
        self.instruction, self.t = instruction, 0
        self.chunks: deque[tuple[int, np.ndarray]] = deque(maxlen=self.runtime.chunk)  # (step predicted, [k, 7])
        self.queue: deque[np.ndarray] = deque()
        self.gripper.reset()

    def act(self, obs: dict) -> np.ndarray:
        instruction = obs.get("instruction") or self.instruction
        if instruction != self.instruction:  # a new instruction mid-episode starts afresh
            self.reset(instruction)
        obs = {**obs, "instruction": instruction}
        if self.execution == "chunk":
            if not self.queue:
                self.queue.extend(self.runtime.predict(obs)[0][: self.execute_steps])
            action = self.queue.popleft()
        else:
            self.chunks.append((self.t, self.runtime.predict(obs)[0]))
            ages = np.array([self.t - start for start, _ in self.chunks])
            predictions = np.stack([chunk[age] for (_, chunk), age in zip(self.chunks, ages)])
            action = temporal_ensemble(predictions, ages, self.ensemble_decay)
        self.t += 1
        # inside the limits: the runtime's chunks are, and the latch only repeats an earlier opening
        return self.gripper(action).astype(np.float32).reshape(ACTION_DIM)
