"""Metric functions Kitchen's lm-eval task YAMLs reference (``!function kitchen.eval.metrics.<name>``).

Only what lm-eval lacks lives here: SQuAD-style token precision/recall/F1 for free-form generations
(lm-eval has them only inside its SQuAD tasks, through HF ``evaluate``), per-token NLL for a
loglikelihood task (lm-eval's ``perplexity`` is per document), and an exact match that keeps numbers
whole (lm-eval's, told to ignore punctuation and whitespace, scores ``-25``, ``2.5`` and ``2 5`` as
``25``). The token-weighted perplexity is lm-eval's own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lm_eval.api.metrics import weighted_mean

from kitchen.eval.heldout import normalize_answer, token_prf


def _prf(references: Sequence[str], predictions: Sequence[str]) -> tuple[float, float, float]:
    # lm-eval calls generation metrics one document at a time: references=[gold], predictions=[output].
    (reference,), (prediction,) = references, predictions
    return token_prf(str(prediction), str(reference))


def exact_match(references: Sequence[str], predictions: Sequence[str], **_: Any) -> float:
    """1.0 when the output equals the reference after ``normalize_answer`` (case, punctuation and
    articles ignored; a number's sign, decimal point and digits all count)."""
    (reference,), (prediction,) = references, predictions
    return float(normalize_answer(str(prediction)) == normalize_answer(str(reference)))


def token_precision(references: Sequence[str], predictions: Sequence[str], **_: Any) -> float:
    return _prf(references, predictions)[0]


def token_recall(references: Sequence[str], predictions: Sequence[str], **_: Any) -> float:
    return _prf(references, predictions)[1]


def token_f1(references: Sequence[str], predictions: Sequence[str], **_: Any) -> float:
    return _prf(references, predictions)[2]


def process_nll(doc: dict[str, Any], results: Sequence[tuple[float, bool]]) -> dict[str, tuple[float, int]]:
    """(summed log-likelihood, scored tokens) per document; ``num_tokens`` is written with the data
    using the adapter's own context/continuation split, so the two always agree."""
    ((loglikelihood, _),) = results
    pair = (float(loglikelihood), int(doc["num_tokens"]))
    return {"nll": pair, "perplexity": pair}


def token_nll(items: Sequence[tuple[float, int]]) -> float:
    """Mean negative log-likelihood per token over all documents (token-weighted, like the training loss)."""
    return float(-weighted_mean(list(items)))
