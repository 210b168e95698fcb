"""Reward functions: how a reply to a problem is checked against its answer, bounded so that a check that
raises or hangs scores 0 (with the error recorded) instead of crashing the run.

tinker-cookbook's ``ProblemEnv`` splits a reply's reward into *correct* (the answer checks out) and
*format* (the reply ended with the stop token and, for boxed answers, has a ``\\boxed{}``); the reward is
``correct + format_coef * (format - 1)``. Built-in checks:

- ``integer``: the last integer in the reply (commas removed) equals the answer (the cookbook's arithmetic
  environment; its format check is only the stop token).
- ``boxed``: the last ``\\boxed{...}`` equals the answer after light normalisation (spaces, ``$``,
  ``\\left``/``\\right``, ``\\dfrac``), or numerically when both are numbers; format needs a ``\\boxed{}``.
- ``math_verify``: Hugging Face's math-verify, ``verify(parse(gold), parse(reply))`` with the gold answer
  FIRST (it is not symmetric); format needs something it can parse.
- ``module:function``: ``function(reply, answer)`` returning a number or bool (correct, in [0, 1]) or a
  mapping / pair ``(correct, format)``.

``integer`` and ``boxed`` are linear-time string scans and run inline. ``math_verify`` and user functions
run in a worker process (this file run as a script, started once per run and again after a kill):
math-verify's own timeouts use ``signal.alarm``, which fails outside the main thread, so they are turned
off (``parsing_timeout=None``, ``timeout_seconds=None``) and every call is bounded from outside instead; a
call over ``timeout`` seconds kills the worker (a thread could only be abandoned, still burning a core),
scores 0 and is counted. This module imports only the standard library at load time, so the worker
starts in well under a second plus whatever the check itself imports.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import math
import os
import queue
import re
import subprocess
import sys
import threading
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import IO, Any

BUILTIN_REWARDS = ("integer", "boxed", "math_verify")


class RewardSpecError(ValueError):
    """``--reward`` names no built-in check and no importable ``module:function``."""


class GoldAnswerError(ValueError):
    """A problem's reference answer that the reward function cannot check against; ``reason`` is the
    key it is counted under when the row is skipped."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Check:
    """One reply checked: ``correct`` in [0, 1], ``format`` whether the reply's content has the expected
    form (the stop-token half of the cookbook's format is the caller's), ``error`` when the check failed."""

    correct: float
    format: float
    error: str | None = None
    extracted: str | None = None
    """What the check read as the reply's answer (for the rollout tables)."""


# -- answer extraction -----------------------------------------------------------------------------

_INTEGER = re.compile(r"-?\d+")
_GSM8K_FINAL = re.compile(r"####\s*(.+)")


def last_integer(text: str) -> int | None:
    """The last integer in ``text``, commas removed first (tinker-cookbook's ``_extract_final_int``)."""
    matches = _INTEGER.findall(text.replace(",", ""))
    return int(matches[-1]) if matches else None


def gsm8k_final_answer(text: str) -> str | None:
    """GSM8K's answer: what follows the last ``####``, commas removed (tinker-cookbook's
    ``extract_gsm8k_final_answer``); None when there is no ``####``."""
    for line in reversed(text.splitlines()):
        stripped = line.strip()
        if stripped.startswith("####"):
            content = stripped[4:].strip()
            return content.removeprefix(":").strip().replace(",", "").strip()
    matches = _GSM8K_FINAL.findall(text)
    return matches[-1].replace(",", "").strip() if matches else None


def last_boxed(text: str) -> str | None:
    """The contents of the last ``\\boxed{...}`` (nested braces balanced), or ``\\boxed 2`` without
    braces; None when there is none (tinker-cookbook's ``extract_boxed``, returning None, not raising)."""
    found: list[str] = []
    stack: list[int] = []
    for i, char in enumerate(text):
        if char == "{":
            stack.append(i)
        elif char == "}" and stack:
            start = stack.pop()
            if text[:start].endswith("\\boxed"):
                found.append(text[start + 1 : i])
    if found:
        return found[-1]
    match = re.search(r"\\boxed\s+([a-zA-Z0-9]+)", text)
    return match.group(1) if match else None


