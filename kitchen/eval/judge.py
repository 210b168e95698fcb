"""A pairwise LLM judge: the starting and the trained model's replies to each held-out prompt, compared.

Exact match and token F1 mean little on open-ended chat data. For each prompt the judge sees both
replies twice, once in each order (position bias cancels out), under one fixed rubric, and answers A, B
or T(ie). Per prompt the trained model scores 1 for a win, 0.5 for a tie, 0 for a loss in each order,
averaged over the orders whose verdict parsed; a prompt is a win above 0.5, a tie at 0.5 (orders that
disagree tie), a loss below. ``judge_win_rate`` is the mean prompt score (ties count half) with a normal
95% confidence interval over prompts; ``judge_consistency`` is the share of prompts, both verdicts
parsed, whose two orders named the same winner. Unparseable verdicts are counted, never scored as a
loss or a tie. Every prompt and raw verdict is kept for the report (users audit judges).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from kitchen.ports.llm import ChatMessage, LLMClient, LLMError

RUBRIC = (
    "You are an impartial judge. Compare two assistant replies to the same user request. Judge which "
    "reply better follows the request: correct, helpful, relevant, clear and no longer than needed. "
    "Ignore which reply comes first and how long each is. Answer with one letter only: A if reply A is "
    "better, B if reply B is better, T if they are equally good."
)
Winner = Literal["trained", "base", "tie"]
Order = Literal["trained_first", "base_first"]
Z95 = 1.959963984540054

_VERDICT = re.compile(r"\b(A|B|T|TIE)\b", re.IGNORECASE)


def judge_messages(question: str, reply_a: str, reply_b: str) -> list[ChatMessage]:
    """The fixed rubric and one comparison, as the judge sees it."""
    return [
        {"role": "system", "content": RUBRIC},
        {
            "role": "user",
            "content": f"[User request]\n{question}\n\n[Reply A]\n{reply_a}\n\n[Reply B]\n{reply_b}\n\n"
            "Which reply is better? Answer A, B or T.",
        },
    ]


def parse_verdict(text: str) -> Literal["A", "B", "T"] | None:
    """The first standalone A, B, T or "tie" in the reply (``"B"``, ``"Verdict: A."``); None otherwise."""
    found = _VERDICT.search(text)
    if found is None:
        return None
    letter = found.group(1).upper()
    return "T" if letter in ("T", "TIE") else ("A" if letter == "A" else "B")


def winner_of(verdict: Literal["A", "B", "T"] | None, order: Order) -> Winner | None:
    """Which model a verdict picks, given which came first (reply A)."""
    if verdict is None:
        return None
    if verdict == "T":
        return "tie"
    first: Winner = "trained" if order == "trained_first" else "base"
    second: Winner = "base" if order == "trained_first" else "trained"
    return first if verdict == "A" else second


_SCORE: dict[Winner, float] = {"trained": 1.0, "tie": 0.5, "base": 0.0}


@dataclass
class JudgedPrompt:
    question: str
    base: str
    trained: str
    verdicts: list[dict[str, Any]] = field(default_factory=list)
    """Per order: the order, the judge's messages, its raw reply, the parsed letter and the winner."""

    @property
    def winners(self) -> list[Winner]:
        return [v["winner"] for v in self.verdicts if v["winner"] is not None]

    @property
    def score(self) -> float | None:
        """The trained model's mean score over the parsed orders; None when none parsed."""
        return sum(_SCORE[w] for w in self.winners) / len(self.winners) if self.winners else None

    @property
    def outcome(self) -> Literal["win", "tie", "loss"] | None:
        score = self.score
        if score is None:
            return None
        return "win" if score > 0.5 else "loss" if score < 0.5 else "tie"


