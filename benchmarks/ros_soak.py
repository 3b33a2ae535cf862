"""Soak: sim_node (real time) + policy_node + recorder_node (following the sim's episodes) at 30 Hz for
minutes: memory growth of each process and episodes lost by the recorder.

    python benchmarks/ros_soak.py                          # 10 minutes, the shipped checkpoint on CPU
    python benchmarks/ros_soak.py --minutes 1 --policy random

Each node runs as its own process (the console scripts) over Fast DDS on loopback in a domain of its
own; this process samples their resident memory (VmRSS) every few seconds and listens to the sim's
episode announcements. Growth is the last sample less the first after the warm-up (model loaded,
queues and caches filled). An episode is lost when the sim announced its end while the recorder was up
and the dataset does not list it. Targets: growth <= 20 MB per process, 0 episodes lost.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "ros2_ws" / "src" / "vla_ros" / "config"
BIN = Path(sys.executable).parent
NODES = ("sim_node", "policy_node", "recorder_node")
SAMPLE_S = 5.0


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="duration measured (after the warm-up)")
    parser.add_argument("--warmup", type=float, default=60.0, help="seconds before the first memory sample counts")
    parser.add_argument("--policy", default="default", help="'random', a checkpoint directory or a shipped one's name")
    parser.add_argument("--rate", type=int, default=30, help="control rate of the sim and the policy [Hz]")
    parser.add_argument("--task", default="reach")
    return parser.parse_args(argv)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def start_nodes(args, dataset: Path, logs: Path) -> dict[str, subprocess.Popen]:
    params = {
        "sim_node": [CONFIG / "sim.yaml", f"task:={args.task}", "step_on_command:=false", f"control_hz:={args.rate}",
                     "start_delay:=15.0"],
        "policy_node": [CONFIG / "policy_sim.yaml", f"policy:={args.policy}", "trigger:=timer", "max_input_age:=0.2",
                        f"control_rate_hz:={float(args.rate)}", f"action_rate_hz:={float(args.rate)}"],
        "recorder_node": [CONFIG / "recorder.yaml", "follow_episodes:=true", f"output_dir:={dataset}"],
    }
    processes = {}
    for name in NODES:
        params_file, *overrides = params[name]
        command = [str(BIN / name), "--ros-args", "--params-file", str(params_file)]
        for override in overrides:
            command += ["-p", override]
        log = open(logs / f"{name}.log", "w")
        processes[name] = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    return processes


def soak(args) -> dict:
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from std_msgs.msg import String

    from vla.contracts.topics import TOPICS
    from vla.data.dataset import load_manifest
    from vla_ros import qos

    work = Path(tempfile.mkdtemp(prefix="ros_soak_"))
    dataset = work / "dataset"
    node = rclpy.create_node(f"ros_soak_{os.getpid()}")
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    infos = []
    node.create_subscription(String, TOPICS["episode_info"], lambda m: infos.append(json.loads(m.data)), qos.EPISODES)
    processes = start_nodes(args, dataset, work)
    samples = {name: [] for name in NODES}
    try:
        start = time.monotonic()
        end = start + args.warmup + 60 * args.minutes
        next_sample = start + args.warmup
        while time.monotonic() < end:
            executor.spin_once(timeout_sec=0.1)
            dead = [name for name, p in processes.items() if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{dead} exited; logs in {work}")
            if time.monotonic() >= next_sample:
                for name, process in processes.items():
                    samples[name].append(rss_mb(process.pid))
                next_sample += SAMPLE_S
        ended = {i["seed"] for i in infos if i["done"]}
    finally:
        for process in processes.values():
            process.send_signal(signal.SIGINT)
        codes = {name: process.wait(timeout=30) for name, process in processes.items()}
        executor.shutdown()
        node.destroy_node()
    recorded = {e["seed"] for e in load_manifest(dataset)}
    return {"samples": samples, "ended": ended, "recorded": recorded, "codes": codes, "work": work}


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ["ROS_DOMAIN_ID"] = str(51 + os.getpid() % 50)  # a domain of its own, on loopback only
    os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    os.environ.setdefault("FASTDDS_DEFAULT_PROFILES_FILE", str(CONFIG / "fastdds.xml"))
    import rclpy

    rclpy.init()
    try:
        result = soak(args)
    finally:
        rclpy.shutdown()
    lost = sorted(result["ended"] - result["recorded"])
    print(f"\nsoak: sim (real time) + policy_node ({args.policy}) + recorder_node at {args.rate} Hz, task {args.task}, "
          f"{args.minutes:g} min after {args.warmup:g} s of warm-up; logs and dataset in {result['work']}")
    print(f"{'process':15}{'RSS first MB':>14}{'RSS last MB':>13}{'RSS max MB':>12}{'growth MB':>11}{'exit':>6}")
    for name, values in result["samples"].items():
        print(f"{name:15}{values[0]:14.1f}{values[-1]:13.1f}{max(values):12.1f}{values[-1] - values[0]:11.1f}"
              f"{result['codes'][name]:6d}")
    print(f"episodes ended: {len(result['ended'])}, recorded: {len(result['recorded'] & result['ended'])}, "
          f"lost: {len(lost)} {lost[:10]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
