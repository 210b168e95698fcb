"""Row schemas people publish chat/SFT data in, normalised to one shape: ``{"messages", "answer"}``.

Everything downstream (datum rendering, evaluation) reads only ``messages`` (a list of ``{"role",
"content"}`` dicts: an optional leading system message, then user/assistant turns alternating,
ending with an assistant turn) and ``answer`` (a short checkable reference, or None). Rows that do
not fit are skipped and counted by reason rather than silently rendered into garbage.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from datasets import Features, List, Value

Message = dict[str, str]
NormalizedRow = dict[str, Any]

#: Arrow schema of every normalised split, so empty ``answer`` columns still type as string.
NORMALIZED_FEATURES = Features(
    {
        "messages": List({"role": Value("string"), "content": Value("string")}),
        "answer": Value("string"),
    }
)

#: Recognised schemas, in detection order: name -> columns that must all be present.
SCHEMAS: dict[str, tuple[str, ...]] = {
    "messages": ("messages",),
    "conversations": ("conversations",),
    "prompt/completion": ("prompt", "completion"),
    "instruction/response": ("instruction", "response"),
    "instruction/output": ("instruction", "output"),
    "input/output": ("input", "output"),
    "question/answer": ("question", "answer"),
}

_ROLES = {"system", "user", "assistant"}
#: ShareGPT ``from`` values and their chat roles.
_SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
}
_GSM8K_FINAL = re.compile(r"####\s*(.+?)\s*$", re.DOTALL)


class SchemaError(ValueError):
    """The dataset's columns match no accepted schema, or no row survived normalisation."""


