"""``kitchen models export`` and ``kitchen models push`` on a version the tiny supervised run registers.

The exports are loaded in a fresh process by ``tests/load_export.py``, which imports ``transformers``
and ``peft`` only, and compared with ``kitchen models sample`` (greedy, the local engine's own sampler)
and with each other (merged vs adapter logits). Pushes go to ``tests/hub_standin.py``, a local stand-in
of the Hub's upload endpoints, through ``HF_ENDPOINT``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
from hub_standin import StandInHub

from kitchen.cli import main
from kitchen.manifests import DatasetManifest
from kitchen.registry import ModelRegistry, default_tracking_uri
from kitchen_assets.io import read_manifest
from tests.champion_home import home_with_tiny_champion

NAME = "supervised-tiny-kitchen-arithmetic"
REF = f"models:/{NAME}@champion"
TOKENS = 12
LOADER = Path(__file__).with_name("load_export.py")
CANARY = "hf_canaryTOKEN0123456789abcdefXYZ"


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """One tiny supervised run for the module: its registered champion is what every test exports."""
    return home_with_tiny_champion(tmp_path_factory, tiny_model_dir, "publish")


@pytest.fixture(autouse=True)
def kitchen_home(home: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Overrides conftest's per-test home: the tests here share the module's registered version."""
    monkeypatch.setenv("KITCHEN_HOME", str(home))
    yield home


@pytest.fixture(scope="module")
def prompts(home: Path) -> list[str]:
    """User turns of the held-out split the run evaluated on."""
    from datasets import load_from_disk

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KITCHEN_HOME", str(home))
        dataset = read_manifest(dg.AssetKey(["supervised", "dataset"]))
    assert isinstance(dataset, DatasetManifest)
    test = load_from_disk(dataset.path)["test"]
    return [
        next(m["content"] for m in row["messages"] if m["role"] == "user") for row in test.select(range(4))
    ]


@pytest.fixture(scope="module")
def samples(home: Path, prompts: list[str]) -> list[str]:
    """What ``kitchen models sample`` answers (greedy) to each held-out prompt."""
    answers = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KITCHEN_HOME", str(home))
        for prompt in prompts:
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                assert main(["models", "sample", REF, prompt, "--max-tokens", str(TOKENS)]) == 0
            text = out.getvalue()
            prefix = f"{NAME} v1: "
            answers.append(text[text.index(prefix) + len(prefix) :].removesuffix("\n"))
    return answers


