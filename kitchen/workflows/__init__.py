"""Kitchen's workflows, one folder each, and the registry the Dagster layer and the CLI iterate."""

from kitchen.workflows.config import RunConfig, split_run_config
from kitchen.workflows.context import EvalContext, Evaluation, PlanContext
from kitchen.workflows.registry import Workflow, get_workflow, register_workflow, workflows

__all__ = [
    "EvalContext",
    "Evaluation",
    "PlanContext",
    "RunConfig",
    "Workflow",
    "get_workflow",
    "register_workflow",
    "split_run_config",
    "workflows",
]