_SPACES = re.compile(r"\s+")
_WHOLE_INTEGER = re.compile(r"\+?(-?\d+)(?:\.0*)?")


def normalize_math(text: str) -> str:
    """Light normalisation for string comparison of short math answers."""
    text = text.strip().strip("$").strip()
    for old, new in (
        ("\\left", ""),
        ("\\right", ""),
        ("\\dfrac", "\\frac"),
        ("\\tfrac", "\\frac"),
        ("\\!", ""),
    ):
        text = text.replace(old, new)
    text = _SPACES.sub("", text).rstrip(".")
    if text.startswith("\\text{") and text.endswith("}"):
        text = text[6:-1]
    return text


def _number(text: str) -> float | None:
    try:
        value = float(text.replace(",", ""))
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def answers_match(given: str, gold: str) -> bool:
    a, b = normalize_math(given), normalize_math(gold)
    if a == b:
        return True
    x, y = _number(a), _number(b)
    return x is not None and y is not None and abs(x - y) <= 1e-6 * max(1.0, abs(y))


# -- the checks ------------------------------------------------------------------------------------


def check_integer(reply: str, answer: str) -> Check:
    value = last_integer(reply)
    gold = last_integer(answer)
    return Check(
        correct=float(value is not None and value == gold),
        format=1.0,
        extracted=None if value is None else str(value),
    )


def check_boxed(reply: str, answer: str) -> Check:
    boxed = last_boxed(reply)
    if boxed is None:
        return Check(correct=0.0, format=0.0)
    return Check(correct=float(answers_match(boxed, answer)), format=1.0, extracted=boxed)


