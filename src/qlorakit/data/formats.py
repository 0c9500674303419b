"""Row formats: detect which one a file uses, check every row, and normalise it.

| format              | fields in the file                                   | normalised row                   |
|---------------------|------------------------------------------------------|----------------------------------|
| `alpaca`            | instruction, output [, input]                        | {instruction, input, output}     |
| `chat`              | messages: [{role, content}] or ShareGPT              | {messages: [{role, content}]}    |
|                     | conversations: [{from, value}]                       |                                  |
| `prompt-completion` | prompt, completion — or question, answer             | {prompt, completion}             |
| `text`              | text                                                 | {text}                           |

Extra keys are ignored. A missing field or a wrong type is a :class:`DataError` naming file, line
and field: ``data/train.jsonl:4: field 'messages'[1].content must be a string, got int``.
"""

from __future__ import annotations

from qlorakit.data.errors import DataError
from qlorakit.data.read import Table

FORMATS = ("alpaca", "chat", "prompt-completion", "text")
DETECT_ROWS = 8  # rows whose keys must agree on the detected format
SHAREGPT_ROLES = {
    "system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
    "model": "assistant", "chatgpt": "assistant", "bing": "assistant", "tool": "tool", "function": "tool",
    "observation": "tool",
}


def detect_row_format(row: dict) -> str | None:
    """The format a single row's keys suggest, or None; chat wins over the others, then alpaca."""
    if "messages" in row or "conversations" in row:
        return "chat"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if ("prompt" in row and "completion" in row) or ("question" in row and "answer" in row):
        return "prompt-completion"
    if "text" in row:
        return "text"
    return None


def resolve_format(table: Table, format: str = "auto") -> str:
    """``format`` itself if given, else the format the first :data:`DETECT_ROWS` rows agree on."""
    if format != "auto":
        if format not in FORMATS:
            raise DataError(f"data.format: unknown format {format!r}; expected auto or one of {', '.join(FORMATS)}")
        return format
    found: dict[str, int] = {}  # format -> first row suggesting it
    for i in range(min(DETECT_ROWS, len(table))):
        fmt = detect_row_format(table.rows[i])
        if fmt is not None:  # an incomplete row is left to validation, which names its missing field
            found.setdefault(fmt, i)
    if not found:
        keys = ", ".join(repr(str(key)) for key in sorted(map(str, table.rows[0]))) or "none"
        raise DataError(
            f"{table.where(0)}: cannot tell the data format from the keys ({keys}); expected "
            "instruction+output, messages, conversations, prompt+completion, question+answer or text, "
            "or set data.format"
        )
    if len(found) > 1:
        (a, i), (b, j) = list(found.items())[:2]
        raise DataError(f"{table.where(j)}: row looks like {b} but {table.where(i)} looks like {a}; set data.format")
    return next(iter(found))


def validate_rows(table: Table, format: str) -> list[dict]:
    """Check every row of ``table`` against ``format`` and return the normalised rows (same order)."""
    check = {"alpaca": _alpaca, "chat": _chat, "prompt-completion": _prompt_completion, "text": _text}[format]
    return [check(row, table.where(i)) for i, row in enumerate(table.rows)]


def _type_name(value: object) -> str:
    return {dict: "object", type(None): "null"}.get(type(value), type(value).__name__)


def _string(row: dict, key: str, where: str, *, optional: bool = False) -> str:
    value = row.get(key)
    if value is None:
        if optional:
            return ""
        raise DataError(f"{where}: field {key!r} is missing" + ("" if key not in row else " (null)"))
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string, got {_type_name(value)}")
    return value


def _alpaca(row: dict, where: str) -> dict:
    return {
        "instruction": _string(row, "instruction", where),
        "input": _string(row, "input", where, optional=True),
        "output": _string(row, "output", where),
    }


def _prompt_completion(row: dict, where: str) -> dict:
    if "prompt" not in row and "completion" not in row and ("question" in row or "answer" in row):
        return {"prompt": _string(row, "question", where), "completion": _string(row, "answer", where)}
    return {"prompt": _string(row, "prompt", where), "completion": _string(row, "completion", where)}


def _text(row: dict, where: str) -> dict:
    return {"text": _string(row, "text", where)}


def _chat(row: dict, where: str) -> dict:
    """``messages`` with role/content, or ShareGPT ``conversations`` with from/value (human→user,
    gpt→assistant, ...); either key may use either style, told apart by the first message's keys."""
    key = "messages" if "messages" in row else "conversations"
    turns = row.get(key)
    if turns is None:
        raise DataError(f"{where}: field 'messages' is missing")
    if not isinstance(turns, list):
        raise DataError(f"{where}: field {key!r} must be a list of messages, got {_type_name(turns)}")
    if not turns:
        raise DataError(f"{where}: field {key!r} is an empty list")
    sharegpt = isinstance(turns[0], dict) and "from" in turns[0] and "role" not in turns[0]
    role_key, content_key = ("from", "value") if sharegpt else ("role", "content")
    messages = []
    for j, turn in enumerate(turns):
        at = f"{key!r}[{j}]"
        if not isinstance(turn, dict):
            raise DataError(f"{where}: field {at} must be an object with {role_key} and {content_key}, got {_type_name(turn)}")
        for k in (role_key, content_key):
            if turn.get(k) is None:
                raise DataError(f"{where}: field {at}.{k} is missing")
            if not isinstance(turn[k], str):
                raise DataError(f"{where}: field {at}.{k} must be a string, got {_type_name(turn[k])}")
        role = turn[role_key]
        if sharegpt:
            if role.lower() not in SHAREGPT_ROLES:
                known = ", ".join(sorted(SHAREGPT_ROLES))
                raise DataError(f"{where}: field {at}.from is {role!r}; expected one of {known}")
            role = SHAREGPT_ROLES[role.lower()]
        messages.append({"role": role, "content": turn[content_key]})
    return {"messages": messages}