class RowSkipped(ValueError):
    """A row that cannot be used; ``reason`` is the key it is counted under."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def describe_schemas(schemas: Mapping[str, tuple[str, ...]] | None = None) -> str:
    return "; ".join(f"{name} ({', '.join(cols)})" for name, cols in (schemas or SCHEMAS).items())


def detect_schema(columns: Iterable[str], schemas: Mapping[str, tuple[str, ...]] | None = None) -> str:
    """Name of the first accepted schema (of ``schemas``, default the chat ones) whose columns are all
    present, else a ``SchemaError``."""
    present = set(columns)
    for name, required in (schemas or SCHEMAS).items():
        if present.issuperset(required):
            return name
    raise SchemaError(
        f"No recognised row schema in columns {sorted(present)}: rename the columns to one of the "
        f"accepted schemas: {describe_schemas(schemas)}."
    )


#: How many skipped rows a result names by place (every skip is counted; these say where to look).
MAX_SKIPPED_EXAMPLES = 20


@dataclass
class NormalizeResult:
    rows: list[NormalizedRow]
    skipped: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    """``"<where>: <reason>"`` for the first skipped rows (``where`` from ``normalize_rows``' labels)."""


def normalize_rows(
    rows: Iterable[Mapping[str, Any]],
    schema: str,
    where: Sequence[str] | None = None,
    label: str = "row",
    *,
    normalize: Callable[[Mapping[str, Any], str], NormalizedRow] | None = None,
) -> NormalizeResult:
    """Normalise every row (with ``normalize``, default the chat ``normalize_row``), skipping (and
    counting by reason) those that are malformed or empty.

    ``where`` labels each row (``train.jsonl line 17``) for the examples; by default ``<label> <n>``."""
    convert = normalize or normalize_row
    result = NormalizeResult(rows=[])
    for index, row in enumerate(rows):
        try:
            result.rows.append(convert(row, schema))
        except RowSkipped as skip:
            result.skipped[skip.reason] += 1
            if len(result.examples) < MAX_SKIPPED_EXAMPLES:
                place = where[index] if where is not None else f"{label} {index + 1}"
                result.examples.append(f"{place}: {skip.reason}")
    return result


def normalize_row(row: Mapping[str, Any], schema: str) -> NormalizedRow:
    """Convert one row of ``schema`` to ``{"messages", "answer"}``; raises ``RowSkipped`` for bad rows."""
    answer: Any = None
    if schema == "messages":
        messages = message_list(row.get("messages"))
        answer = row.get("answer")
    elif schema == "conversations":
        messages = message_list(row.get("conversations"), role_key="from", content_key="value")
    elif schema == "prompt/completion":
        prompt, completion = row.get("prompt"), row.get("completion")
        messages = _turns(prompt, default_role="user") + _turns(completion, default_role="assistant")
        answer = row.get("answer")
    elif schema in ("instruction/response", "instruction/output"):
        instruction = message_text(row.get("instruction"), numbers=True)
        extra = row.get("input")
        if isinstance(extra, str) and extra.strip():  # Alpaca: the optional input follows the instruction
            instruction = f"{instruction}\n\n{extra.strip()}"
        response = row.get("response" if schema == "instruction/response" else "output")
        messages = [_msg("user", instruction), _msg("assistant", message_text(response, numbers=True))]
    elif schema == "input/output":
        prompt = message_text(row.get("input"), numbers=True)
        output = message_text(row.get("output"), numbers=True)
        messages = [_msg("user", prompt), _msg("assistant", output)]
    elif schema == "question/answer":
        reference = message_text(row.get("answer"), numbers=True)
        question = message_text(row.get("question"), numbers=True)
        messages = [_msg("user", question), _msg("assistant", reference)]
        final = _GSM8K_FINAL.search(reference)  # GSM8K-style "reasoning #### 42": check only the 42
        answer = final.group(1) if final else reference
    else:
        raise ValueError(f"Unknown schema {schema!r}; accepted: {describe_schemas()}")
    system = row.get("system")
    if isinstance(system, str) and system.strip() and messages[0]["role"] != "system":
        messages.insert(0, _msg("system", system))
    _check_order(messages)
    if answer is not None and not isinstance(answer, str):
        answer = str(answer)
    # JSON escapes can spell lone surrogates ("\ud800"), which no UTF-8 file or Arrow column can hold.
    for text in [m["content"] for m in messages] + ([answer] if answer else []):
        if not _encodable(text):
            raise RowSkipped("invalid_utf8")
    return {"messages": messages, "answer": answer.strip() if answer and answer.strip() else None}


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def message_text(value: Any, *, numbers: bool = False) -> str:
    """Message text; ``numbers`` accepts integers in flat columns (``"answer": 42`` in JSON)."""
    if numbers and isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if value is None:
        raise RowSkipped("missing_field")
    if isinstance(value, list) and all(isinstance(p, Mapping) for p in value):
        # OpenAI-style content parts: keep text parts only, anything else is not trainable text
        if not all(p.get("type", "text") == "text" and isinstance(p.get("text"), str) for p in value):
            raise RowSkipped("not_a_string")
        value = "".join(p["text"] for p in value)
    if not isinstance(value, str):
        raise RowSkipped("not_a_string")
    if not value.strip():
        raise RowSkipped("empty_content")
    return value


def _msg(role: str, content: str) -> Message:
    return {"role": role, "content": content}


def message_list(
    value: Any,
    *,
    role_key: str = "role",
    content_key: str = "content",
    text: Callable[[Any], str] = message_text,
) -> list[Message]:
    """A list of chat messages normalised to ``{"role", "content"}`` (ShareGPT's ``from``/``value`` and
    its role names when ``role_key`` is ``"from"``), each content through ``text``; ``RowSkipped`` naming
    what is wrong otherwise."""
    if value is None:
        raise RowSkipped("missing_field")
    if not isinstance(value, list) or not all(isinstance(m, Mapping) for m in value):
        raise RowSkipped("not_a_message_list")
    if not value:
        raise RowSkipped("empty_content")
    messages = []
    for m in value:
        raw_role = m.get(role_key, m.get("role"))
        role = _SHAREGPT_ROLES.get(str(raw_role).lower()) if role_key == "from" else raw_role
        if role not in _ROLES:
            raise RowSkipped("unknown_role")
        messages.append(_msg(role, text(m.get(content_key, m.get("content")))))
    return messages


def _turns(value: Any, *, default_role: str) -> list[Message]:
    """A TRL prompt/completion field: either plain text or a list of messages."""
    if isinstance(value, list) and value and all(isinstance(m, Mapping) and "role" in m for m in value):
        return message_list(value)
    return [_msg(default_role, message_text(value, numbers=True))]


def _check_order(messages: list[Message]) -> None:
    """Optional system first, then user/assistant alternating from user, ending on assistant."""
    turns = messages[1:] if messages and messages[0]["role"] == "system" else messages
    if not any(m["role"] == "assistant" for m in turns):
        raise RowSkipped("no_assistant_turn")
    for i, m in enumerate(turns):
        if m["role"] != ("user" if i % 2 == 0 else "assistant"):
            raise RowSkipped("bad_role_order")
    if turns[-1]["role"] != "assistant":
        raise RowSkipped("no_final_assistant_turn")
