"""``kitchen serve``: a registered version, or a run's sampler weights, behind an OpenAI-compatible API.

    kitchen serve models:/NAME@champion                 # follows the alias as it moves
    kitchen serve models:/NAME/3 --port 8001
    kitchen serve file:///.../engine/.../sampler         # a run's sampler path (or tinker://...)
    KITCHEN_SERVE_API_KEY=... kitchen serve NAME@champion --host 0.0.0.0

The sampling client comes from the code location's ``training`` resource for the backend that trained
the version (``kitchen.backend`` tag; ``--backend`` overrides), as ``kitchen models sample`` does.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from urllib.parse import urlsplit

from kitchen.serve.app import API_KEY_ENV

_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def add_serve_parser(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser(
        "serve",
        help="serve a registered model over an OpenAI-compatible HTTP API",
        description="Serve a registered version (models:/NAME@alias follows the alias without a restart) "
        "or a run's sampler path at POST /v1/chat/completions, GET /v1/models and GET /health.",
    )
    serve.add_argument(
        "ref", help="models:/NAME@champion, models:/NAME/3, or a sampler path (file://, tinker://)"
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    serve.add_argument("--backend", choices=("local", "tinker"), help="default: the backend that trained it")
    serve.add_argument(
        "--tracking-uri",
        help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else the Kitchen home's store)",
    )
    serve.add_argument(
        "--poll-interval",
        type=float,
        default=5.0,
        help="seconds between registry checks for a moved alias (default 5; 0 turns following off)",
    )
    serve.add_argument(
        "--api-key-env",
        default=API_KEY_ENV,
        help=f"environment variable holding the bearer key clients must send (default {API_KEY_ENV}; "
        "unset: no key required)",
    )
    serve.add_argument(
        "--max-tokens-limit",
        type=int,
        default=1024,
        help="largest max_tokens a request may ask for (default 1024)",
    )
    serve.add_argument(
        "--default-max-tokens",
        type=int,
        default=256,
        help="max_tokens when a request names none (default 256)",
    )
    serve.add_argument(
        "--max-request-bytes", type=int, default=1 << 20, help="largest request body (default 1 MiB)"
    )
    serve.add_argument("--max-n", type=int, default=8, help="largest n (choices per request; default 8)")
    serve.add_argument(
        "--feedback-db",
        type=Path,
        help="SQLite file keeping completions and the feedback posted on them (default "
        "$KITCHEN_HOME/feedback.db)",
    )
    serve.add_argument(
        "--no-feedback",
        action="store_true",
        help="keep no completions; POST /v1/feedback answers 404",
    )
    serve.add_argument(
        "--batch-window-ms",
        type=float,
        default=5.0,
        help="how long a request waits for others to be submitted with it (default 5 ms)",
    )


def serve_command(args: argparse.Namespace) -> int:
    import uvicorn

    from kitchen.cli.location import load_definitions
    from kitchen.registry.names import parse_model_ref
    from kitchen.registry.store import ModelRegistry, RegistryError, default_tracking_uri
    from kitchen.serve import ModelSource, RegistryLocator, SamplerLocator, ServeSettings, create_app
    from kitchen.serve.feedback import FeedbackStore
    from kitchen.serve.source import Locator
    from kitchen.telemetry.sinks import configure_sinks

    api_key = os.environ.get(args.api_key_env) or None
    if args.host not in _LOOPBACK and api_key is None:
        print(
            f"kitchen: warning: serving on {args.host} with no bearer key (set {args.api_key_env})",
            file=sys.stderr,
        )
    locator: Locator
    try:
        if _is_sampler_path(args.ref):
            locator = SamplerLocator(args.ref)
            backend = args.backend or ("tinker" if args.ref.startswith("tinker://") else "local")
        else:
            registry = ModelRegistry(args.tracking_uri or default_tracking_uri())
            registry.preflight()
            registered = RegistryLocator(registry, parse_model_ref(args.ref))
            backend = args.backend or registered.backend() or "local"
            locator = registered
        service = (load_definitions(backend).resources or {})["training"].service_client()
        poll = args.poll_interval if args.poll_interval > 0 and isinstance(locator, RegistryLocator) else None
        source = ModelSource(
            locator, lambda path: service.create_sampling_client(model_path=path).result(), poll_s=poll
        )
        served = source.load()
    except (RegistryError, ValueError, FileNotFoundError) as err:
        print(f"kitchen: {err}", file=sys.stderr)
        return 1
    settings = ServeSettings(
        api_key=api_key,
        max_tokens_limit=args.max_tokens_limit,
        default_max_tokens=min(args.default_max_tokens, args.max_tokens_limit),
        max_request_bytes=args.max_request_bytes,
        max_n=args.max_n,
        batch_window_s=args.batch_window_ms / 1000,
    )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kitchen.serve").setLevel(logging.INFO)
    following = f", checking for a moved alias every {poll:g} s" if poll else ""
    print(
        f"kitchen: serving {source.name} ({served.version}) on {backend} at http://{args.host}:{args.port}/v1"
        f"{following}; bearer key {'required' if api_key else 'not required'}",
        flush=True,
    )
    feedback = None if args.no_feedback else FeedbackStore(args.feedback_db)
    if feedback is not None:
        sinks = configure_sinks()  # kitchen.feedback.received, one per stored POST /v1/feedback
        print(
            f"kitchen: completions and feedback are kept in {feedback.path}; telemetry session "
            f"{settings.session} to {', '.join(sinks) or 'no sinks'}",
            flush=True,
        )
    app = create_app(source, settings, feedback)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


def _is_sampler_path(ref: str) -> bool:
    if ref.startswith("models:/"):
        return False
    return urlsplit(ref).scheme in ("file", "tinker") or Path(ref).exists()
