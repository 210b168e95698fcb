"""``kitchen``: run post-training workflows as real Dagster runs from the command line.

    kitchen run supervised --model M --dataset D --epochs 1
    kitchen run --help                      # the workflows
    kitchen run dpo --help                  # one workflow's flags (generated from its run config)
    kitchen sweep supervised --learning-rate 3e-4,1.3e-3 --lora-rank 8,32   # one partition a configuration
    kitchen models list
    kitchen serve models:/NAME@champion      # an OpenAI-compatible endpoint on 127.0.0.1:8000

Runs are recorded in the persistent Dagster instance at ``$DAGSTER_HOME`` (default
``$KITCHEN_HOME/dagster``), so ``dagster dev -w workspace.yaml`` with the same ``DAGSTER_HOME`` shows them.
"""

from __future__ import annotations

import argparse
import gc
import sys
from collections.abc import Sequence

from kitchen.cli.flags import add_workflow_flags
from kitchen.workflows import workflows

BACKENDS = ("local", "tinker")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kitchen",
        description="Kitchen: LLM post-training as a Dagster asset graph (local engine or Tinker).",
        epilog="Example: kitchen run supervised --epochs 1   (the packaged SmolLM2 on the built-in "
        "arithmetic dataset). Runs land in $DAGSTER_HOME; open them with `make ui`.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    registered = workflows()
    run = sub.add_parser(
        "run",
        help="run a workflow end to end as a Dagster job",
        description="Run a workflow end to end as a Dagster job: "
        + "; ".join(f"{w.name}: {w.summary}" for w in registered),
    )
    sweep = sub.add_parser(
        "sweep",
        help="run several configurations of a workflow as partitions, compare them, promote the best",
        description="One Dagster partition per configuration (every combination of the values given as "
        "A,B,...) over the workflow's training, evaluation and registration; the assets before training "
        "are shared. Partitions already materialised are skipped, a failed one does not stop the others, "
        "and the sweep report promotes only the best configuration.",
    )
    for command, sweeping in ((run, False), (sweep, True)):
        which = command.add_subparsers(dest="workflow", required=True, metavar="WORKFLOW")
        for workflow in registered:
            one = which.add_parser(
                workflow.name,
                aliases=list(workflow.aliases),
                help=workflow.summary,
                description=workflow.summary,
            )
            one.set_defaults(workflow=workflow.name)
            add_workflow_flags(one, workflow.config, workflow.sections, sweep=sweeping)
            one.add_argument(
                "--backend",
                choices=BACKENDS,
                default=None,
                help="training backend (default $KITCHEN_BACKEND or local)",
            )
            one.add_argument(
                "--verbose",
                action="store_true",
                help="show the Dagster event log and library output as it happens",
            )
            if sweeping:
                one.add_argument(
                    "--backfill",
                    action="store_true",
                    help="submit the configurations not yet done as a Dagster backfill for the daemon "
                    "(`make ui`) to run through its run queue, and return at once",
                )
    from kitchen.cli.models import add_models_parser

    add_models_parser(sub)
    from kitchen.cli.serve import add_serve_parser

    add_serve_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "run":
        from kitchen.cli.run import run_workflow

        return run_workflow(args)
    if args.command == "sweep":
        from kitchen.cli.sweep import sweep_workflow

        return sweep_workflow(args)
    if args.command == "models":
        from kitchen.cli.models import models_command

        return models_command(args)
    if args.command == "serve":
        from kitchen.cli.serve import serve_command

        return serve_command(args)
    return 2


def entry() -> int:
    """The ``kitchen`` command: ``main``, in a process that ends as soon as it returns.

    Everything still alive is then frozen out of the cyclic garbage collector (``gc.freeze``), so the
    interpreter's shutdown does not walk the whole heap a run leaves (Dagster, MLflow, pydantic models,
    the model's modules: seconds on a small machine) only to free memory the OS reclaims at exit. Only
    here, never in ``main``: a caller that goes on running (a test) keeps normal collection.
    """
    code = main()
    gc.freeze()
    return code


if __name__ == "__main__":
    sys.exit(entry())
