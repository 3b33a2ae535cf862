"""`python -m vla.apps.train ...` (what torchrun starts): the same as `vla train ...`."""
import argparse
import sys

from vla.apps.train import add_arguments, run

parser = argparse.ArgumentParser(prog="python -m vla.apps.train")
add_arguments(parser)
sys.exit(run(parser.parse_args()))
