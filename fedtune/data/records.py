"""Turn one raw row, whatever its format, into a Record: plain text or a conversation.

Formats recognised by their field names: `text`; `messages` [{role, content}]; ShareGPT `conversations`
[{from, value}]; Alpaca `instruction` (+ `input`) and `output`; `prompt` and `completion` (or `response`);
an optional `system` prompt beside any conversation. Other names are read through a column mapping
(`data.columns`, `prepare --columns`). A row the reader cannot use becomes a Record with a `drop` reason
instead of an error, so one odd row costs one record and is counted in the data card.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from fedtune.errors import BadInput

UNKNOWN_ROLE = "unknown_role"
NO_KNOWN_FIELDS = "no_known_fields"

# Role names seen in the wild → the chat template's three roles (compared case-insensitively).
ROLES = {
    "user": "user", "human": "user",
    "assistant": "assistant", "bot": "assistant", "gpt": "assistant", "model": "assistant", "chatbot": "assistant",
    "system": "system",
}

# Each part of a record and the field names it goes by, first match wins. `question`/`answer` and the like
# are left to the column mapping: guessing among them would silently train on the wrong column.
FIELD_NAMES = {
    "messages": ("messages", "conversations"),
    "prompt": ("instruction", "prompt"),
    "input": ("input",),
    "response": ("output", "completion", "response"),
    "system": ("system",),
    "text": ("text",),
}
KNOWN_FIELDS = "text, messages, conversations, instruction/input/output, prompt/completion"


@dataclass
class Record:
    """One record: `text`, or `messages` [{role, content}] with roles user/assistant/system.

    Attributes:
        text: plain text, trained on entirely.
        messages: a conversation; only the assistant turns are trained on.
        drop: why the reader could not use the row (e.g. `unknown_role`); None for a usable record.
    """

    text: str | None = None
    messages: list[dict] | None = None
    drop: str | None = None

    def contents(self) -> list[str]:
        return [self.text] if self.text is not None else [m["content"] for m in self.messages or []]


def to_record(row: dict, columns: dict[str, str] | None, where: str) -> Record:
    """Turn one row into a Record.

    Args:
        row: the row's fields by name.
        columns: record part → column name (`prompt`, `response`, …); None recognises fields by name.
        where: the row's place (file and line) for error messages.

    Raises:
        BadInput: a conversation that is not a list of {role, content} or {from, value} objects.
    """
    parts = {part: row.get(name) for part, name in columns.items()} if columns else _recognised(row)
    if "messages" in parts:
        return _conversation(parts["messages"], parts.get("system"), where)
    if "prompt" in parts or "response" in parts:
        prompt, extra = _string(parts.get("prompt")), _string(parts.get("input"))
        if extra.strip():
            prompt = f"{prompt}\n\n{extra}"
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": _string(parts.get("response"))}]
        return Record(messages=_with_system(messages, parts.get("system")))
    if "text" in parts:
        return Record(text=_string(parts["text"]))
    return Record(drop=NO_KNOWN_FIELDS)


def _recognised(row: dict) -> dict:
    parts = {}
    for part, names in FIELD_NAMES.items():
        for name in names:
            value = row.get(name)
            # A null means the row does not use that field, but a null `text` still counts: the record is then
            # dropped as `empty` rather than as an unknown format.
            if value is None and not (part == "text" and name in row):
                continue
            if part == "messages" and value == "":
                continue  # an empty CSV cell: this row is not a conversation
            parts[part] = value
            break
    return parts


def _string(value) -> str:
    return "" if value is None else str(value)


def _first(message: dict, *names: str):
    return next((message[n] for n in names if message.get(n) is not None), None)


def _with_system(messages: list[dict], system) -> list[dict]:
    system = _string(system)
    if system.strip() and not (messages and messages[0]["role"] == "system"):
        return [{"role": "system", "content": system}, *messages]
    return messages


def _conversation(value, system, where: str) -> Record:
    if value is None or (isinstance(value, str) and not value.strip()):
        value = []
    elif isinstance(value, str):  # a CSV cell holds the conversation as JSON text
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise BadInput(f"{where}: `messages` is not valid JSON ({err.msg})") from None
    shape = f"{where}: a conversation (`messages`, `conversations`) must be a list of {{role, content}} or {{from, value}} objects"
    if not isinstance(value, list):
        raise BadInput(shape)
    messages = []
    for message in value:
        if not isinstance(message, dict):
            raise BadInput(shape)
        role, content = _first(message, "role", "from"), _first(message, "content", "value")
        if not isinstance(role, str) or not isinstance(content, str):
            raise BadInput(shape)
        if role.strip().lower() not in ROLES:
            return Record(drop=UNKNOWN_ROLE)
        messages.append({"role": ROLES[role.strip().lower()], "content": content})
    return Record(messages=_with_system(messages, system))
