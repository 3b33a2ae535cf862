"""The `vla` command: one subcommand per job. Each lives in its own module, imported on use so
that `vla sim` does not pay for importing torch."""
from __future__ import annotations

import argparse
import importlib
import sys
import warnings

from tqdm import tqdm

from vla.apps import JobError

# name -> (module with add_arguments(parser) and run(args), one-line help)
COMMANDS = {
    "demo": ("vla.apps.demo", "run the shipped checkpoint closed-loop in sim (success table + video)"),
    "sim": ("vla.apps.rollout", "run a policy (expert, random, a checkpoint) in sim for N episodes"),
    "collect": ("vla.apps.collect", "record sim episodes as rosbag2 (MCAP) directories"),
    "dataset": ("vla.apps.dataset", "info | stats | video | plot of a recorded dataset"),
    "replay": ("vla.apps.replay", "re-execute a recorded episode in sim and report divergence"),
    "train": ("vla.apps.train", "train a VLA policy from a YAML recipe"),
    "curve": ("vla.apps.curve", "redraw a training run's learning curve (success per task against the step)"),
    "eval": ("vla.apps.evaluate", "closed-loop evaluation of a checkpoint on held-out seeds"),
    "ensemble": ("vla.apps.ensemble", "bundle trained checkpoints into one whose action chunks are their mean"),
    "export": ("vla.apps.export", "export a checkpoint (each member of an ensemble) to ONNX and validate it"),
}


def build_parser(command: str) -> argparse.ArgumentParser:
    module_name, help_text = COMMANDS[command]
    parser = argparse.ArgumentParser(prog=f"vla {command}", description=help_text)
    importlib.import_module(module_name).add_arguments(parser)
    return parser


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: vla <command> [options]   (vla <command> --help for its options)", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_text}" for name, (_, help_text) in COMMANDS.items()]
    return "\n".join(lines)


def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one line each, as the jobs' own (not the source line that raised them), and
    above the progress bars, not inside them."""
    tqdm.write(f"warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"vla: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    args = build_parser(command).parse_args(rest)
    warnings.showwarning = show_warning
    try:
        result = importlib.import_module(COMMANDS[command][0]).run(args)
    except (JobError, ValueError, FileNotFoundError) as exc:  # the user's to fix: one line, no traceback
        print(f"vla {command}: error: {exc}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
