"""``kitchen models``: list registered models, show a version's metrics and lineage, sample from one.

    kitchen models list
    kitchen models show NAME[@alias|/version]
    kitchen models sample NAME@champion "What is 2 + 3?"
    kitchen models export NAME@champion DIR [--merged]        (kitchen/cli/publish.py)
    kitchen models push NAME@champion --repo ORG/NAME [--private] [--merged]

The store is ``--tracking-uri``, else ``MLFLOW_TRACKING_URI``, else the SQLite store under the Kitchen home
(the same one ``kitchen run`` registers into).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from datetime import UTC, datetime

from kitchen.cli.publish import add_publish_parsers, export_command, push_command
from kitchen.manifests import Manifest, RegisteredModelManifest
from kitchen.publish.base import PublishError
from kitchen.registry.names import ModelRef, parse_model_ref
from kitchen.registry.store import ModelRegistry, RegistryError, default_tracking_uri, is_remote

# Lineage rows of ``show``: label -> tag keys joined by spaces (missing ones skipped).
_LINEAGE = (
    ("workflow", ("kitchen.workflow", "kitchen.backend")),
    ("base model", ("kitchen.base_model", "kitchen.base_model.revision", "kitchen.base_model.content_hash")),
    ("dataset", ("kitchen.dataset", "kitchen.dataset.revision", "kitchen.dataset.content_hash")),
    ("datums", ("kitchen.datums.content_hash",)),
    ("weights", ("kitchen.weights.sampler_path",)),
    ("training state", ("kitchen.weights.state_path",)),
    ("training", ("kitchen.training.steps", "kitchen.training.final_loss")),
    ("code", ("kitchen.code.version", "kitchen.code.git_commit")),
    ("dagster run", ("dagster.run_id", "dagster.run_url")),
    ("hugging face hub", ("kitchen.hub.url", "kitchen.hub.kind", "kitchen.hub.commit")),
)


def add_models_parser(sub: argparse._SubParsersAction) -> None:
    models = sub.add_parser(
        "models", help="list, show, sample, export and push registered models (MLflow registry)"
    )
    models.add_argument(
        "--tracking-uri",
        help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else the Kitchen home's store)",
    )
    verbs = models.add_subparsers(dest="models_command", required=True)
    verbs.add_parser("list", help="registered models with their versions and aliases")
    show = verbs.add_parser("show", help="one version: aliases, metrics, promotion decision and lineage")
    show.add_argument("ref", help="NAME (latest version), NAME@alias (e.g. @champion) or NAME/VERSION")
    sample = verbs.add_parser("sample", help="generate from a registered version through the client contract")
    sample.add_argument("ref", help="NAME@alias, NAME/VERSION or NAME")
    sample.add_argument("prompt", help="a user message")
    sample.add_argument("--max-tokens", type=int, default=32, help="new tokens to generate (default 32)")
    sample.add_argument("--backend", choices=("local", "tinker"), help="default: the backend that trained it")
    add_publish_parsers(verbs)


def models_command(args: argparse.Namespace) -> int:
    registry = ModelRegistry(args.tracking_uri or default_tracking_uri())
    try:
        if args.models_command == "list":
            return _list(registry)
        if args.models_command in ("export", "push"):
            run = export_command if args.models_command == "export" else push_command
            return run(registry, args)
        ref = parse_model_ref(args.ref)
        if args.models_command == "show":
            return _show(registry, ref)
        return _sample(registry, ref, args.prompt, args.max_tokens, args.backend)
    except (RegistryError, PublishError, ValueError) as err:
        print(f"kitchen: {err}", file=sys.stderr)
        return 1


def _when(millis: int | None) -> str:
    return datetime.fromtimestamp((millis or 0) / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _metric(tags: dict[str, str], name: str, prefix: str = "kitchen.eval") -> str:
    raw = tags.get(f"{prefix}.{name}")
    if raw is None:
        return "n/a"
    value = float(raw)
    return "nan" if math.isnan(value) else f"{value:.4f}"


def _list(registry: ModelRegistry) -> int:
    from rich.console import Console
    from rich.table import Table

    registry.preflight()
    models = registry.list_models()
    print(f"registry: {registry.display_uri}")
    if not models:
        print("no registered models yet (kitchen run supervised registers one)")
        return 0
    table = Table()
    for column in ("model", "versions", "aliases", "champion metric", "updated"):
        table.add_column(column)
    for model in models:
        views = registry.versions(model.name)
        aliases = ", ".join(f"{a} v{v}" for a, v in sorted(registry.aliases(model.name).items()))
        champion = next((v for v in views if "champion" in v.aliases), None)
        metric = ""
        if champion is not None:
            name = champion.tags.get("kitchen.eval.primary_metric", "")
            metric = f"{name} {_metric(champion.tags, name)}" if name else ""
        table.add_row(
            model.name, str(len(views)), aliases or "-", metric, _when(model.last_updated_timestamp)
        )
    Console(width=200).print(table)
    return 0


def _show(registry: ModelRegistry, ref: ModelRef) -> int:
    from rich.console import Console
    from rich.table import Table

    registry.preflight()
    view = registry.resolve(ref)
    version, tags = view.version, view.tags
    aliases = f"  [{', '.join(view.aliases)}]" if view.aliases else ""
    print(f"{version.name} v{version.version}{aliases}   (models:/{version.name}/{version.version})")
    print(f"  registered:  {_when(version.creation_timestamp)}")
    print(f"  source:      {version.source}")
    run_id = version.run_id or ""
    run = registry.client.get_run(run_id) if run_id else None
    where = registry.run_url(run.info.experiment_id, run_id) if run else None
    print(f"  MLflow run:  {run_id or '-'}" + (f"  {where}" if where else ""))
    if not is_remote(registry.tracking_uri):
        print(f"  MLflow UI:   mlflow ui --backend-store-uri {registry.tracking_uri}")
    if "kitchen.promotion.alias" in tags:
        print(f"  promotion:   {tags['kitchen.promotion.alias']}: {tags.get('kitchen.promotion.reason', '')}")
        print(
            f"  eval gate:   passed={tags.get('kitchen.promotion.gate_passed')} "
            f"({tags.get('kitchen.promotion.gate_source', '')})"
        )
    metric_names = sorted(
        k.removeprefix("kitchen.eval.")
        for k in tags
        if k.startswith("kitchen.eval.")
        and not k.startswith("kitchen.eval.base.")
        and k not in ("kitchen.eval.primary_metric", "kitchen.eval.examples")
    )
    if metric_names:
        primary = tags.get("kitchen.eval.primary_metric", "")
        table = Table(
            title=f"evaluation ({tags.get('kitchen.eval.examples', '?')} examples; primary: {primary})"
        )
        for column in ("metric", "base", "trained"):
            table.add_column(column, justify="left" if column == "metric" else "right")
        for name in metric_names:
            table.add_row(name, _metric(tags, name, "kitchen.eval.base"), _metric(tags, name))
        Console(width=200).print(table)
    print("lineage:")
    for label, keys in _LINEAGE:
        values = [tags[k] for k in keys if tags.get(k)]
        if values:
            print(f"  {label + ':':<18}{'  '.join(values)}")
    if tags.get("kitchen.checkpoints"):
        print(f"  {'checkpoints:':<18}" + f"\n  {'':<18}".join(tags["kitchen.checkpoints"].splitlines()))
    upstream = {
        k.removeprefix("kitchen.upstream."): v for k, v in tags.items() if k.startswith("kitchen.upstream.")
    }
    for asset, dagster_run in sorted(upstream.items()):
        print(f"  {'asset:':<18}{asset}  (Dagster run {dagster_run})")
    for key, label in (("kitchen.hyperparameters", "hyperparameters:"), ("kitchen.config", "run config:")):
        if tags.get(key):
            print(f"  {label:<18}{json.dumps(json.loads(tags[key]), sort_keys=True)}")
    others = [v for v in registry.versions(version.name) if v.number != view.number]
    if others:
        listed = ", ".join(
            f"v{v.number}" + (f" ({', '.join(v.aliases)})" if v.aliases else "") for v in others
        )
        print(f"other versions: {listed}")
    return 0


def _sample(registry: ModelRegistry, ref: ModelRef, prompt: str, max_tokens: int, backend: str | None) -> int:
    from tinker import types

    from kitchen.cli.location import load_definitions
    from kitchen.data import prompt_and_answer
    from kitchen.registry.loading import sampler_path

    registry.preflight()
    path, view = sampler_path(registry, ref)
    defs = load_definitions(backend or view.tags.get("kitchen.backend"))
    service = (defs.resources or {})["training"].service_client()
    client = service.create_sampling_client(model_path=path).result()
    tokenizer = client.get_tokenizer()
    row = {
        "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": ""}],
        "answer": "-",
    }
    tokens = prompt_and_answer(row, tokenizer).prompt_tokens
    params = types.SamplingParams(max_tokens=max_tokens, temperature=0.0, stop=[tokenizer.eos_token])
    response = client.sample(types.ModelInput.from_ints(tokens), 1, params).result()
    text = tokenizer.decode(response.sequences[0].tokens, skip_special_tokens=True)
    print(f"{view.version.name} v{view.number}: {text}")
    return 0


def print_registration(manifest: Manifest) -> None:
    """The end of ``kitchen run``: which version was registered, the alias it got, how to look at it."""
    assert isinstance(manifest, RegisteredModelManifest)
    status = "registered" if manifest.created else "already registered (same weights)"
    print(f"model: {manifest.model_uri} {status} -> {manifest.alias}: {manifest.promotion_reason}")
    print(f"  kitchen models show {manifest.name}/{manifest.version}    (registry: {manifest.tracking_uri})")
