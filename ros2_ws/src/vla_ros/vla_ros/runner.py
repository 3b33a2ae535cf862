"""The `main` of every node: spin on one thread until SIGINT or SIGTERM, then let the node finish
its work (a last zero twist, a bag closed properly) while ROS is still up."""
from __future__ import annotations

import signal

import rclpy
from rclpy.executors import SingleThreadedExecutor
from rclpy.signals import SignalHandlerOptions


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def run(name: str, make_node, make_executor=SingleThreadedExecutor) -> int:
    """`make_node()` builds the node (ValueError or OSError: bad parameters, exit code 2); the
    node's `close()` runs before shutdown."""
    # rclpy's own handlers would shut the context down under a running callback; a
    # KeyboardInterrupt instead unwinds out of spin() with the context still valid.
    rclpy.init(signal_handler_options=SignalHandlerOptions.NO)
    for signum in (signal.SIGINT, signal.SIGTERM):  # SIGINT too: ignored by default in background jobs
        signal.signal(signum, _interrupt)
    node = None
    try:
        node = make_node()
        executor = make_executor()
        executor.add_node(node)
        while True:  # a bounded wait, so that the signal handler gets to run in an idle node
            executor.spin_once(timeout_sec=0.1)
    except KeyboardInterrupt:
        pass
    except (ValueError, OSError) as exc:
        if node is not None:  # raised by a callback: a bug, not a parameter
            raise
        rclpy.logging.get_logger(name).fatal(str(exc))
        return 2
    finally:
        if node is not None:
            node.close()
            node.destroy_node()
        rclpy.try_shutdown()
    return 0

