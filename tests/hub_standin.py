"""A local stand-in for the Hugging Face Hub's upload endpoints, for ``HF_ENDPOINT`` in tests.

It answers the HTTP calls ``huggingface_hub`` 2.4 makes for ``whoami``, ``create_repo`` and
``create_commit`` on the legacy LFS path (Xet storage off: ``HF_HUB_DISABLE_XET``), as the Hub does:

- ``GET /api/whoami-v2``: the token's user and orgs; 401 for any other token;
- ``POST /api/repos/create``: 403 outside the user's namespaces, 409 when the repo exists;
- ``POST /api/validate-yaml``: the card's metadata must parse as YAML and its ``model-index`` must be
  what ``huggingface_hub`` reads back (400 with the error otherwise);
- ``POST /api/models/{repo}/preupload/{rev}``: ``lfs`` for weights and files over 10 MB, else ``regular``;
- ``POST /{repo}.git/info/lfs/objects/batch``, ``PUT /lfs/{oid}``, ``POST /lfs/verify``: the basic LFS
  transfer, the uploaded bytes checked against their sha256;
- ``POST /api/models/{repo}/commit/{rev}``: the ndjson commit (inline base64 files and LFS pointers).

Every request is recorded with whether it carried the right token; repos keep their files by commit.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_LFS_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")
_LFS_THRESHOLD = 10 * 1024 * 1024


@dataclass
class Repo:
    private: bool
    files: dict[str, bytes] = field(default_factory=dict)
    commits: list[str] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)


@dataclass
class HubState:
    token: str
    user: str = "kitchen-user"
    orgs: tuple[str, ...] = ("kitchen-org",)
    repos: dict[str, Repo] = field(default_factory=dict)
    lfs: dict[str, bytes] = field(default_factory=dict)
    requests: list[tuple[str, str, bool]] = field(default_factory=list)  # method, path, authorised
    headers: list[dict[str, str]] = field(default_factory=list)


class StandInHub:
    """Start with ``with StandInHub(token) as hub:``; ``hub.url`` goes in ``HF_ENDPOINT``."""

    def __init__(self, token: str) -> None:
        self.state = HubState(token=token)
        state = self.state

        class Handler(_Handler):
            hub = state

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        Handler.endpoint = self.url
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> StandInHub:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


class _Handler(BaseHTTPRequestHandler):
    hub: HubState
    endpoint: str

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    # -- plumbing ----------------------------------------------------------------------------------

    def _body(self) -> bytes:
        length = int(self.headers.get("content-length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, payload: Any = None, *, error: str | None = None) -> None:
        data = json.dumps(payload if payload is not None else {}).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        if error:
            self.send_header("X-Error-Message", error)
        self.end_headers()
        self.wfile.write(data)

    def _authorised(self) -> bool:
        ok = self.headers.get("authorization") == f"Bearer {self.hub.token}"
        self.hub.requests.append((self.command, self.path, ok))
        self.hub.headers.append(dict(self.headers.items()))
        return ok

    def _writable(self, repo_id: str) -> bool:
        return repo_id.split("/", 1)[0] in (self.hub.user, *self.hub.orgs)

    # -- routes ------------------------------------------------------------------------------------

    def do_GET(self) -> None:
        if not self._authorised():
            return self._send(
                401, {"error": "Invalid credentials"}, error="Invalid credentials in Authorization header"
            )
        if self.path == "/api/whoami-v2":
            orgs = [{"name": org, "roleInOrg": "write"} for org in self.hub.orgs]
            return self._send(200, {"type": "user", "name": self.hub.user, "orgs": orgs})
        self._send(404, {"error": "not found"}, error="Not Found")

    def do_PUT(self) -> None:
        self.hub.requests.append((self.command, self.path, True))  # presigned: no token, like S3
        match = re.fullmatch(r"/lfs/([0-9a-f]{64})", self.path)
        body = self._body()
        if match is None:
            return self._send(404)
        if hashlib.sha256(body).hexdigest() != match.group(1):
            return self._send(400, {"error": "sha256 mismatch"}, error="sha256 mismatch")
        self.hub.lfs[match.group(1)] = body
        self._send(200)

    def do_POST(self) -> None:
        body = self._body()
        if not self._authorised():
            return self._send(
                401, {"error": "Invalid credentials"}, error="Invalid credentials in Authorization header"
            )
        path = self.path.split("?", 1)[0]
        if path == "/api/repos/create":
            return self._create(json.loads(body))
        if path == "/api/validate-yaml":
            return self._validate_yaml(json.loads(body))
        if path == "/lfs/verify":
            info = json.loads(body)
            ok = len(self.hub.lfs.get(info["oid"], b"")) == info["size"]
            return self._send(200 if ok else 404)
        if match := re.fullmatch(r"/api/models/(.+)/preupload/([^/]+)", path):
            return self._preupload(match.group(1), json.loads(body))
        if match := re.fullmatch(r"/(.+)\.git/info/lfs/objects/batch", path):
            return self._batch(match.group(1), json.loads(body))
        if match := re.fullmatch(r"/api/models/(.+)/commit/([^/]+)", path):
            return self._commit(match.group(1), body)
        self._send(404, {"error": "not found"}, error="Not Found")

    def _create(self, payload: dict[str, Any]) -> None:
        repo_id = f"{payload.get('organization') or self.hub.user}/{payload['name']}"
        if not self._writable(repo_id):
            return self._send(
                403, {"error": "forbidden"}, error=f"You don't have the rights to create {repo_id}"
            )
        if repo_id in self.hub.repos:
            return self._send(
                409, {"error": "exists", "url": f"{self.endpoint}/{repo_id}"}, error="Repo exists"
            )
        self.hub.repos[repo_id] = Repo(private=payload.get("visibility") == "private")
        self._send(200, {"url": f"{self.endpoint}/{repo_id}", "name": repo_id})

    def _validate_yaml(self, payload: dict[str, Any]) -> None:
        import yaml
        from huggingface_hub.repocard_data import model_index_to_eval_results

        content = payload["content"]
        errors: list[dict[str, str]] = []
        match = re.match(r"^---\n(.*?)\n---\n", content, re.DOTALL)
        try:
            metadata = yaml.safe_load(match.group(1)) if match else None
            if not isinstance(metadata, dict):
                errors.append({"message": "no YAML metadata block"})
            elif "model-index" in metadata:
                model_index_to_eval_results(metadata["model-index"])
        except Exception as err:
            errors.append({"message": f"{type(err).__name__}: {err}"})
        self._send(400 if errors else 200, {"errors": errors, "warnings": []})

    def _preupload(self, repo_id: str, payload: dict[str, Any]) -> None:
        if repo_id not in self.hub.repos:
            return self._send(404, {"error": "Repository not found"}, error="Repository not found")
        files = [
            {
                "path": f["path"],
                "uploadMode": "lfs"
                if f["path"].endswith(_LFS_SUFFIXES) or f["size"] > _LFS_THRESHOLD
                else "regular",
                "shouldIgnore": False,
                "oid": None,
            }
            for f in payload["files"]
        ]
        self._send(200, {"files": files, "commitOid": self._head(repo_id)})

    def _batch(self, repo_id: str, payload: dict[str, Any]) -> None:
        if repo_id not in self.hub.repos:
            return self._send(404, {"error": "Repository not found"}, error="Repository not found")
        objects = []
        for obj in payload["objects"]:
            entry: dict[str, Any] = {"oid": obj["oid"], "size": obj["size"]}
            if obj["oid"] not in self.hub.lfs:
                entry["actions"] = {
                    "upload": {"href": f"{self.endpoint}/lfs/{obj['oid']}"},
                    "verify": {"href": f"{self.endpoint}/lfs/verify"},
                }
            objects.append(entry)
        self._send(200, {"transfer": "basic", "objects": objects})

    def _commit(self, repo_id: str, body: bytes) -> None:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            return self._send(404, {"error": "Repository not found"}, error="Repository not found")
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        files = dict(repo.files)
        for line in lines:
            key, value = line["key"], line["value"]
            if key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "lfsFile":
                if value["oid"] not in self.hub.lfs:
                    return self._send(
                        400, {"error": f"LFS object {value['oid']} missing"}, error="LFS missing"
                    )
                files[value["path"]] = self.hub.lfs[value["oid"]]
            elif key != "header":
                return self._send(400, {"error": f"unsupported {key}"}, error=f"unsupported {key}")
        oid = hashlib.sha1(
            json.dumps(lines, sort_keys=True).encode() + str(len(repo.commits)).encode()
        ).hexdigest()
        repo.files, repo.commits = files, [*repo.commits, oid]
        repo.messages.append(lines[0]["value"]["summary"])
        self._send(
            200,
            {
                "commitUrl": f"{self.endpoint}/{repo_id}/commit/{oid}",
                "commitOid": oid,
                "pullRequestUrl": None,
            },
        )

    def _head(self, repo_id: str) -> str:
        commits = self.hub.repos[repo_id].commits
        return commits[-1] if commits else "0" * 40
