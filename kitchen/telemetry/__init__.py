"""Kitchen telemetry: every workflow, stage and training event, emitted once and fanned out to sinks.

    from kitchen import telemetry

    telemetry.attach("my-handler", "kitchen.training", lambda event: print(event.name, event.measurements))
    telemetry.detach("my-handler")

See ``events.py`` for the catalogue and ``sinks/`` for JSONL, MLflow and OpenTelemetry; the Dagster side
(lifecycle events, the Dagster sink) is ``kitchen_assets.telemetry``.
"""

from kitchen.telemetry.events import (
    DEPLOYMENT_UPDATED,
    EVAL_COMPLETE,
    FEEDBACK_BATCH,
    FEEDBACK_RECEIVED,
    HANDLER_FAILED,
    MODEL_REGISTERED,
    RUN_COMPLETED,
    RUN_CREATED,
    RUN_FAILED,
    RUN_RUNNING,
    STAGE_EXCEPTION,
    STAGE_START,
    STAGE_STOP,
    TRAINING_CHECKPOINT,
    TRAINING_EPOCH,
    TRAINING_START,
    TRAINING_STEP,
    WORKFLOW_EXCEPTION,
    WORKFLOW_START,
    WORKFLOW_STOP,
    EventSpec,
    Handler,
    TelemetryEvent,
    attach,
    attached,
    attached_handler,
    catalogue,
    current_scope,
    detach,
    emit,
    emit_model_registered,
    register_event,
    scope,
)

__all__ = [
    "DEPLOYMENT_UPDATED",
    "EVAL_COMPLETE",
    "FEEDBACK_BATCH",
    "FEEDBACK_RECEIVED",
    "HANDLER_FAILED",
    "MODEL_REGISTERED",
    "RUN_COMPLETED",
    "RUN_CREATED",
    "RUN_FAILED",
    "RUN_RUNNING",
    "STAGE_EXCEPTION",
    "STAGE_START",
    "STAGE_STOP",
    "TRAINING_CHECKPOINT",
    "TRAINING_EPOCH",
    "TRAINING_START",
    "TRAINING_STEP",
    "WORKFLOW_EXCEPTION",
    "WORKFLOW_START",
    "WORKFLOW_STOP",
    "EventSpec",
    "Handler",
    "TelemetryEvent",
    "attach",
    "attached",
    "attached_handler",
    "catalogue",
    "current_scope",
    "detach",
    "emit",
    "emit_model_registered",
    "register_event",
    "scope",
]
