"""The supervised plan lives in ``kitchen.training.supervised`` (off-policy distillation trains with it
too); re-exported here for code that imported it from its first home."""

from kitchen.training.supervised import SupervisedPlan

__all__ = ["SupervisedPlan"]
