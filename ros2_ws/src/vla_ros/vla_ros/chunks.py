"""Asynchronous inference for the policy node: the model runs on a thread of its own, and the control
loop plays the action chunks it returns, so that control never waits for the model.

Each chunk answers one observation and is aligned with it by its stamp: action i of a chunk predicted
from the observation stamped s covers [s + i / rate, s + (i + 1) / rate), rate being the rate the
policy was trained at. The action for time t is the temporal ensemble (ACT; as VLAPolicy executes
chunks in-process: policies.ensemble) of every chunk covering t: their actions for t, weighted
exp(-decay * i), the newest chunk weighted most, the gripper the newest chunk's. A new chunk is
thus blended in as it arrives, without a jump, and the robot keeps moving on the previous chunk
while the next is computed; when no chunk covers t any more (the model took longer than a chunk
lasts), there is no action and the node holds.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass

import numpy as np

from policies.ensemble import temporal_ensemble


class ActionChunks:
    def __init__(self, rate_hz: float, decay: float):
        self.step_ns = 1e9 / rate_hz
        self.decay = decay
        self.chunks: list[tuple[int, np.ndarray]] = []  # (stamp of the observation answered, actions [k, 7])

    def add(self, stamp: int, actions: np.ndarray) -> None:
        self.chunks.append((stamp, np.asarray(actions, dtype=np.float64)))

    def clear(self) -> None:
        self.chunks = []

    def action(self, now_ns: int) -> tuple[np.ndarray, int] | None:
        """The blended action for `now_ns` and the stamp of the newest observation it answers, or None."""
        self.chunks = [(stamp, actions) for stamp, actions in self.chunks if self.index(stamp, now_ns) < len(actions)]
        covering = [(stamp, actions, self.index(stamp, now_ns)) for stamp, actions in self.chunks]
        covering = [(stamp, actions, i) for stamp, actions, i in covering if i >= 0]
        if not covering:
            return None
        predictions = np.stack([actions[i] for _, actions, i in covering])
        action = temporal_ensemble(predictions, np.array([i for _, _, i in covering]), self.decay)
        return action, max(stamp for stamp, _, _ in covering)

    def index(self, stamp: int, now_ns: int) -> int:
        return int((now_ns - stamp) // self.step_ns)


@dataclass
class Job:
    episode: int  # the instruction's: results for an older one are dropped
    stamp: int  # of the observation
    observation: dict


class InferenceThread:
    """`predict(observation)` on a thread of its own, one observation at a time; `finished()` hands
    the results (Job, chunk or exception, seconds) to the control loop."""

    def __init__(self, predict, delay_s: float = 0.0):
        self.predict, self.delay_s = predict, delay_s
        self.jobs: queue.Queue = queue.Queue()
        self.results: queue.Queue = queue.Queue()
        self.idle = threading.Event()
        self.idle.set()
        threading.Thread(target=self.run, name="inference", daemon=True).start()

    def submit(self, job: Job) -> bool:
        """Start on `job` unless busy with another."""
        if not self.idle.is_set():
            return False
        self.idle.clear()
        self.jobs.put(job)
        return True

    def finished(self) -> list[tuple[Job, np.ndarray | Exception, float]]:
        done = []
        while not self.results.empty():
            done.append(self.results.get())
        return done

    def stop(self) -> None:
        """Ends the thread after its current job (the process may exit before: it is a daemon)."""
        self.jobs.put(None)

    def run(self) -> None:
        while (job := self.jobs.get()) is not None:
            start = time.perf_counter()
            try:
                if self.delay_s:
                    time.sleep(self.delay_s)  # a slower model, for benchmarks
                result = self.predict(job.observation)
            except Exception as exc:  # handed to the control loop, which holds and says why
                result = exc
            self.results.put((job, result, time.perf_counter() - start))
            self.idle.set()
