"""The one helper that makes a workflow's ``<workflow>/<kind>`` assets, and the Dagster form of its config.

Every asset of every workflow goes through ``workflow_asset`` (or ``asset_spec`` for multi-asset outputs):
key prefix and group = the workflow's name, inputs named by kind within the workflow, the section of the
flat run config the op reads (``<workflow>__<kind>``), telemetry instrumentation. A workflow's own assets
module writes only the body.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
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


def asset_ins(workflow: Workflow, kinds: Iterable[str] | Mapping[str, str]) -> dict[str, dg.AssetIn]:
    """Inputs by kind (the parameter is named after the kind), or ``{parameter: kind}``."""
    named = kinds if isinstance(kinds, Mapping) else {kind: kind for kind in kinds}
    return {param: dg.AssetIn(key=asset_key(workflow, kind)) for param, kind in named.items()}


def with_config(fn: F, workflow: Workflow, kind: str) -> F:
    """Give ``fn`` its op's config type (Dagster reads it from the ``config`` annotation)."""
    section = workflow.sections.get(kind)
    if section is not None:
        fn.__annotations__["config"] = dagster_config(section)
    return fn


def workflow_asset(
    workflow: Workflow,
    kind: str,
    *,
    ins: Iterable[str] | Mapping[str, str] = (),
    kinds: set[str],
    description: str,
    **asset_kwargs: Any,
) -> Callable[[Callable[..., Any]], dg.AssetsDefinition]:
    """Decorate a compute function as ``<workflow>/<kind>``; its ``config`` is the ``kind`` section."""

    def decorate(fn: Callable[..., Any]) -> dg.AssetsDefinition:
        return dg.asset(
            name=kind,
            key_prefix=[workflow.name],
            group_name=workflow.name,
            kinds=kinds,
            ins=asset_ins(workflow, ins),
            description=description,
            **asset_kwargs,
        )(instrumented(with_config(fn, workflow, kind)))

    return decorate


def op_configs(workflow: Workflow) -> dict[str, type[BaseModel]]:
    """Op name -> the section its config is: how the job splits the flat run config."""
    return {op_name(workflow, kind): section for kind, section in workflow.sections.items()}
