"""Feedback on served completions as training data: DPO pairs and SFT rows, one batch at a time."""

from kitchen.feedback.data import (
    Batch,
    TrainingData,
    WrittenData,
    build_training_data,
    served_model_name,
    write_training_data,
)

__all__ = [
    "Batch",
    "TrainingData",
    "WrittenData",
    "build_training_data",
    "served_model_name",
    "write_training_data",
]
