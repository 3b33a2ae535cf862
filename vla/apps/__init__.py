"""The jobs people run (each a `vla` subcommand): simulate and evaluate policies (rollout, evaluate,
demo), record and inspect data (collect, dataset, replay), train, export. Each module holds its
job's library functions and a thin `add_arguments(parser)` / `run(args)` for the command line."""


class JobError(Exception):
    """A job cannot go on for a reason the user can act on; `vla` prints it without a traceback."""
