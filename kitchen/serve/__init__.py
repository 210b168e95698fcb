"""``kitchen serve``: a registered version (or a run's sampler) behind an OpenAI-compatible endpoint."""

from kitchen.serve.app import API_KEY_ENV, VERSION_HEADER, APIError, ServeSettings, create_app
from kitchen.serve.batching import Batcher
from kitchen.serve.source import ModelSource, RegistryLocator, SamplerLocator, Served

__all__ = [
    "API_KEY_ENV",
    "VERSION_HEADER",
    "APIError",
    "Batcher",
    "ModelSource",
    "RegistryLocator",
    "SamplerLocator",
    "ServeSettings",
    "Served",
    "create_app",
]