def _load_fresh(models: list[dict[str, Any]], prompts: list[str], tmp: Path, **env: str) -> dict[str, Any]:
    spec = tmp / "spec.json"
    spec.write_text(
        json.dumps(
            {
                "models": [{k: str(v) if isinstance(v, Path) else v for k, v in m.items()} for m in models],
                "prompts": prompts,
                "max_new_tokens": TOKENS,
                "logits_prompt": prompts[0],
            }
        )
    )
    environ = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "KITCHEN_HOME")}
    environ.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **env})
    done = subprocess.run(
        [sys.executable, str(LOADER), str(spec)],
        capture_output=True,
        text=True,
        env=environ,
        cwd=tmp,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    loaded: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    assert loaded["kitchen_modules"] == []
    return loaded


def _one_line(err: str, message: str) -> bool:
    """The error is one ``kitchen:`` line holding ``message`` (after any download progress bar)."""
    last = err.rstrip("\n").split("\n")[-1]
    return "Traceback" not in err and last.startswith("kitchen: ") and message in last


def _registered_adapter(home: Path) -> Path:
    registry = ModelRegistry(default_tracking_uri())
    return registry.download(registry.resolve(REF)) / "adapter"


def _assert_portable(folder: Path, *forbidden: Path) -> None:
    """No file of the export names a directory of this machine."""
    for path in folder.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            for root in forbidden:
                assert str(root).encode() not in data, f"{path.name} names {root}"
            assert b"file://" not in data, path.name


def _metric_tags(home: Path) -> dict[str, float]:
    tags = ModelRegistry(default_tracking_uri()).resolve(REF).tags
    skip = ("kitchen.eval.base.", "kitchen.eval.primary_metric", "kitchen.eval.examples")
    return {
        k.removeprefix("kitchen.eval."): float(v)
        for k, v in tags.items()
        if k.startswith("kitchen.eval.") and not k.startswith(skip)
    }


# -- export ------------------------------------------------------------------------------------------


def test_adapter_export_files_card_and_no_local_paths(
    tmp_path: Path, home: Path, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    from huggingface_hub import ModelCard

    out = tmp_path / "tiny-sft"
    assert main(["models", "export", REF, str(out), "--base-model-id", "kitchen-test/tiny@v1.0"]) == 0
    registered = _registered_adapter(home)
    tokenizer_files = {p.name for p in (registered.parent / "tokenizer").iterdir()}
    assert {p.name for p in out.iterdir()} == {
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        *tokenizer_files,
    }
    assert (out / "adapter_model.safetensors").read_bytes() == (
        registered / "adapter_model.safetensors"
    ).read_bytes()
    config = json.loads((out / "adapter_config.json").read_text())
    trained = json.loads((registered / "adapter_config.json").read_text())
    assert (config.pop("base_model_name_or_path"), config.pop("revision")) == ("kitchen-test/tiny", "v1.0")
    assert config == {k: v for k, v in trained.items() if k not in ("base_model_name_or_path", "revision")}
    _assert_portable(out, tmp_path_factory.getbasetemp(), home, tiny_model_dir)

    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == "kitchen-test/tiny" and card.data.library_name == "peft"
    assert card.data.to_dict()["base_model_relation"] == "adapter"
    assert {r.metric_type: r.metric_value for r in card.data.eval_results} == _metric_tags(home)
    assert "**Quality gate: passed**" in card.text and "as named by whoever exported this model" in card.text
    for line in ("adapter_model.safetensors", "adapter_config.json"):  # the file table: name, size, sha256
        import hashlib

        digest = hashlib.sha256((out / line).read_bytes()).hexdigest()
        assert f"| `{line}` | {(out / line).stat().st_size} | `{digest}` |" in card.text


def test_exports_load_with_transformers_alone_and_match_kitchen_sample(
    tmp_path: Path,
    tiny_model_dir: Path,
    prompts: list[str],
    samples: list[str],
    home: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    adapter, merged = tmp_path / "adapter", tmp_path / "merged"
    assert main(["models", "export", REF, str(adapter), "--base-model-id", "kitchen-test/tiny"]) == 0
    assert main(["models", "export", REF, str(merged), "--merged"]) == 0
    assert {"config.json", "model.safetensors", "README.md"} <= {p.name for p in merged.iterdir()}
    assert not (merged / "adapter_config.json").exists()
    _assert_portable(merged, tmp_path_factory.getbasetemp(), home, tiny_model_dir)

    loaded = _load_fresh([{"folder": adapter, "base": tiny_model_dir}, {"folder": merged}], prompts, tmp_path)
    on_base, full = loaded["results"]
    assert on_base["completions"] == samples
    assert full["completions"] == samples
    worst = max(
        abs(a - b)
        for row_a, row_b in zip(on_base["logits"], full["logits"], strict=True)
        for a, b in zip(row_a, row_b, strict=True)
    )
    assert worst < 1e-4


def test_base_model_elsewhere_is_found_by_hub_id_or_named_as_missing(
    tmp_path: Path,
    home: Path,
    tiny_model_dir: Path,
    prompts: list[str],
    samples: list[str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The registry as another machine sees it: same store, but the recorded base path is not here."""
    import huggingface_hub.constants

    other = tmp_path / "other-home"
    shutil.copytree(home / "registry", other / "registry")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{home / 'mlflow.db'}")
    monkeypatch.setenv("KITCHEN_HOME", str(other))
    descriptor_path = other / "registry" / NAME / "1" / "kitchen_model.json"
    descriptor = json.loads(descriptor_path.read_text())

    def recorded(**base: str) -> None:
        descriptor["base_model"].update(base)
        descriptor_path.write_text(json.dumps(descriptor))

    elsewhere = "/srv/trainer-7/models/tiny"
    recorded(source="local", name=elsewhere, backend_model=elsewhere)
    out = tmp_path / "out"
    assert main(["models", "export", REF, str(out), "--merged"]) == 1
    err = capsys.readouterr().err
    assert f"{elsewhere} (recorded) is not on this machine" in err and "--base-model DIR" in err
    assert main(["models", "export", REF, str(out)]) == 1
    err = capsys.readouterr().err
    assert "local directory 'tiny'" in err and "--base-model-id ORG/NAME" in err
    assert not out.exists()

    from kitchen.models.tiny import build_tiny_model

    impostor = build_tiny_model(tmp_path / "impostor", seed=1)
    assert main(["models", "export", REF, str(out), "--merged", "--base-model", str(impostor)]) == 1
    assert "but the adapter was trained on" in capsys.readouterr().err and not out.exists()
    assert main(["models", "export", REF, str(out), "--merged", "--base-model", str(tiny_model_dir)]) == 0
    assert (out / "model.safetensors").is_file()

    # Trained on a Hub model: the adapter names it by id and revision; a merge finds it in the Hub cache.
    sha = "0123456789abcdef0123456789abcdef01234567"
    recorded(source="hub", name="kitchen-test/tiny", revision=sha, backend_model="/srv/hf-cache/tiny")
    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    assert main(["models", "export", REF, str(tmp_path / "merged"), "--merged"]) == 1
    assert f"kitchen-test/tiny@{sha} is not in the Hugging Face cache" in capsys.readouterr().err
    snapshot = cache / "models--kitchen-test--tiny" / "snapshots" / sha
    shutil.copytree(tiny_model_dir, snapshot)
    (cache / "models--kitchen-test--tiny" / "refs").mkdir()
    (cache / "models--kitchen-test--tiny" / "refs" / "main").write_text(sha)
    assert main(["models", "export", REF, str(tmp_path / "merged"), "--merged"]) == 0
    adapter = tmp_path / "adapter"
    assert main(["models", "export", REF, str(adapter)]) == 0
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["base_model_name_or_path"], config["revision"]) == ("kitchen-test/tiny", sha)
    assert "/srv/" not in (adapter / "README.md").read_text()

    # AutoPeftModelForCausalLM fetches the base from adapter_config.json alone (here: the Hub cache).
    loaded = _load_fresh([{"folder": adapter, "auto": True}], prompts, tmp_path, HF_HUB_CACHE=str(cache))
    assert loaded["results"][0]["completions"] == samples


def test_bad_input_fails_in_one_line_before_anything_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    cases = [
        (["nope@champion", str(out)], "no registered model 'nope'"),
        ([f"{NAME}@prod", str(out)], "no alias 'prod' (aliases: champion -> v1)"),
        ([f"{NAME}/7", str(out)], f"{NAME} has no version 7"),
        ([f"{NAME}/x", str(out)], "version 'x' must be a positive integer"),
        ([REF, str(out)], "has no Hub id"),
        ([REF, str(out), "--base-model-id", "not/a/repo"], "is not a Hub repo id"),
        ([REF, str(out), "--base-model", str(tmp_path)], "--base-model is for --merged exports"),
        ([REF, str(out), "--merged", "--base-model", str(tmp_path)], "not a Hugging Face model directory"),
    ]
    for args, message in cases:
        assert main(["models", "export", *args]) == 1, args
        err = capsys.readouterr().err
        assert _one_line(err, message), (args, err)
        assert not out.exists()
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["models", "export", REF, str(out), "--base-model-id", "kitchen-test/tiny"]) == 1
    assert "already exists and is not an empty folder" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and [p.name for p in out.iterdir()] == ["keep.txt"]


# -- push --------------------------------------------------------------------------------------------


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[StandInHub]:
    """The stand-in Hub as HF_ENDPOINT, with the canary token; Xet storage off (the stand-in speaks LFS)."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "token"))  # no saved token
    monkeypatch.setenv("HF_TOKEN", CANARY)
    with StandInHub(CANARY) as standin:
        monkeypatch.setenv("HF_ENDPOINT", standin.url)
        yield standin


def test_push_uploads_the_export_and_tags_the_version(
    hub: StandInHub,
    tmp_path: Path,
    home: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    repo = "kitchen-org/tiny-sft"
    assert (
        main(["models", "push", REF, "--repo", repo, "--private", "--base-model-id", "kitchen-test/tiny"])
        == 0
    )
    printed = capsys.readouterr()
    state = hub.state
    assert set(state.repos) == {repo} and state.repos[repo].private
    pushed = state.repos[repo]
    assert len(pushed.commits) == 1 and pushed.messages == [f"Kitchen: models:/{NAME}/1 (adapter)"]
    assert all(ok for _, _, ok in state.requests)  # every call carried the token (presigned PUTs need none)
    assert any(method == "PUT" and path.startswith("/lfs/") for method, path, _ in state.requests)

    # File by file, the upload is the export.
    local = tmp_path / "local"
    assert main(["models", "export", REF, str(local), "--base-model-id", "kitchen-test/tiny"]) == 0
    assert set(pushed.files) == {p.name for p in local.iterdir()}
    for name, data in pushed.files.items():
        if name != "README.md":
            assert data == (local / name).read_bytes(), name
    card = pushed.files["README.md"].decode()
    assert f'AutoPeftModelForCausalLM.from_pretrained("{repo}")' in card and "name: tiny-sft" in card

    tags = ModelRegistry(default_tracking_uri()).resolve(REF).tags
    assert tags["kitchen.hub.repo"] == repo and tags["kitchen.hub.kind"] == "adapter"
    assert tags["kitchen.hub.url"] == f"{hub.url}/{repo}"
    assert tags["kitchen.hub.commit"] == pushed.commits[0]
    assert f"{hub.url}/{repo}" in printed.out and pushed.commits[0] in printed.out
    assert main(["models", "show", REF]) == 0
    assert f"hugging face hub: {hub.url}/{repo}  adapter  {pushed.commits[0]}" in capsys.readouterr().out

    # The token went in Authorization headers only: not printed, logged, recorded or written.
    everything = printed.out + printed.err + caplog.text + json.dumps(tags)
    assert CANARY not in everything
    for path in home.rglob("*"):
        if path.is_file():
            assert CANARY.encode() not in path.read_bytes(), path
    for name, data in pushed.files.items():
        assert CANARY.encode() not in data, name

    # A bare name goes under the token's user; a second push of the same version is a second commit.
    assert main(["models", "push", REF, "--repo", "tiny-sft", "--base-model-id", "kitchen-test/tiny"]) == 0
    assert "kitchen-user/tiny-sft" in state.repos and not state.repos["kitchen-user/tiny-sft"].private


def test_push_refuses_bad_input_before_uploading(
    hub: StandInHub, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    def refused(args: list[str], message: str) -> None:
        before = len(hub.state.requests)
        assert main(["models", "push", *args]) == 1, args
        err = capsys.readouterr().err
        assert _one_line(err, message) and CANARY not in err, (args, err)
        assert not any(m == "POST" for m, _, _ in hub.state.requests[before:])  # nothing created or uploaded

    tiny = ["--base-model-id", "kitchen-test/tiny"]
    for bad in ("org/name/extra", "org/bad--name", "org/" + "x" * 97, "org/name.git", "-org/name"):
        refused([REF, f"--repo={bad}", *tiny], "--repo")
    refused([f"{NAME}@prod", "--repo", "kitchen-org/m", *tiny], "no alias 'prod'")
    refused(["nope", "--repo", "kitchen-org/m", *tiny], "no registered model 'nope'")
    refused([REF, "--repo", "kitchen-org/m"], "has no Hub id")
    monkeypatch.setenv("HF_TOKEN", "hf_wrongwrongwrongwrong")
    refused([REF, "--repo", "kitchen-org/m", *tiny], "refused the token (HTTP 401): check HF_TOKEN")
    monkeypatch.delenv("HF_TOKEN")
    refused([REF, "--repo", "kitchen-org/m", *tiny], "no Hugging Face token: set HF_TOKEN")
    monkeypatch.setenv("HF_TOKEN", CANARY)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    refused(
        [REF, "--repo", "kitchen-org/m", *tiny],
        f"the Hugging Face Hub at http://127.0.0.1:{port} is unreachable",
    )
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    # A namespace the token cannot write to: the Hub refuses the repo, so nothing is uploaded.
    assert main(["models", "push", REF, "--repo", "someone-else/m", *tiny]) == 1
    err = capsys.readouterr().err
    assert _one_line(err, "pushing to") and "403" in err and CANARY not in err
    assert hub.state.repos == {} and hub.state.lfs == {}
    assert not any("/preupload/" in p or "/commit/" in p for _, p, _ in hub.state.requests)
    tags = ModelRegistry(default_tracking_uri()).resolve(REF).tags
    assert tags.get("kitchen.hub.repo") not in ("kitchen-org/m", "someone-else/m")


def test_a_chained_version_names_the_base_its_first_ancestor_trained_on(tmp_path: Path) -> None:
    """``--model models:/sft@champion`` runs record the registered version as base; the export follows it."""
    from types import SimpleNamespace

    from kitchen.publish.base import PublishError, recorded_base

    first = tmp_path / "sft-1"
    first.mkdir()
    hub_base = {
        "name": "org/base",
        "source": "hub",
        "content_hash": "h0",
        "revision": "r0",
        "backend_model": "/x",
    }
    (first / "kitchen_model.json").write_text(json.dumps({"base_model": hub_base}))

    class Registry:
        def resolve(self, ref: object) -> SimpleNamespace:
            assert str(ref) == "sft/1"
            return SimpleNamespace(version=SimpleNamespace(name="sft", version="1"), number="1", tags={})

        def download(self, view: object) -> Path:
            return first

    started = {
        "name": "models:/sft@champion",
        "source": "registry",
        "content_hash": "w1",
        "backend_model": "/x",
    }
    view = SimpleNamespace(
        version=SimpleNamespace(name="dpo", version="2"),
        number="2",
        tags={"kitchen.base_model.registered_version": "models:/sft/1"},
    )
    found = recorded_base(Registry(), view, {"base_model": started})  # type: ignore[arg-type]
    assert (found.name, found.source, found.content_hash, found.revision, found.chain) == (
        "org/base",
        "hub",
        "h0",
        "r0",
        ("models:/sft/1",),
    )
    untagged = SimpleNamespace(version=view.version, number="2", tags={})
    with pytest.raises(PublishError, match="does not record which version"):
        recorded_base(Registry(), untagged, {"base_model": started})  # type: ignore[arg-type]
