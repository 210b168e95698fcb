"""The one helper that makes a workflow's ``<workflow>/<kind>`` assets, and the Dagster form of its config.

Every asset of every workflow goes through ``workflow_asset`` (or ``asset_spec`` for multi-asset outputs):
key prefix and group = the workflow's name, inputs named by kind within the workflow, the section of the
flat run config the op reads (``<workflow>__<kind>``), telemetry instrumentation. A workflow's own assets
module writes only the body.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any, TypeVar

import dagster as dg
from pydantic import BaseModel

from kitchen.workflows import Workflow
from kitchen_assets.telemetry import instrumented

F = TypeVar("F", bound=Callable[..., Any])


@cache
def dagster_config(section: type[BaseModel]) -> type[dg.Config]:
    """``section`` as a ``dg.Config`` (same fields, defaults, ranges and validators), for an op's config.

    The library's sections are plain pydantic so the library and the CLI need no Dagster; the mixin keeps
    one definition of every setting.
    """
    if issubclass(section, dg.Config):
        return section
    return type(
        section.__name__, (section, dg.Config), {"__module__": section.__module__, "__doc__": section.__doc__}
    )


def asset_key(workflow: Workflow | str, kind: str) -> dg.AssetKey:
    name = workflow if isinstance(workflow, str) else workflow.name
    return dg.AssetKey([name, kind])


def op_name(workflow: Workflow, kind: str) -> str:
    """The op that materialises ``kind`` (the training multi-asset's kind is ``train``)."""
    return f"{workflow.name}__{kind}"


@dataclass(frozen=True)
class Placement:
    """Where a factory puts the assets it makes, and where their ops' settings come from.

    The default (``WORKFLOW``): ``<workflow>/<kind>`` in the workflow's group, unpartitioned, each op
    configured by its section of the run config. A sweep (``kitchen_assets.sweep``): the kinds in ``made``
    as ``<prefix>/<kind>`` in group ``prefix``, partitioned, each op's section read from the partition key
    by ``settings(workflow, kind, context)``; an input of any other kind is the workflow's own unpartitioned
    asset, shared by every partition.
    """

    prefix: str | None = None
    made: frozenset[str] = frozenset()
    partitions: dg.PartitionsDefinition | None = None
    settings: Callable[[Workflow, str, dg.AssetExecutionContext], Any] | None = None

    def owns(self, kind: str) -> bool:
        return self.prefix is not None and kind in self.made

    def key(self, workflow: Workflow, kind: str) -> dg.AssetKey:
        return (
            asset_key(self.prefix, kind)
            if self.prefix is not None and self.owns(kind)
            else asset_key(workflow, kind)
        )

    def group(self, workflow: Workflow) -> str:
        return self.prefix or workflow.name

    def op(self, workflow: Workflow, kind: str) -> str:
        return f"{self.prefix}__{kind}" if self.prefix is not None else op_name(workflow, kind)


WORKFLOW = Placement()


def asset_ins(
    workflow: Workflow, kinds: Iterable[str] | Mapping[str, str], placement: Placement = WORKFLOW
) -> dict[str, dg.AssetIn]:
    """Inputs by kind (the parameter is named after the kind), or ``{parameter: kind}``."""
    named = kinds if isinstance(kinds, Mapping) else {kind: kind for kind in kinds}
    return {param: dg.AssetIn(key=placement.key(workflow, kind)) for param, kind in named.items()}


def with_config(fn: F, workflow: Workflow, kind: str, placement: Placement | None = None) -> F:
    """Give ``fn`` its op's config type (Dagster reads it from the ``config`` annotation); under a
    placement with ``settings``, the section comes from the partition key instead (the op takes no
    config, so a backfill launched from the UI needs none)."""
    section = workflow.sections.get(kind)
    if section is None:
        return fn
    if placement is None or placement.settings is None:
        fn.__annotations__["config"] = dagster_config(section)
        return fn
    settings = placement.settings
    signature = inspect.signature(fn, eval_str=True)
    without = signature.replace(parameters=[p for p in signature.parameters.values() if p.name != "config"])

    def section_for(context: dg.AssetExecutionContext) -> Any:
        return settings(workflow, kind, context)

    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def generator(context: dg.AssetExecutionContext, **kwargs: Any) -> Any:
            yield from fn(context, config=section_for(context), **kwargs)

        wrapped: Any = generator
    else:

        @functools.wraps(fn)
        def function(context: dg.AssetExecutionContext, **kwargs: Any) -> Any:
            return fn(context, config=section_for(context), **kwargs)

        wrapped = function
    wrapped.__signature__ = without
    return wrapped


def workflow_asset(
    workflow: Workflow,
    kind: str,
    *,
    ins: Iterable[str] | Mapping[str, str] = (),
    kinds: set[str],
    description: str,
    placement: Placement = WORKFLOW,
    **asset_kwargs: Any,
) -> Callable[[Callable[..., Any]], dg.AssetsDefinition]:
    """Decorate a compute function as ``<workflow>/<kind>`` (or where ``placement`` puts it); its
    ``config`` is the ``kind`` section."""

    def decorate(fn: Callable[..., Any]) -> dg.AssetsDefinition:
        return dg.asset(
            key=placement.key(workflow, kind),
            group_name=placement.group(workflow),
            partitions_def=placement.partitions,
            kinds=kinds,
            ins=asset_ins(workflow, ins, placement),
            description=description,
            **asset_kwargs,
        )(instrumented(with_config(fn, workflow, kind, placement)))

    return decorate


def op_configs(workflow: Workflow) -> dict[str, type[BaseModel]]:
    """Op name -> the section its config is: how the job splits the flat run config."""
    return {op_name(workflow, kind): section for kind, section in workflow.sections.items()}
