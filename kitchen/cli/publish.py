"""``kitchen models export`` and ``kitchen models push``: a registered version as a Hugging Face model.

    kitchen models export NAME@champion ./out [--merged] [--base-model-id ORG/NAME] [--base-model DIR]
    kitchen models push NAME@champion --repo ORG/NAME [--private] [--merged]

Every check (version, base model, folder; for a push the repo id, ``HF_TOKEN`` and ``HF_ENDPOINT``)
runs before a file is written or uploaded.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from kitchen.registry.store import ModelRegistry


def _base_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--merged",
        action="store_true",
        help="the base with the adapter merged in, as full safetensors weights (default: the PEFT adapter)",
    )
    parser.add_argument(
        "--base-model-id",
        metavar="ORG/NAME[@REV]",
        help="the Hub id the adapter names as its base when the version was trained on a local directory "
        "(default: the recorded Hub id and revision)",
    )
    parser.add_argument(
        "--base-model",
        metavar="DIR",
        help="with --merged: a local directory holding the base weights, when the recorded one is not on "
        "this machine (must hash to the recorded content hash)",
    )


def add_publish_parsers(verbs: argparse._SubParsersAction) -> None:
    export = verbs.add_parser(
        "export",
        help="write a registered version as a Hugging Face model folder (adapter or merged, model card)",
    )
    export.add_argument("ref", help="NAME@alias, NAME/VERSION or NAME (models:/ prefix optional)")
    export.add_argument("dir", help="the folder to create (new, or empty)")
    _base_options(export)
    push = verbs.add_parser(
        "push",
        help="export a registered version and upload it to the Hugging Face Hub (HF_TOKEN, HF_ENDPOINT)",
    )
    push.add_argument("ref", help="NAME@alias, NAME/VERSION or NAME (models:/ prefix optional)")
    push.add_argument(
        "--repo", required=True, help="the Hub repo: ORG/NAME (or NAME, under the token's user)"
    )
    push.add_argument("--private", action="store_true", help="create the repo private (if it is new)")
    push.add_argument(
        "--timeout", type=float, default=15.0, help="seconds the Hub may take to answer the first check"
    )
    _base_options(push)


def export_command(registry: ModelRegistry, args: argparse.Namespace) -> int:
    from kitchen.publish import check_target, plan_export, write_export

    out = Path(args.dir).expanduser().absolute()
    check_target(out)
    plan = plan_export(
        registry, args.ref, merged=args.merged, base_model=args.base_model, base_model_id=args.base_model_id
    )
    write_export(plan, out, log=print)
    _summary(plan, out)
    return 0


def push_command(registry: ModelRegistry, args: argparse.Namespace) -> int:
    from kitchen.publish import check_repo_id, connect, hub_token, plan_export, push

    check_repo_id(args.repo)
    hub_token()  # a missing token fails before the registry is even opened
    plan = plan_export(
        registry, args.ref, merged=args.merged, base_model=args.base_model, base_model_id=args.base_model_id
    )
    target = connect(args.repo, timeout_s=args.timeout)
    result = push(registry, plan, target, private=True if args.private else None, log=print)
    name, number = plan.view.version.name, plan.view.number
    print(f"pushed {name} v{number} ({result.kind}) to {result.url}")
    print(f"  commit {result.commit}  {result.commit_url}")
    print(f"  registry: {name} v{number} tagged kitchen.hub.repo={result.repo_id}, kitchen.hub.commit")
    return 0


def _summary(plan: object, out: Path) -> None:
    from kitchen.publish import ExportPlan

    assert isinstance(plan, ExportPlan)
    files = sorted(p for p in out.rglob("*") if p.is_file())
    size = sum(p.stat().st_size for p in files)
    print(f"exported {plan.view.version.name} v{plan.view.number} ({plan.kind}) to {out}")
    if plan.hub is not None:
        base = f"{plan.hub.repo_id}" + (f"@{plan.hub.revision}" if plan.hub.revision else "")
        base += f" (gguf_file {plan.hub.gguf_file})" if plan.hub.gguf_file else ""
        print(f"  base model: {base}")
    print(f"  {len(files)} files, {size / 1e6:.1f} MB: {', '.join(p.name for p in files)}")
    print(f"  how to load it: {out / 'README.md'}")
