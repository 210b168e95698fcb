"""Held-out evaluation through the sampling-client contract: NLL on test datums, exact match by sampling.

Everything goes through ``compute_logprobs`` and ``sample``, so a local model and a Tinker model are
scored by the same code. All requests are submitted before any result is awaited, which lets the local
engine batch them and lets Tinker run them concurrently.
"""

from __future__ import annotations

import math
import re
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from tinker import types

from kitchen.contract import SamplingClient


@dataclass(frozen=True)
class GenerationExample:
    prompt_tokens: list[int]
    reference: str
    prompt_text: str = ""


@dataclass
class HeldoutResult:
    metrics: dict[str, float]
    generations: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0


# A number as written, kept whole: a sign that is not a hyphen inside a word, digits (commas only as
# thousands separators), an optional decimal part. Deleting whitespace and punctuation around it would
# score "-25", "2.5" and "2 5" as "25".
_NUMBER = re.compile(
    r"(?<![\w.])(?P<sign>[-+\u2212])?(?:(?P<int>\d{1,3}(?:,\d{3})+|\d+)(?P<frac>\.\d+)?|(?P<bare>\.\d+))(?!\w)"
)
_ARTICLES = re.compile(r"\b(?:a|an|the)\b")


def _words(text: str) -> list[str]:
    text = re.sub(r"[^\w\s]", " ", text.lower())
    return _ARTICLES.sub(" ", text).split()


def _number(match: re.Match[str]) -> str:
    sign = "-" if match["sign"] in ("-", "\u2212") else ""
    if match["bare"] is not None:
        return f"{sign}0{match['bare']}"
    return f"{sign}{match['int'].replace(',', '')}{match['frac'] or ''}"


def normalize_answer(text: str) -> str:
    """SQuAD-style normalisation (lower case, no punctuation or articles, single spaces) that keeps each
    number whole: its sign and decimal point stay, ``1,000`` reads as ``1000`` and ``+5`` as ``5``."""
    tokens: list[str] = []
    last = 0
    for match in _NUMBER.finditer(text):
        tokens += _words(text[last : match.start()])
        tokens.append(_number(match))
        last = match.end()
    tokens += _words(text[last:])
    return " ".join(tokens)


def token_prf(prediction: str, reference: str) -> tuple[float, float, float]:
    """Token-level precision, recall and F1 between normalised prediction and reference (SQuAD)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred and not ref:
        return 1.0, 1.0, 1.0
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0, 0.0, 0.0
    precision, recall = common / len(pred), common / len(ref)
    return precision, recall, 2 * precision * recall / (precision + recall)


def heldout_nll(client: SamplingClient, datums: Sequence[types.Datum]) -> float:
    """Mean negative log-likelihood per weighted target token over ``datums``."""
    futures = []
    for datum in datums:
        targets = datum.loss_fn_inputs["target_tokens"].tolist()
        tokens = [*datum.model_input.to_ints(), int(targets[-1])]
        futures.append(client.compute_logprobs(types.ModelInput.from_ints(tokens)))
    total_nll = total_weight = 0.0
    for datum, future in zip(datums, futures, strict=True):
        logprobs = future.result()
        weights = datum.loss_fn_inputs["weights"].tolist()
        for i, weight in enumerate(weights):
            if weight > 0:
                lp = logprobs[i + 1]
                if lp is None:
                    raise ValueError("compute_logprobs returned None for a target position")
                total_nll -= weight * lp
                total_weight += weight
    if total_weight == 0:
        raise ValueError("held-out datums have no weighted target tokens")
    return total_nll / total_weight


def generate(
    client: SamplingClient,
    examples: Sequence[GenerationExample],
    *,
    max_tokens: int,
    stop: list[str] | list[int],
    seed: int = 0,
) -> list[str]:
    """Greedy completions for every example, decoded with the client's tokenizer."""
    params = types.SamplingParams(max_tokens=max_tokens, temperature=0.0, stop=stop, seed=seed)
    futures = [
        client.sample(types.ModelInput.from_ints(ex.prompt_tokens), num_samples=1, sampling_params=params)
        for ex in examples
    ]
    tokenizer = client.get_tokenizer()
    return [
        tokenizer.decode(f.result().sequences[0].tokens, skip_special_tokens=True).strip() for f in futures
    ]


def evaluate_heldout(
    client: SamplingClient,
    datums: Sequence[types.Datum],
    examples: Sequence[GenerationExample],
    *,
    max_tokens: int,
    stop: list[str] | list[int],
    num_samples_to_keep: int = 5,
) -> HeldoutResult:
    """NLL/perplexity on ``datums`` and exact match plus token P/R/F1 of greedy generations."""
    started = time.perf_counter()
    metrics: dict[str, float] = {}
    if datums:
        nll = heldout_nll(client, datums)
        metrics["nll"] = nll
        metrics["perplexity"] = math.exp(min(nll, 50.0))
    generations: list[dict[str, str]] = []
    if examples:
        outputs = generate(client, examples, max_tokens=max_tokens, stop=stop)
        exact = precision = recall = f1 = 0.0
        for example, output in zip(examples, outputs, strict=True):
            exact += float(normalize_answer(output) == normalize_answer(example.reference))
            p, r, f = token_prf(output, example.reference)
            precision, recall, f1 = precision + p, recall + r, f1 + f
        n = len(examples)
        metrics.update(exact_match=exact / n, precision=precision / n, recall=recall / n, f1=f1 / n)
        generations = [
            {"prompt": ex.prompt_text, "reference": ex.reference, "output": out}
            for ex, out in zip(examples[:num_samples_to_keep], outputs[:num_samples_to_keep], strict=True)
        ]
    return HeldoutResult(metrics=metrics, generations=generations, seconds=time.perf_counter() - started)