@dataclass
class JudgeResult:
    model: str
    prompts: list[JudgedPrompt]

    def metrics(self) -> dict[str, float]:
        scored = [p.score for p in self.prompts if p.score is not None]
        outcomes = [p.outcome for p in self.prompts if p.outcome is not None]
        n = len(scored)
        both = [p for p in self.prompts if len(p.winners) == 2]
        unparseable = sum(1 for p in self.prompts for v in p.verdicts if v["winner"] is None)
        metrics: dict[str, float] = {
            "judge_examples": float(len(self.prompts)),
            "judge_scored": float(n),
            "judge_unparseable": float(unparseable),
        }
        if n == 0:
            return metrics  # no rate from nothing: the gate reports the metric missing, not a zero
        mean = sum(scored) / n
        sd = math.sqrt(sum((s - mean) ** 2 for s in scored) / (n - 1)) if n > 1 else 0.0
        half = Z95 * sd / math.sqrt(n)
        metrics.update(
            {
                "judge_win_rate": mean,
                "judge_win_rate_ci_low": max(0.0, mean - half),
                "judge_win_rate_ci_high": min(1.0, mean + half),
                "judge_wins": outcomes.count("win") / n,
                "judge_ties": outcomes.count("tie") / n,
                "judge_losses": outcomes.count("loss") / n,
            }
        )
        if both:
            metrics["judge_consistency"] = sum(1 for p in both if p.winners[0] == p.winners[1]) / len(both)
        return metrics

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "rubric": RUBRIC,
            "metrics": self.metrics(),
            "prompts": [
                {
                    "question": p.question,
                    "base": p.base,
                    "trained": p.trained,
                    "outcome": p.outcome,
                    "verdicts": p.verdicts,
                }
                for p in self.prompts
            ],
        }


def judge_pairs(
    judge: LLMClient,
    samples: Sequence[Mapping[str, str]],
    *,
    max_tokens: int = 8,
    log: Callable[[str], None] | None = None,
) -> JudgeResult:
    """Judge each sample's ``base`` and ``trained`` replies to its ``question`` in both orders.

    A judge call that fails (``LLMError``) counts as an unparseable verdict with the error kept, so one
    bad reply does not sink the report; if every call fails, the first error is raised.
    """
    prompts: list[JudgedPrompt] = []
    errors: list[str] = []
    calls = 0
    for sample in samples:
        item = JudgedPrompt(sample["question"], sample["base"], sample["trained"])
        orders: tuple[tuple[Order, str, str], ...] = (
            ("trained_first", item.trained, item.base),
            ("base_first", item.base, item.trained),
        )
        for order, reply_a, reply_b in orders:
            messages = judge_messages(item.question, reply_a, reply_b)
            calls += 1
            try:
                raw = judge.chat(messages, max_tokens=max_tokens, temperature=0.0).content
            except LLMError as failure:
                errors.append(str(failure))
                item.verdicts.append(
                    {
                        "order": order,
                        "messages": messages,
                        "raw": None,
                        "error": str(failure),
                        "verdict": None,
                        "winner": None,
                    }
                )
                continue
            verdict = parse_verdict(raw)
            item.verdicts.append(
                {
                    "order": order,
                    "messages": messages,
                    "raw": raw,
                    "verdict": verdict,
                    "winner": winner_of(verdict, order),
                }
            )
        prompts.append(item)
        if log is not None and len(prompts) % 10 == 0:
            log(f"judge: {len(prompts)}/{len(samples)} prompts")
    if errors and len(errors) == calls:
        raise LLMError(f"the judge {judge.model_id} failed on every call; first: {errors[0]}")
    return JudgeResult(judge.model_id, prompts)


def judge_summary(model: str, metrics: Mapping[str, float]) -> str:
    """One line for logs and the CLI."""
    unparseable = int(metrics.get("judge_unparseable", 0))
    if "judge_win_rate" not in metrics:
        return f"judge {model}: no verdict could be parsed ({unparseable} unparseable)"
    text = (
        f"judge {model}: trained win rate {metrics['judge_win_rate']:.3f} (95% CI "
        f"{metrics['judge_win_rate_ci_low']:.3f}-{metrics['judge_win_rate_ci_high']:.3f}; wins "
        f"{metrics['judge_wins']:.2f}, ties {metrics['judge_ties']:.2f}, "
        f"losses {metrics['judge_losses']:.2f}) "
        f"over {int(metrics['judge_scored'])} prompts"
    )
    if "judge_consistency" in metrics:
        text += f"; consistency across orders {metrics['judge_consistency']:.2f}"
    return text + f"; {unparseable} unparseable verdicts"
