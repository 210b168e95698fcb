"""The supervised workflow's own asset: ``supervised/datums`` (its standard assets come from the factory)."""

from __future__ import annotations

import dagster as dg

from kitchen.workflows import Workflow
from kitchen_assets.datums import chat_datums_asset


def assets(workflow: Workflow) -> list[dg.AssetsDefinition]:
    return [chat_datums_asset(workflow)]
