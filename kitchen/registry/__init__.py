"""The model registry: MLflow-backed versions of trained adapters with lineage and champion promotion."""

from kitchen.registry.lineage import Provenance, TrainedModel, code_version, lineage_tags, weights_hash
from kitchen.registry.loading import load_sampling_client, sampler_path
from kitchen.registry.names import (
    InvalidModelName,
    ModelRef,
    derive_model_name,
    parse_model_ref,
    validate_model_name,
)
from kitchen.registry.promotion import (
    CHALLENGER,
    CHAMPION,
    GateResult,
    PromotionDecision,
    decide_promotion,
    eval_gate,
)
from kitchen.registry.register import RegistrationResult, promote_version, register_trained_model
from kitchen.registry.store import (
    ModelRegistry,
    RegistryError,
    VersionView,
    default_artifact_root,
    default_tracking_uri,
    redact_uri,
)

__all__ = [
    "CHALLENGER",
    "CHAMPION",
    "GateResult",
    "InvalidModelName",
    "ModelRef",
    "ModelRegistry",
    "PromotionDecision",
    "Provenance",
    "RegistrationResult",
    "RegistryError",
    "TrainedModel",
    "VersionView",
    "code_version",
    "decide_promotion",
    "default_artifact_root",
    "default_tracking_uri",
    "derive_model_name",
    "eval_gate",
    "lineage_tags",
    "load_sampling_client",
    "parse_model_ref",
    "promote_version",
    "redact_uri",
    "register_trained_model",
    "sampler_path",
    "validate_model_name",
    "weights_hash",
]
