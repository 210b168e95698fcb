"""Problems with a checkable answer: the RL workflow's rows, and its built-in environment.

A normalised problem is a chat row (``kitchen.data.schemas``' shape): ``messages`` = the prompt the
policy sees (an optional system message, the optional few-shot example, the question) followed by one
assistant turn holding the reference solution, and ``answer`` = the reference answer the reward function
checks replies against. The prompt is built here, once, so the dataset asset shows exactly what the policy
is asked, and training and evaluation render the same prompt (``kitchen.data.prompt_and_answer``).

Accepted source schemas, by columns (first match wins):

- ``messages`` (+ ``answer``): a conversation; the prompt is everything before its last assistant turn,
  the answer the ``answer`` column, else read from that turn (GSM8K's ``####``, else ``\\boxed{}``, else
  the whole turn);
- ``question``/``answer``: GSM8K when the answer has ``####`` (what follows the last one, commas
  removed), else the answer as it is;
- ``prompt``/``answer`` (plain, or a prompt given as messages), ``problem``/``answer`` (MATH-500);
- ``problem``/``solution``: Hendrycks MATH, the answer being the solution's last ``\\boxed{}``.

A row whose answer cannot be extracted, or that the chosen reward function cannot check (``integer``
needs an integer, ``math_verify`` something it parses), is skipped and counted by reason.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from kitchen.data.builtin import ARITHMETIC_FEWSHOT, register_builtin
from kitchen.data.formats import RowFormat
from kitchen.data.schemas import NORMALIZED_FEATURES, NormalizedRow, RowSkipped, describe_schemas
from kitchen.workflows.rl.rewards import (
    GoldAnswerError,
    RewardRunner,
    check_gold,
    gsm8k_final_answer,
    last_boxed,
)

#: Recognised problem schemas, in detection order: name -> columns that must all be present.
PROBLEM_SCHEMAS: dict[str, tuple[str, ...]] = {
    "messages": ("messages",),
    "question/answer": ("question", "answer"),
    "prompt/answer": ("prompt", "answer"),
    "problem/answer": ("problem", "answer"),
    "problem/solution": ("problem", "solution"),
}

#: tinker-cookbook's math few-shot prefix (``MathEnv.standard_fewshot_prefix``).
#: Arithmetic's (``ArithmeticEnv``) is ``kitchen.data.builtin.ARITHMETIC_FEWSHOT``.
BOXED_SUFFIX = " Write your answer in \\boxed{} format."
BOXED_FEWSHOT: tuple[tuple[str, str], ...] = (
    (
        "How many r's are in strawberry?" + BOXED_SUFFIX,
        "Let's spell the word out and number all the letters: 1) s 2) t 3) r 4) a 5) w 6) b 7) e 8) r "
        "9) r 10) y. We have r's at positions 3, 8, and 9. \\boxed{3}",
    ),
)


def describe_problem_schemas() -> str:
    return describe_schemas(PROBLEM_SCHEMAS)


def fewshot_for(reward: str) -> tuple[tuple[str, str], ...]:
    """The worked example in the answer format ``reward`` checks (none for a user function)."""
    if reward == "integer":
        return ARITHMETIC_FEWSHOT
    if reward in ("boxed", "math_verify"):
        return BOXED_FEWSHOT
    return ()


def suffix_for(reward: str) -> str:
    """The format instruction appended to each question (tinker-cookbook's math ``question_suffix``)."""
    return BOXED_SUFFIX if reward in ("boxed", "math_verify") else ""


class ProblemPrompt:
    """How a question becomes the prompt conversation: system message, few-shot turns, suffix."""

    def __init__(self, reward: str, *, fewshot: bool, format_instruction: bool, system_prompt: str | None):
        self.reward = reward
        self.fewshot = fewshot_for(reward) if fewshot else ()
        self.suffix = suffix_for(reward) if format_instruction else ""
        self.system_prompt = system_prompt.strip() if system_prompt and system_prompt.strip() else None

    def messages(self, question: str, system: str | None) -> list[dict[str, str]]:
        out: list[dict[str, str]] = []
        system = self.system_prompt or system
        if system:
            out.append({"role": "system", "content": system})
        for q, a in self.fewshot:
            out += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        out.append({"role": "user", "content": question.strip() + self.suffix})
        return out


def _text(value: Any) -> str:
    if isinstance(value, int | float) and not isinstance(value, bool):
        value = str(value)
    if value is None:
        raise RowSkipped("missing_field")
    if not isinstance(value, str):
        raise RowSkipped("not_a_string")
    if not value.strip():
        raise RowSkipped("empty_content")
    return value.strip()


def _answer_from_text(text: str) -> str:
    """A reference answer inside a worked solution: GSM8K's ``####``, else a ``\\boxed{}``, else all."""
    final = gsm8k_final_answer(text)
    if final is not None:
        return final
    boxed = last_boxed(text)
    return boxed if boxed is not None else text


def _question_and_system(value: Any) -> tuple[str, str | None]:
    """A prompt given as text, or as messages (TRL's conversational prompt: the last user turn asks)."""
    if isinstance(value, list) and value and all(isinstance(m, Mapping) for m in value):
        system = next((m.get("content") for m in value if m.get("role") == "system"), None)
        users = [m.get("content") for m in value if m.get("role") == "user"]
        if not users:
            raise RowSkipped("no_user_turn")
        return _text(users[-1]), system if isinstance(system, str) else None
    return _text(value), None


def problem_parts(row: Mapping[str, Any], schema: str) -> tuple[str, str | None, str, str]:
    """(question, system message, reference solution text, reference answer) of one source row."""
    system = row.get("system") if isinstance(row.get("system"), str) else None
    if schema == "messages":
        messages = row.get("messages")
        if not isinstance(messages, list) or not all(isinstance(m, Mapping) for m in messages):
            raise RowSkipped("not_a_message_list")
        last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
        before = messages[:last] if last is not None else messages
        question, system_in = _question_and_system(before)
        reference = _text(messages[last].get("content")) if last is not None else None
        answer = row.get("answer")
        if answer is None or (isinstance(answer, str) and not answer.strip()):
            if reference is None:
                raise RowSkipped("no_answer")
            answer = _answer_from_text(reference)
        answer = _text(answer)
        return question, system or system_in, reference or answer, answer
    if schema == "question/answer":
        question, reference = _text(row.get("question")), _text(row.get("answer"))
        return question, system, reference, _answer_from_text(reference) if "####" in reference else reference
    if schema in ("prompt/answer", "problem/answer"):
        question, system_in = _question_and_system(
            row.get("prompt" if schema == "prompt/answer" else "problem")
        )
        answer = _text(row.get("answer"))
        return question, system or system_in, answer, answer
    if schema == "problem/solution":
        question, solution = _text(row.get("problem")), _text(row.get("solution"))
        boxed = last_boxed(solution)
        if boxed is None or not boxed.strip():
            raise RowSkipped("no_boxed_answer")
        return question, system, solution, boxed.strip()
    raise ValueError(f"unknown problem schema {schema!r}; accepted: {describe_problem_schemas()}")


def normalize_problem(
    row: Mapping[str, Any], schema: str, prompt: ProblemPrompt, runner: RewardRunner | None
) -> NormalizedRow:
    """One source row as a prompt + reference + checkable answer; ``RowSkipped`` (counted by reason) when
    its answer cannot be extracted or checked (``runner``: math-verify must parse it)."""
    question, system, reference, answer = problem_parts(row, schema)
    try:
        answer = check_gold(prompt.reward, answer)
    except GoldAnswerError as bad:
        raise RowSkipped(bad.reason) from None
    if runner is not None and not runner.gold_ok([answer])[0]:
        raise RowSkipped("answer_unparseable")
    messages = [*prompt.messages(question, system), {"role": "assistant", "content": reference}]
    return {"messages": messages, "answer": answer}


def _preview(row: Mapping[str, Any]) -> dict[str, str]:
    prompt = [m for m in row["messages"][:-1]]
    return {
        "prompt": " / ".join(f"{m['role']}: {m['content']}" for m in prompt),
        "answer": str(row.get("answer") or ""),
    }


def problem_format(prompt: ProblemPrompt, runner: RewardRunner | None = None) -> RowFormat:
    """The row format of ``kitchen.data.load_dataset_source`` for problems prompted as ``prompt`` says
    (``runner`` checks that ``math_verify`` can parse each reference answer)."""
    return RowFormat(
        name="problems",
        schemas=PROBLEM_SCHEMAS,
        normalize_row=lambda row, schema: normalize_problem(row, schema, prompt, runner),
        features=NORMALIZED_FEATURES,
        preview=_preview,
    )


def prompt_question(row: Mapping[str, Any]) -> str:
    """The question of a normalised problem (its last user turn), for tables."""
    return next((m["content"] for m in reversed(row["messages"]) if m["role"] == "user"), "")


# -- the built-in environments --------------------------------------------------------------------

ADDITION = "kitchen/addition"
ADDITION_SMALL = "kitchen/addition-10"
ADDITION_TEST_SIZE = 200
ADDITION_TRAIN_SIZE = 4096
#: The embedded default: one pass over 48 problems is 6 steps of 8 groups, minutes on a 2-core CPU.
ADDITION_SMALL_TRAIN_SIZE = 48
ADDITION_SMALL_TEST_SIZE = 40


def addition_pair(rng: np.random.RandomState, high: int = 100) -> tuple[int, int]:
    """One problem as tinker-cookbook's ``ArithmeticDataset`` draws it: ``randint(0, high + 1)`` for x,
    then for y (the cookbook's ``high`` is 100)."""
    return int(rng.randint(0, high + 1)), int(rng.randint(0, high + 1))


def addition_problems(
    seed: int, train_size: int, test_size: int, high: int
) -> dict[str, list[NormalizedRow]]:
    """Seeded like the cookbook (``np.random.RandomState``). The test split is drawn first, from its own
    stream and distinct, so it is the same whatever ``train_size`` is; training problems are drawn i.i.d.
    as the cookbook does, minus the held-out ones."""
    space = (high + 1) ** 2
    if train_size < 0 or not 0 <= test_size <= space // 2:
        raise ValueError(
            f"addition up to {high}: train >= 0 and test in [0, {space // 2}] (got {train_size}, {test_size})"
        )
    test_rng = np.random.RandomState([seed, 1])
    test: list[tuple[int, int]] = []
    while len(test) < test_size:
        pair = addition_pair(test_rng, high)
        if pair not in test:
            test.append(pair)
    held_out = set(test)
    train_rng = np.random.RandomState([seed, 0])
    train: list[tuple[int, int]] = []
    while len(train) < train_size:
        pair = addition_pair(train_rng, high)
        if pair not in held_out:
            train.append(pair)

    def rows(pairs: Sequence[tuple[int, int]]) -> list[NormalizedRow]:
        return [
            {
                "messages": [
                    {"role": "user", "content": f"What is {x} + {y}?"},
                    {"role": "assistant", "content": str(x + y)},
                ],
                "answer": str(x + y),
            }
            for x, y in pairs
        ]

    return {"train": rows(train), "test": rows(test)}


@register_builtin(
    ADDITION,
    description="tinker-cookbook's arithmetic RL environment: 'What is x + y?', x and y uniform in "
    "[0, 100]; the answer is the sum.",
    train_size=ADDITION_TRAIN_SIZE,
    test_size=ADDITION_TEST_SIZE,
    aliases=("addition",),
)
def addition(seed: int, train_size: int, test_size: int) -> dict[str, list[NormalizedRow]]:
    return addition_problems(seed, train_size, test_size, high=100)


@register_builtin(
    ADDITION_SMALL,
    description="The same environment with x and y in [0, 10], within reach of a 135M model: 48 training "
    "problems (6 steps of 8 groups, the embedded default) and 40 held-out ones.",
    train_size=ADDITION_SMALL_TRAIN_SIZE,
    test_size=ADDITION_SMALL_TEST_SIZE,
    aliases=("addition-10",),
)
def addition_small(seed: int, train_size: int, test_size: int) -> dict[str, list[NormalizedRow]]:
    return addition_problems(seed, train_size, test_size, high=10)
