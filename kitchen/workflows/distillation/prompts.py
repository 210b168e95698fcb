"""Distillation's rows: prompts. Any chat schema Kitchen reads, plus prompt-only columns; only the prompt
side is used.

A row normalises to ``{"messages", "answer", "reply"}``: ``messages`` is the conversation up to and
including the last user turn (an optional system message first), ``answer`` a checkable reference when the
source has one (``answer`` column, GSM8K's ``#### n``), ``reply`` the assistant reply the source row
ended with, if any. The reply is never trained on or scored against (the teacher supplies the replies);
it is kept so that the rows that had one can be counted. A row with no user turn is skipped and counted
(``no_user_turn``); when no row is left, loading fails naming that reason, before any model is run.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from datasets import Features, List, Value

from kitchen.data.formats import RowFormat
from kitchen.data.schemas import (
    SCHEMAS,
    NormalizedRow,
    NormalizeResult,
    RowSkipped,
    describe_schemas,
    detect_schema,
    normalize_row,
    normalize_rows,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

PROMPT_FEATURES = Features(
    {
        "messages": List({"role": Value("string"), "content": Value("string")}),
        "answer": Value("string"),
        "reply": Value("string"),
    }
)

#: Prompt-only schemas (no reply column): name -> (the prompt column, the chat schema it completes, and
#: that schema's reply column, filled with a placeholder so the chat normaliser validates the prompt).
PROMPT_ONLY_SCHEMAS: dict[str, tuple[str, str, str]] = {
    "prompt": ("prompt", "prompt/completion", "completion"),
    "instruction": ("instruction", "instruction/output", "output"),
    "question": ("question", "question/answer", "answer"),
    "input": ("input", "input/output", "output"),
}
_PLACEHOLDER = "\0kitchen-placeholder-reply\0"
_USER_ROLES = frozenset({"user", "human"})


#: Accepted schemas in detection order: the chat ones first (a reply column is then ignored), then the
#: prompt-only ones.
PROMPT_SCHEMAS: dict[str, tuple[str, ...]] = {
    **SCHEMAS,
    **{name: (column,) for name, (column, _, _) in PROMPT_ONLY_SCHEMAS.items()},
}


def describe_prompt_schemas() -> str:
    return f"{describe_schemas(PROMPT_SCHEMAS)} (messages/conversations may end on a user turn)"


def detect_prompt_schema(columns: Iterable[str]) -> str:
    """A chat schema whose columns are all present (its reply is then ignored), else a prompt-only one."""
    return detect_schema(columns, PROMPT_SCHEMAS)


def normalize_prompt_rows(rows: Iterable[Mapping[str, Any]], schema: str) -> NormalizeResult:
    return normalize_rows(rows, schema, normalize=normalize_prompt_row)


def normalize_prompt_row(row: Mapping[str, Any], schema: str) -> NormalizedRow:
    """One source row as a prompt; ``RowSkipped`` (counted by reason) for rows with no usable prompt.

    The chat normaliser (``kitchen.data.schemas.normalize_row``) does the validation: a prompt-only row is
    completed with a placeholder reply first, so every schema is read by the same rules."""
    full = dict(row)
    chat_schema = schema
    if schema in PROMPT_ONLY_SCHEMAS:
        _, chat_schema, reply_column = PROMPT_ONLY_SCHEMAS[schema]
        full[reply_column] = _PLACEHOLDER
    elif schema in ("messages", "conversations"):
        turns = full.get(schema)
        if isinstance(turns, list) and turns and all(isinstance(m, Mapping) for m in turns):
            role_key = "from" if schema == "conversations" else "role"
            roles = [str(m.get(role_key, m.get("role", ""))).lower() for m in turns]
            if not _USER_ROLES.intersection(roles):
                raise RowSkipped("no_user_turn")
            if roles[-1] in _USER_ROLES:  # a prompt with no reply yet
                content_key = "content" if role_key == "role" else "value"
                full[schema] = [*turns, {role_key: "assistant", content_key: _PLACEHOLDER}]
    normalized = normalize_row(full, chat_schema)
    messages = list(normalized["messages"])
    last = messages.pop()  # the final assistant turn (the normaliser guarantees one)
    if not any(m["role"] == "user" for m in messages):
        raise RowSkipped("no_user_turn")
    reply = None if _PLACEHOLDER in last["content"] else last["content"]
    answer = normalized["answer"]
    if schema in PROMPT_ONLY_SCHEMAS:  # the placeholder is no reference; a real answer column is
        value = row.get("answer")
        answer = str(value).strip() if value is not None and str(value).strip() else None
    return {"messages": messages, "answer": answer, "reply": reply}


def _preview(row: Mapping[str, Any]) -> dict[str, str]:
    turns = " / ".join(f"{m['role']}: {m['content']}" for m in row["messages"])
    return {
        "prompt": turns,
        "answer": str(row.get("answer") or ""),
        "reply (ignored)": str(row.get("reply") or ""),
    }


#: Prompts for distillation: the teacher answers them (off-policy) or the student does (on-policy).
PROMPTS = RowFormat(
    name="prompts",
    schemas=PROMPT_SCHEMAS,
    normalize_row=normalize_prompt_row,
    features=PROMPT_FEATURES,
    preview=_preview,
)


def count_replies(rows: Iterable[Mapping[str, Any]]) -> int:
    """How many prompts came with a reply (which distillation ignores)."""
    return sum(1 for row in rows if row.get("reply"))


def render_prompt(messages: Sequence[Mapping[str, str]], tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The prompt's tokens as the model sees them before replying: its chat template with the generation
    prompt, tokenised as datum rendering does (the template writes the special tokens)."""
    text = tokenizer.apply_chat_template(
        [dict(m) for m in messages], tokenize=False, add_generation_prompt=True
    )
    if not isinstance(text, str):
        raise TypeError(f"apply_chat_template returned {type(text).__name__}, expected text")
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
