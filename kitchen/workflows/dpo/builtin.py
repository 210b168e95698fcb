"""``kitchen/arithmetic-preferences``: the built-in arithmetic problems, each with its correct answer as the
chosen reply and a plausible wrong one (a slip a person makes) as the rejected reply.

The chosen reply is what the system prompt asks for, the bare number. The rejected one is a wrong number
written the way chat models write answers: bare (``77``), worked (``56 + 22 = 77``) or in a sentence
(``The answer is 77.``), a third each. So the pairs prefer the right number *and* the asked-for form, as
real preference data mixes correctness with instruction following; with bare wrong numbers alone, DPO
from a model that answers in prose learns which digits are right but never to lead with them (measured:
held-out preference accuracy 0.81, exact match still 0).

The problems are exactly ``kitchen/arithmetic``'s for the same seed and sizes (the test split is the same
200 problems, drawn first), so a DPO run and a supervised run are scored on the same held-out problems,
and DPO can start from a supervised champion trained on that dataset without seeing its test problems.
The wrong answer is drawn per problem from a seeded stream of its own, so it does not depend on how many
problems are generated.
"""

from __future__ import annotations

import random
import re

from datasets import Features, List, Value

from kitchen.data.builtin import ARITHMETIC_FEWSHOT, arithmetic, register_builtin
from kitchen.data.schemas import NormalizedRow

NAME = "kitchen/arithmetic-preferences"
TRAIN_SIZE = 256
TEST_SIZE = 200

#: What the generator writes: the ``prompt/chosen/rejected`` schema the preference format accepts.
SOURCE_FEATURES = Features(
    {
        "prompt": List({"role": Value("string"), "content": Value("string")}),
        "chosen": Value("string"),
        "rejected": Value("string"),
        "answer": Value("string"),
    }
)
_EXPRESSION = re.compile(r"(\d+) ([+*-]) (\d+)")
#: How a wrong answer is written: bare, worked, or in a sentence.
REJECTED_FORMS = ("{wrong}", "{expression} = {wrong}", "The answer is {wrong}.")


def _fewshot_turns() -> list[dict[str, str]]:
    return [
        {"role": role, "content": text}
        for question, answer in ARITHMETIC_FEWSHOT
        for role, text in (("user", question), ("assistant", answer))
    ]


def _digits_without_carry(a: int, b: int, op: str) -> int:
    """Column by column, forgetting the carry (``+``) or subtracting the smaller digit from the larger
    (``-``): 48 + 27 -> 65, 52 - 27 -> 35."""
    result, place = 0, 1
    while a or b:
        x, y = a % 10, b % 10
        digit = (x + y) % 10 if op == "+" else abs(x - y)
        result += digit * place
        a, b, place = a // 10, b // 10, place * 10
    return result


def wrong_answers(a: int, op: str, b: int) -> list[int]:
    """Plausible wrong answers to ``a op b``: off by one or ten, a dropped carry or borrow, a misread
    operator, swapped digits, a slip in the times table; never the right one or a negative number."""
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    candidates = {value - 1, value + 1, value - 10, value + 10}
    if op in "+-":
        candidates.add(_digits_without_carry(a, b, op))
        candidates.add(a - b if op == "+" else a + b)
    else:
        candidates |= {value - a, value + a, (a // 10) * b * 10 + (a % 10) * b % 10}
    candidates |= {a, b}  # a number copied from the question
    text = str(value)
    if len(text) > 1 and text[-1] != text[-2]:
        candidates.add(int(text[:-2] + text[-1] + text[-2]))
    return sorted(c for c in candidates if c >= 0 and c != value)


@register_builtin(
    NAME,
    description="kitchen/arithmetic's problems as preference pairs: the correct number (chosen) against a "
    "plausible wrong one (rejected).",
    train_size=TRAIN_SIZE,
    test_size=TEST_SIZE,
    aliases=("arithmetic-preferences",),
    features=SOURCE_FEATURES,
)
def arithmetic_preferences(seed: int, train_size: int, test_size: int) -> dict[str, list[NormalizedRow]]:
    splits = arithmetic(seed, train_size, test_size)
    out: dict[str, list[NormalizedRow]] = {}
    for split, rows in splits.items():
        pairs = []
        for row in rows:
            system, user, reply = row["messages"]
            prompt = [system, *_fewshot_turns(), user]
            question = user["content"]
            match = _EXPRESSION.search(question)
            if match is None:  # the arithmetic generator's own format; a change there must show up here
                raise ValueError(f"cannot read the expression in {question!r}")
            a, op, b = int(match.group(1)), match.group(2), int(match.group(3))
            rng = random.Random(f"{NAME}:{seed}:{match.group(0)}")
            wrong = rng.choice(wrong_answers(a, op, b))
            form = rng.choice(REJECTED_FORMS)
            pairs.append(
                {
                    "prompt": prompt,
                    "chosen": reply["content"],
                    "rejected": form.format(wrong=wrong, expression=match.group(0)),
                    "answer": row["answer"],
                }
            )
        out[split] = pairs
    return out


TERSE_NAME = "kitchen/terse-preferences"


@register_builtin(
    TERSE_NAME,
    description="kitchen/arithmetic's problems as a style preference: the bare number (chosen) against the "
    "same number wrapped in chatter (rejected); a tiny model learns it in a few steps (the smoke config).",
    train_size=256,
    test_size=64,
    aliases=("terse-preferences",),
    features=SOURCE_FEATURES,
)
def terse_preferences(seed: int, train_size: int, test_size: int) -> dict[str, list[NormalizedRow]]:
    out: dict[str, list[NormalizedRow]] = {}
    for split, rows in arithmetic(seed, train_size, test_size).items():
        pairs = []
        for row in rows:
            *prompt, reply = row["messages"]
            answer = reply["content"]
            pairs.append(
                {
                    "prompt": prompt,
                    "chosen": answer,
                    "rejected": f"Let me think about this step by step. I believe the answer is {answer}.",
                    "answer": row["answer"],
                }
            )
        out[split] = pairs
    return out
