"""Push an exported model to the Hugging Face Hub, and record where it went on the registry version.

Everything that can be refused is checked before any file is written or uploaded: the repo id (the
Hub's own rules), the token (``HF_TOKEN``, else the one ``hf auth login`` saved), the version and its
base model (``plan_export``), and the endpoint (``HF_ENDPOINT``, else huggingface.co), which must answer
``whoami`` with this token within a timeout (``huggingface_hub`` itself waits forever). Then the folder is
exported to a temporary directory, the repo created if missing, and the files uploaded in one commit with
``huggingface_hub``'s ``create_commit``. The version gets ``kitchen.hub.*`` tags: the repo, its URL, the
commit and what was pushed.

The token is passed to ``huggingface_hub`` only; it is never printed, logged or recorded, and error text
is scrubbed of it before it is shown.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kitchen.publish.base import PublishError
from kitchen.publish.export import ExportPlan, write_export
from kitchen.registry.store import ModelRegistry
from kitchen.secrets import redact_text, redact_uri, secret_values

HUB_REPO_TAG = "kitchen.hub.repo"
HUB_URL_TAG = "kitchen.hub.url"
HUB_COMMIT_TAG = "kitchen.hub.commit"
HUB_COMMIT_URL_TAG = "kitchen.hub.commit_url"
HUB_KIND_TAG = "kitchen.hub.kind"
DEFAULT_TIMEOUT_S = 15.0

Log = Callable[[str], None]


@dataclass(frozen=True)
class HubTarget:
    """Where a push goes, checked: endpoint, full repo id, the token's user. Holds the token; its repr
    does not show it."""

    endpoint: str
    repo_id: str
    user: str
    token: str

    def __repr__(self) -> str:
        return f"HubTarget(endpoint={self.endpoint!r}, repo_id={self.repo_id!r}, user={self.user!r})"

    @property
    def url(self) -> str:
        return f"{self.endpoint}/{self.repo_id}"


@dataclass(frozen=True)
class HubPush:
    repo_id: str
    url: str
    commit: str
    commit_url: str
    kind: str
    private: bool | None


def hub_endpoint() -> str:
    """``HF_ENDPOINT`` read now (``huggingface_hub`` reads it once, at import), else huggingface.co."""
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def hub_token() -> str:
    """``HF_TOKEN``, else the token ``hf auth login`` saved; an error saying how to set one."""
    from huggingface_hub import get_token

    token = (os.environ.get("HF_TOKEN") or "").strip() or get_token()
    if not token:
        raise PublishError(
            "no Hugging Face token: set HF_TOKEN to a token with write access "
            "(https://huggingface.co/settings/tokens), or run `hf auth login`"
        )
    return token


def check_repo_id(repo_id: str) -> str:
    """``ORG/NAME`` or ``NAME`` as the Hub accepts it (letters, digits, ``-``, ``_``, ``.``; at most 96
    characters; no ``--`` or ``..``; not ending in ``.git``)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    text = repo_id.strip()
    if text.count("/") > 1 or text.startswith("/") or text.endswith("/"):
        raise PublishError(f"--repo {repo_id!r}: a Hub repo id is NAME or ORG/NAME")
    try:
        validate_repo_id(text)
    except HFValidationError as err:
        raise PublishError(f"--repo {repo_id!r} is not a repo id the Hub accepts: {err}") from None
    return text


def _scrub(text: str, token: str) -> str:
    return redact_text(" ".join(str(text).split()), [token, *secret_values()])[:400]


def connect(repo_id: str, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> HubTarget:
    """Check the token against the endpoint (reachable, accepted) and complete a bare repo name with the
    token's user; one clear error otherwise."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    from kitchen.hub import HUB_UNREACHABLE_ERRORS

    repo_id = check_repo_id(repo_id)
    token = hub_token()
    endpoint = hub_endpoint()
    shown = redact_uri(endpoint)
    if constants.is_offline_mode():
        raise PublishError(f"cannot push to {shown}: HF_HUB_OFFLINE is set; unset it to reach the Hub")
    try:
        response = get_session().get(
            f"{endpoint}/api/whoami-v2", headers={"authorization": f"Bearer {token}"}, timeout=timeout_s
        )
    except HUB_UNREACHABLE_ERRORS as err:
        reason = f"{type(err).__name__}: {_scrub(str(err), token)}"
        raise PublishError(
            f"the Hugging Face Hub at {shown} is unreachable ({reason}); check the network or HF_ENDPOINT"
        ) from None
    if response.status_code in (401, 403):
        raise PublishError(
            f"the Hub at {shown} refused the token (HTTP {response.status_code}): check HF_TOKEN "
            "(it must be valid and have write access)"
        )
    if response.status_code != 200:
        raise PublishError(
            f"the Hub at {shown} answered HTTP {response.status_code} to whoami "
            f"({_scrub(response.text[:200], token)!r}); is HF_ENDPOINT a Hugging Face Hub?"
        )
    try:
        user = str(response.json()["name"])
    except (ValueError, KeyError, TypeError):
        raise PublishError(
            f"the Hub at {shown} sent an unexpected whoami answer; is HF_ENDPOINT a Hub?"
        ) from None
    full = repo_id if "/" in repo_id else f"{user}/{repo_id}"
    return HubTarget(endpoint=endpoint, repo_id=full, user=user, token=token)


def push(
    registry: ModelRegistry,
    plan: ExportPlan,
    target: HubTarget,
    *,
    private: bool | None = None,
    log: Log = lambda _: None,
) -> HubPush:
    """Export ``plan`` and upload it to ``target`` in one commit; tag the version with where it went.
    ``private=None`` leaves a new repo's visibility to the Hub (public unless the org says otherwise);
    an existing repo keeps its own."""
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(endpoint=target.endpoint, token=target.token)
    with tempfile.TemporaryDirectory(prefix="kitchen-push-") as tmp:
        folder = write_export(plan, Path(tmp) / "export", load_id=target.repo_id, log=log)
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        log(f"uploading {len(files)} files to {target.url}")
        try:
            api.create_repo(target.repo_id, private=private, exist_ok=True)
            info = api.create_commit(
                target.repo_id,
                operations=[
                    CommitOperationAdd(path_in_repo=p.relative_to(folder).as_posix(), path_or_fileobj=str(p))
                    for p in files
                ],
                commit_message=f"Kitchen: {plan.model_uri} ({plan.kind})",
                commit_description=f"Exported from the MLflow registered model {plan.model_uri} by Kitchen.",
            )
        except Exception as err:  # the Hub's HTTP errors, transport errors, a rejected card
            raise PublishError(
                f"pushing to {target.url} failed: {type(err).__name__}: {_scrub(str(err), target.token)}"
            ) from None
    commit = str(getattr(info, "oid", "") or "")
    result = HubPush(
        repo_id=target.repo_id,
        url=target.url,
        commit=commit,
        commit_url=str(getattr(info, "commit_url", "") or f"{target.url}/commit/{commit}"),
        kind=plan.kind,
        private=private,
    )
    tag_version(registry, plan, result)
    return result


def tag_version(registry: ModelRegistry, plan: ExportPlan, result: HubPush) -> None:
    values: dict[str, Any] = {
        HUB_REPO_TAG: result.repo_id,
        HUB_URL_TAG: redact_uri(result.url),
        HUB_COMMIT_TAG: result.commit,
        HUB_COMMIT_URL_TAG: redact_uri(result.commit_url),
        HUB_KIND_TAG: result.kind,
    }
    name, number = plan.view.version.name, plan.view.number
    for key, value in values.items():
        registry.client.set_model_version_tag(name, number, key, str(value))
