"""The `main` of every node: spin until SIGINT or SIGTERM, then let the node finish its work (a last
zero twist, a bag closed properly) within WORK_DEADLINE_S while ROS is still up, leave ROS (its
endpoints announced gone, so that peers and a respawned node do not see stale ones) within
LEAVE_DEADLINE_S more, and exit 0. Each takes well under a second; an overrun exits 1 with the stacks.

Under `ros2 launch` a terminal Ctrl-C reaches every node twice (the terminal's SIGINT to the process
group, then the one launch forwards), and launch escalates to SIGTERM. So the handler only notes a
signal (an exception raised from it could fire inside a callback or inside the cleanup itself),
the loop checks the note between callbacks, and signals during the cleanup are ignored.
"""
from __future__ import annotations

import atexit
import faulthandler
import os
import signal
import sys
import time
from typing import NoReturn

import rclpy
from rclpy.duration import Duration
from rclpy.exceptions import ParameterException
from rclpy.executors import SingleThreadedExecutor
from rclpy.signals import SignalHandlerOptions

SIGNALS = (signal.SIGINT, signal.SIGTERM)
POLL_S = 0.05  # a bounded wait, so that a signal is seen in an idle node
ACK_TIMEOUT_S = 0.5  # for the readers of the final commands to acknowledge them
# A stage that overruns its deadline is cut short: exit code 1, with the stacks where it hung. Leaving
# ROS gets more room: a loaded 2-core CI machine once took over 1.7 s to destroy one service while
# every node stopped at once, and the work is safe by then. Both within launch's 5 s before SIGTERM.
WORK_DEADLINE_S = 1.8
LEAVE_DEADLINE_S = 3.0


class StopRequest:
    """The signal handler: notes the first signal, nothing else."""

    def __init__(self):
        self.signum: int | None = None

    def __call__(self, signum, frame) -> None:
        self.signum = self.signum or signum

    def install(self) -> None:
        for signum in SIGNALS:  # SIGINT too: ignored by default in background jobs
            signal.signal(signum, self)


def run(name: str, make_node, make_executor=SingleThreadedExecutor) -> NoReturn:
    """`make_node()` builds the node (ValueError, OSError or a parameter of the wrong type: exit code 2); the
    node's `close()` runs at a signal, before its reliable publishers are flushed and ROS shuts down."""
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 PID` prints every thread's stack: where a node is stuck
    stop = StopRequest()
    stop.install()  # a signal while the node starts (a model loads) stops it once it is up
    # rclpy's own handlers would shut the context down under a running callback.
    rclpy.init(signal_handler_options=SignalHandlerOptions.NO)
    try:
        node = make_node()
    except (ValueError, OSError, ParameterException) as exc:  # e.g. -p control_rate_hz:=30 for a float
        rclpy.logging.get_logger(name).fatal(str(exc))
        rclpy.try_shutdown()
        exit_now(2)
    executor = make_executor()
    stop.install()  # rclpy's EventsExecutor takes SIGINT and SIGTERM for itself: take them back
    executor.add_node(node)
    while stop.signum is None:
        executor.spin_once(timeout_sec=POLL_S)  # an exception here is a bug: a traceback, exit 1
    ignore_signals()
    # The deadline runs in faulthandler's C thread: it fires even if the cleanup hangs inside C code
    # that holds the GIL (a Python timer thread would wait for it forever), and prints where it hung.
    sys.stderr.flush()  # faulthandler writes to the file descriptor, past Python's buffer
    faulthandler.dump_traceback_later(WORK_DEADLINE_S, exit=True)
    began = time.monotonic()
    node.close()
    flush(node)
    closed = time.monotonic()
    faulthandler.dump_traceback_later(LEAVE_DEADLINE_S, exit=True)  # replaces the first
    executor.shutdown(timeout_sec=0.5)
    node.destroy_node()
    del executor  # the EventsExecutor resets SIGINT and SIGTERM to their defaults when destroyed
    ignore_signals()
    rclpy.try_shutdown()
    rclpy.logging.get_logger(name).info(f"stopped by {signal.Signals(stop.signum).name}: work closed in "
                                        f"{closed - began:.2f} s, ROS left in {time.monotonic() - closed:.2f} s")
    exit_now(0)


def ignore_signals() -> None:
    for signum in SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def flush(node) -> None:
    """Wait (bounded) until the readers of every reliable publisher acknowledged what it published:
    the node's last commands must reach the robot before the process goes."""
    left = Duration(nanoseconds=round(ACK_TIMEOUT_S * 1e9))
    if not all(publisher.wait_for_all_acked(left) for publisher in node.publishers):
        node.get_logger().warning("some readers did not acknowledge the last messages")


def exit_now(code: int) -> NoReturn:
    """Exit after atexit handlers and flushing stdio, skipping the interpreter's teardown (1-2 s once
    torch is loaded, more under load); run() has closed everything the node writes."""
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