def _quiet_math_verify() -> None:
    # It warns on every call that its timeouts are off; bounding calls is this module's job.
    for name in ("math_verify", "math_verify.parser", "math_verify.grader", "latex2sympy2_extended"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _math_verify_gold(answer: str) -> Any:
    from math_verify import parse

    text = answer.strip()
    if not (text.startswith("$") or text.startswith("\\(") or "\\boxed" in text):
        text = f"${text}$"  # as tinker-cookbook's grade_answer_math_verify does, so LaTeX parses
    return parse(text, parsing_timeout=None)


def check_math_verify(reply: str, answer: str) -> Check:
    from math_verify import parse, verify

    gold = _math_verify_gold(answer)
    given = parse(reply, parsing_timeout=None)
    if not _parsed(given):
        return Check(correct=0.0, format=0.0)
    correct = verify(gold, given, timeout_seconds=None)  # gold FIRST
    return Check(correct=float(bool(correct)), format=1.0, extracted=str(given[-1]))


def _parsed(result: Sequence[Any]) -> bool:
    """math-verify's ``parse`` found a mathematical object (not just the fallback string it matched)."""
    return any(not isinstance(item, str) for item in result)


def check_gold_math_verify(answer: str) -> bool:
    """Whether math-verify can parse ``answer`` at all (rows whose answer it cannot are skipped)."""
    return _parsed(_math_verify_gold(answer))


def coerce_check(value: Any) -> Check:
    """A user function's return value as a ``Check``: a number or bool (correct), a pair (correct,
    format) or a mapping with ``correct`` and optional ``format``."""
    if hasattr(value, "correct") and hasattr(value, "format"):  # a Check (from either import path)
        value = {"correct": value.correct, "format": value.format}
    fmt: Any = 1.0
    if isinstance(value, Mapping):
        if "correct" not in value:
            raise TypeError(f"reward mapping needs a 'correct' key, got keys {sorted(value)}")
        correct, fmt = value["correct"], value.get("format", 1.0)
    elif isinstance(value, tuple) and len(value) == 2:
        correct, fmt = value
    else:
        correct = value
    out = []
    for name, item in (("correct", correct), ("format", fmt)):
        try:
            number = float(item)
        except (TypeError, ValueError):
            number = math.nan
        if isinstance(item, str) or not math.isfinite(number):
            raise TypeError(f"reward {name} must be a finite number or bool, got {item!r}")
        out.append(min(max(number, 0.0), 1.0))
    return Check(correct=out[0], format=out[1])


BUILTIN_CHECKS: dict[str, Callable[[str, str], Check]] = {
    "integer": check_integer,
    "boxed": check_boxed,
    "math_verify": check_math_verify,
}


def load_user_function(spec: str) -> Callable[..., Any]:
    """``module:function`` imported, or ``RewardSpecError`` saying what is wrong with it."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise RewardSpecError(
            f"unknown reward {spec!r}: use one of {', '.join(BUILTIN_REWARDS)} or module:function"
        )
    try:
        module = importlib.import_module(module_name)
    except Exception as err:
        raise RewardSpecError(
            f"reward {spec!r}: cannot import module {module_name!r} ({type(err).__name__}: {err})"
        ) from err
    fn: Any = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise RewardSpecError(f"reward {spec!r}: module {module_name!r} has no attribute {attr!r}")
    if not callable(fn):
        raise RewardSpecError(f"reward {spec!r}: {attr!r} is not callable")
    return fn


def validate_reward(spec: str) -> str:
    """The spec, checked at launch: a built-in name, or a ``module:function`` that imports."""
    spec = spec.strip()
    if spec in BUILTIN_REWARDS:
        if spec == "math_verify":
            try:
                importlib.import_module("math_verify")
            except ImportError as err:
                raise RewardSpecError(
                    "reward 'math_verify' needs the math-verify package (pip install math-verify==0.9.0)"
                ) from err
        return spec
    load_user_function(spec)
    return spec


def check_gold(spec: str, answer: str) -> str:
    """The reference answer a row keeps, or ``GoldAnswerError`` (the row is skipped and counted):
    ``integer`` needs an integer, ``math_verify`` something math-verify parses; any answer that is not
    empty suits ``boxed`` and user functions."""
    answer = answer.strip()
    if not answer:
        raise GoldAnswerError("empty_answer")
    if spec == "integer":
        match = _WHOLE_INTEGER.fullmatch(normalize_math(answer).replace(",", ""))
        if match is None:
            raise GoldAnswerError("answer_not_an_integer")
        return str(int(match.group(1)))
    return answer


def digit_share(reply: str, answer: str) -> float:
    """A dense toy reward, the share of the reply's characters that are digits (the answer is ignored):
    a random tiny model climbs it within a few steps, which the real checks cannot show, so smoke runs
    (``smoke_run_config``) exercise learning, the gate and registration. ``--reward
    kitchen.workflows.rl.rewards:digit_share``."""
    text = reply.strip()
    return sum(c.isdigit() for c in text) / len(text) if text else 0.0


# -- running checks, bounded -----------------------------------------------------------------------

_THIS_MODULE = "kitchen.workflows.rl.rewards"
#: How long a freshly started worker may take to import its check (math-verify pulls in sympy).
WORKER_START_TIMEOUT = 120.0


def _serve(spec: str) -> None:
    """The worker's loop: one JSON request per line on stdin, one JSON answer per line on stdout."""
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # whatever the check prints goes to stderr, never into the protocol
    _quiet_math_verify()
    if spec.partition(":")[0] == _THIS_MODULE:  # a check defined here: no need to import the package
        sys.modules.setdefault(_THIS_MODULE, sys.modules[__name__])
    if spec in BUILTIN_CHECKS:
        check = BUILTIN_CHECKS[spec]
    else:
        user = load_user_function(spec)

        def check(reply: str, answer: str) -> Check:
            return coerce_check(user(reply, answer))

    if spec == "math_verify":  # import and warm up sympy now, so the first timed check is not slowed
        check_gold_math_verify("1")
        check_math_verify("1", "1")
    protocol.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        op, *args = json.loads(line)
        try:
            if op == "check":
                answer: dict[str, Any] = asdict(check(*args))
            else:
                answer = {"ok": check_gold_math_verify(*args)}
        except Exception as err:
            answer = {"failed": f"{type(err).__name__}: {err}"}
        protocol.write(json.dumps(answer) + "\n")


class _Worker:
    """One worker process and a thread reading its answers into a queue (so a read can time out)."""

    def __init__(self, spec: str) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        self.process = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--serve", spec],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            text=True,
            bufsize=1,
        )
        self.answers: queue.Queue[str | None] = queue.Queue()
        assert self.process.stdout is not None
        threading.Thread(target=_pump, args=(self.process.stdout, self.answers), daemon=True).start()

    def ask(self, request: list[Any], timeout: float) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        return self.read(timeout)

    def read(self, timeout: float) -> dict[str, Any]:
        line = self.answers.get(timeout=timeout)  # queue.Empty on timeout
        if line is None:
            raise RuntimeError(f"the reward worker exited (code {self.process.wait()})")
        return json.loads(line)

    def kill(self) -> None:
        with contextlib.suppress(OSError):
            self.process.kill()
        self.process.wait()


