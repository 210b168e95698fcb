"""Publishing a registered model: a Hugging Face model folder (``export``) and the Hub (``hub``).

``kitchen models export`` and ``kitchen models push`` (``kitchen/cli/publish.py``) and the optional
``<workflow>/hub_release`` asset (``kitchen_assets/hub_release.py``) are thin shells over this package:
``plan_export`` checks everything (version, files, base model) before ``write_export`` writes anything;
``connect`` checks the repo id, token and endpoint before ``push`` exports and uploads.
"""

from kitchen.publish.base import PublishError
from kitchen.publish.export import ExportPlan, check_target, plan_export, write_export
from kitchen.publish.hub import HubPush, HubTarget, check_repo_id, connect, hub_endpoint, hub_token, push

__all__ = [
    "ExportPlan",
    "HubPush",
    "HubTarget",
    "PublishError",
    "check_repo_id",
    "check_target",
    "connect",
    "hub_endpoint",
    "hub_token",
    "plan_export",
    "push",
    "write_export",
]
