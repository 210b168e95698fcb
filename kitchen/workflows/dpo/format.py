"""Preference rows in the schemas people publish them in, normalised to one shape: ``{"prompt", "chosen",
"rejected", "answer"}``.

``prompt`` is the conversation before the reply (``{"role", "content"}`` messages: an optional system
message, then user/assistant turns alternating, ending on a user turn); ``chosen`` and ``rejected`` are
the two assistant replies to it; ``answer`` is a short checkable reference when the source has one (the
built-in arithmetic pairs), else None.

Accepted sources (detected by their columns):

- ``prompt``/``chosen``/``rejected``: ``prompt`` a string or a message list; ``chosen``/``rejected``
  reply strings, reply message lists (TRL's conversational form), or whole conversations whose shared
  beginning is the prompt (UltraFeedback-binarized's ``[user, assistant]`` lists). A prompt string in
  Anthropic's transcript form is parsed as one.
- ``chosen``/``rejected`` only: Anthropic hh-rlhf transcripts (``\\n\\nHuman: ...\\n\\nAssistant: ...``)
  or conversations; the turns the two sides share are the prompt, each side's last turn its reply.

A row that cannot be a pair is skipped and counted by reason: a side missing (``missing_field``) or empty
(``empty_content``), the same reply on both sides (``identical_pair``), no assistant turn
(``no_assistant_turn``), the two sides disagreeing before their last turn (``prompt_mismatch``), no prompt
(``no_prompt``), a conversation out of order (``bad_role_order``), and so on.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from datasets import Features, List, Value

from kitchen.data.formats import TEST_SPLIT_NAMES, RowFormat
from kitchen.data.schemas import (
    NormalizedRow,
    RowSkipped,
    describe_schemas,
    message_list,
    message_text,
    normalize_row,
)

Message = dict[str, str]

#: Arrow schema of every normalised split.
PREFERENCE_FEATURES = Features(
    {
        "prompt": List({"role": Value("string"), "content": Value("string")}),
        "chosen": Value("string"),
        "rejected": Value("string"),
        "answer": Value("string"),
    }
)

#: Recognised schemas, in detection order: name -> columns that must all be present.
PREFERENCE_SCHEMAS: dict[str, tuple[str, ...]] = {
    "prompt/chosen/rejected": ("prompt", "chosen", "rejected"),
    "chosen/rejected": ("chosen", "rejected"),
}

# Anthropic's transcripts: "\n\nHuman: ...\n\nAssistant: ..." (the first marker may open the text).
_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):[ \t]?")
_TRANSCRIPT_ROLES = {"Human": "user", "Assistant": "assistant"}


def normalize_preference(row: Mapping[str, Any], schema: str) -> NormalizedRow:
    """One source row as ``{"prompt", "chosen", "rejected", "answer"}``; ``RowSkipped`` if it is no pair."""
    if schema not in PREFERENCE_SCHEMAS:
        raise ValueError(
            f"unknown preference schema {schema!r}; accepted: {describe_schemas(PREFERENCE_SCHEMAS)}"
        )
    explicit = _prompt(row.get("prompt")) if schema == "prompt/chosen/rejected" else None
    chosen = _conversation(row.get("chosen"), explicit)
    rejected = _conversation(row.get("rejected"), explicit)
    prompt, chosen_reply, rejected_reply = _split_pair(chosen, rejected)
    system = row.get("system")
    if isinstance(system, str) and system.strip() and (not prompt or prompt[0]["role"] != "system"):
        prompt.insert(0, {"role": "system", "content": system})
    # The prompt and each reply must read as one valid conversation (order, roles, non-empty turns).
    for reply in (chosen_reply, rejected_reply):
        normalize_row({"messages": [*prompt, {"role": "assistant", "content": reply}]}, "messages")
    answer = row.get("answer")
    if answer is not None and not isinstance(answer, str):
        answer = str(answer)
    return {
        "prompt": prompt,
        "chosen": chosen_reply,
        "rejected": rejected_reply,
        "answer": answer.strip() if answer and answer.strip() else None,
    }


def _split_pair(chosen: list[Message], rejected: list[Message]) -> tuple[list[Message], str, str]:
    """(prompt, chosen reply, rejected reply): the turns both sides share, then one assistant turn each."""
    for side in (chosen, rejected):
        if not any(m["role"] == "assistant" for m in side):
            raise RowSkipped("no_assistant_turn")
    if chosen == rejected:
        raise RowSkipped("identical_pair")
    for side in (chosen, rejected):
        if side[-1]["role"] != "assistant":
            raise RowSkipped("no_final_assistant_turn")
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if len(chosen) != shared + 1 or len(rejected) != shared + 1:
        raise RowSkipped("prompt_mismatch")
    prompt = [dict(m) for m in chosen[:shared]]
    if not any(m["role"] == "user" for m in prompt):
        raise RowSkipped("no_prompt")
    chosen_reply, rejected_reply = chosen[-1]["content"], rejected[-1]["content"]
    if chosen_reply.strip() == rejected_reply.strip():
        raise RowSkipped("identical_pair")
    return prompt, chosen_reply, rejected_reply


def _prompt(value: Any) -> list[Message]:
    """An explicit prompt column: text (a transcript if it has Human:/Assistant: turns) or messages."""
    if isinstance(value, str):
        if _TURN.search(value):
            turns = _transcript(value)
            if turns and turns[-1]["role"] == "assistant" and not turns[-1]["content"]:
                turns = turns[:-1]  # "...\n\nAssistant:" announcing the reply to come
            return [_checked(t) for t in turns]
        return [{"role": "user", "content": _text(value)}]
    return _messages(value)


def _conversation(value: Any, prompt: list[Message] | None) -> list[Message]:
    """One side as a whole conversation: with an explicit ``prompt``, a reply (text or assistant messages)
    is appended to it; a side that has user turns of its own is a whole conversation already."""
    if value is None:
        raise RowSkipped("missing_field")
    if not isinstance(value, str | list):
        if prompt is None or not isinstance(value, int | float) or isinstance(value, bool):
            raise RowSkipped("not_a_string")
        value = str(value)  # a numeric reply ("chosen": 4)
    if isinstance(value, str):
        if prompt is None:
            if not _TURN.search(value):
                raise RowSkipped("no_assistant_turn")
            return [_checked(t) for t in _transcript(value)]
        return [*prompt, {"role": "assistant", "content": _text(value)}]
    messages = _messages(value)
    if prompt is None or any(m["role"] != "assistant" for m in messages):
        return messages
    return [*prompt, *messages]


def _transcript(text: str) -> list[Message]:
    """Anthropic's ``\\n\\nHuman: ...\\n\\nAssistant: ...`` text as turns (contents stripped)."""
    markers = list(_TURN.finditer(text))
    if not markers:
        return []
    if text[: markers[0].start()].strip():
        raise RowSkipped("bad_role_order")  # text before the first turn belongs to no one
    turns = []
    for marker, following in zip(markers, [*markers[1:], None], strict=True):
        end = following.start() if following is not None else len(text)
        turns.append(
            {
                "role": _TRANSCRIPT_ROLES[marker.group(1)],
                "content": text[marker.end() : end].strip(),
            }
        )
    return turns


def _checked(turn: Message) -> Message:
    if not turn["content"]:
        raise RowSkipped("empty_content")
    return turn


def _messages(value: Any) -> list[Message]:
    return message_list(value, text=_text)


def _text(value: Any) -> str:
    """Reply or prompt text as chat rows take it (``message_text``), numbers included: a bare ``42`` or
    ``2.5`` in a flat preference column is an answer, not a malformed row."""
    if isinstance(value, float):
        value = str(value)
    return message_text(value, numbers=True)


def _preview(row: Mapping[str, Any]) -> dict[str, str]:
    turns = " / ".join(f"{m['role']}: {m['content']}" for m in row["prompt"])
    return {
        "prompt": turns,
        "chosen": row["chosen"],
        "rejected": row["rejected"],
        "answer": str(row.get("answer") or ""),
    }


#: Preference pairs; UltraFeedback-binarized's ``train_prefs``/``test_prefs`` splits are found by name.
PREFERENCE = RowFormat(
    name="preference",
    schemas=PREFERENCE_SCHEMAS,
    normalize_row=normalize_preference,
    features=PREFERENCE_FEATURES,
    preview=_preview,
    train_splits=("train_prefs", "train"),
    test_splits=("test_prefs", *TEST_SPLIT_NAMES),
)