def _pump(stream: IO[str], answers: queue.Queue[str | None]) -> None:
    for line in stream:
        answers.put(line)
    answers.put(None)


class RewardRunner:
    """Checks replies with one reward function; failures and timeouts become 0 with the error kept."""

    def __init__(self, spec: str, timeout: float = 5.0) -> None:
        spec = validate_reward(spec)
        if timeout <= 0:
            raise ValueError(f"reward timeout must be positive, got {timeout}")
        self.spec, self.timeout = spec, timeout
        self.inline = spec in ("integer", "boxed")
        self._worker: _Worker | None = None
        self._finalizer: weakref.finalize[Any, Any] | None = None
        self._lock = threading.Lock()
        self.errors = 0
        self.timeouts = 0

    def check(self, items: Sequence[tuple[str, str]]) -> list[Check]:
        """``(reply, answer)`` pairs checked in order."""
        if self.inline:
            return [self._inline(reply, answer) for reply, answer in items]
        with self._lock:
            return [self._remote(["check", reply, answer]) for reply, answer in items]

    def gold_ok(self, answers: Sequence[str]) -> list[bool]:
        """For ``math_verify``: which reference answers it can parse (bounded like the checks)."""
        if self.spec != "math_verify":
            return [True] * len(answers)
        with self._lock:
            return [self._remote(["gold", a]) is True for a in answers]

    def close(self) -> None:
        """Stop the worker process, if one was started (also done at garbage collection and exit)."""
        with self._lock:
            self._stop()

    def _inline(self, reply: str, answer: str) -> Check:
        try:
            return BUILTIN_CHECKS[self.spec](reply, answer)
        except Exception as err:
            self.errors += 1
            return Check(0.0, 0.0, error=f"{type(err).__name__}: {err}")

    def _start(self) -> _Worker:
        if self._worker is None:
            worker = _Worker(self.spec)
            self._finalizer = weakref.finalize(self, worker.kill)
            try:
                ready = worker.read(WORKER_START_TIMEOUT)
            except (queue.Empty, RuntimeError) as err:
                self._stop()
                raise RuntimeError(f"the reward worker for {self.spec!r} did not start: {err}") from err
            if not ready.get("ready"):
                self._stop()
                raise RuntimeError(f"the reward worker for {self.spec!r} did not start: {ready}")
            self._worker = worker
        return self._worker

    def _stop(self) -> None:
        if self._finalizer is not None:
            self._finalizer()  # kills the worker once
        self._worker = self._finalizer = None

    def _remote(self, request: list[Any]) -> Any:
        gold = request[0] == "gold"
        worker = self._start()
        try:
            answer = worker.ask(request, self.timeout)
        except queue.Empty:
            self.timeouts += 1
            self.errors += 1
            self._stop()  # killing the worker is the only way to stop a hung check
            return False if gold else Check(0.0, 0.0, error=f"timed out after {self.timeout:g}s")
        except (RuntimeError, OSError) as err:  # the worker died mid-call (os._exit, a crash)
            self.errors += 1
            self._stop()
            return False if gold else Check(0.0, 0.0, error=str(err))
        if "failed" in answer:
            self.errors += 1
            return False if gold else Check(0.0, 0.0, error=answer["failed"])
        return answer["ok"] if gold else Check(**answer)


if __name__ == "__main__" and sys.argv[1:2] == ["--serve"]:
    if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
        sys.path.pop(0)  # this package's directory must not shadow top-level modules (config, plan, ...)
    _serve(sys.argv[2])
