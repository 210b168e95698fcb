"""Kitchen's local engine: the Tinker client contract on PyTorch + PEFT LoRA, in this process.

``LocalServiceClient`` stands in for ``tinker.ServiceClient``; the training and sampling clients it
makes honour ``kitchen.contract`` with Tinker's semantics (summed cross-entropy, AdamW steps,
stop sequences kept in sampled tokens), so workflow code runs unchanged on either backend.
"""

from resources.local_engine.losses import LOSS_FNS, LossFn, LossOutput, get_loss_fn
from resources.local_engine.sampling import LocalSamplingClient
from resources.local_engine.service import LocalServiceClient
from resources.local_engine.training import LocalTrainingClient
from resources.local_engine.uris import path_from_uri, uri_for_path

__all__ = [
    "LOSS_FNS",
    "LocalSamplingClient",
    "LocalServiceClient",
    "LocalTrainingClient",
    "LossFn",
    "LossOutput",
    "get_loss_fn",
    "path_from_uri",
    "uri_for_path",
]
