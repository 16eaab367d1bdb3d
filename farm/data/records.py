"""Record schemas: one tenant record (already parsed) -> chat turns or plain text.

Accepted schemas (``data.format``; ``auto`` detects it from the first record)::

    chat        {"messages": [{"role": "system|user|assistant|tool", "content": "..."}, ...],
                 "tools": [...]}                      OpenAI chat, tool calls included
    sharegpt    {"conversations": [{"from": "system|human|gpt", "value": "..."}, ...]}
    alpaca      {"instruction": "...", "input": "... (optional)", "output": "..."}
    completion  {"prompt": "...", "completion": "..."}
    text        {"text": "..."}                       every token is trained on

Role names seen in the wild are mapped explicitly (``ROLE_ALIASES``); anything else is refused
with the field path. Every problem is a ``RecordError`` carrying the field's JSON path
(``messages[2].content``: list indices as jq and JSON Schema tools print them) and a reason in
JSON's words (``null``, ``a number``), never Python's (``NoneType``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from farm.jsonwords import kind

#: Role names from the exports users bring, mapped to the chat template's roles. Explicit on
#: purpose: an unknown role is an error, never a guess.
ROLE_ALIASES = {
    "system": "system", "developer": "system",               # OpenAI's newer name for system
    "user": "user", "human": "user",                          # ShareGPT
    "assistant": "assistant", "gpt": "assistant", "bot": "assistant",
    "model": "assistant",                                     # Gemini
    "tool": "tool", "function": "tool",                       # OpenAI's legacy function results
}


class RecordError(ValueError):
    """A problem inside one record (the caller adds tenant, file and line)."""

    def __init__(self, field_name: str | None, reason: str):
        self.field, self.reason = field_name, reason
        super().__init__(f"field '{field_name}': {reason}" if field_name else reason)

    def __reduce__(self):  # pickled by worker processes (farm.data.parallel) with both fields
        return (self.__class__, (self.field, self.reason))


class NothingToLearn(RecordError):
    """A well-formed record without a single assistant turn: counted and reported, not an error."""


@dataclass(frozen=True)
class Chat:
    """A normalised conversation: template-ready message dicts and the tools it may call."""

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None

    @property
    def uses_tools(self) -> bool:
        return bool(self.tools) or any("tool_calls" in m or m["role"] == "tool" for m in self.messages)


@dataclass(frozen=True)
class JsonText:
    """One JSON Lines line, parsed where its batch is prepared (possibly a worker process)."""

    text: str
    hint: str = ""  # added to a parse error (what a .json file must hold)


def parse_json(item: JsonText) -> Any:
    """The record a JSON Lines line holds; ``RecordError`` when it is not JSON."""
    try:
        return json.loads(item.text)
    except json.JSONDecodeError as exc:
        raise RecordError(None, f"invalid JSON: {exc.msg} at column {exc.colno}{item.hint}") from None


def detect_format(record: Any) -> str | None:
    """The schema a record looks like, or None."""
    if not isinstance(record, dict):
        return None
    if "messages" in record:
        return "chat"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "prompt" in record and "completion" in record:
        return "completion"
    if "text" in record:
        return "text"
    return None


def _string(value: Any, field_name: str, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise RecordError(field_name, f"expected a string, got {kind(value)}")
    if not allow_empty and not value.strip():
        raise RecordError(field_name, "is empty")
    return value


def _required(record: dict, key: str) -> Any:
    if key not in record:
        raise RecordError(key, "missing")
    return record[key]


def normalize_record(record: Any, fmt: str) -> Chat | str:
    """Turn one record of schema ``fmt`` into a ``Chat`` (or plain text for ``text``)."""
    if not isinstance(record, dict):
        raise RecordError(None, f"expected a JSON object, got {kind(record)}")
    if fmt == "text":
        return _string(_required(record, "text"), "text")
    if fmt == "alpaca":
        instruction = _string(_required(record, "instruction"), "instruction")
        output = _string(_required(record, "output"), "output")
        extra = record.get("input")
        if extra is not None:
            extra = _string(extra, "input", allow_empty=True)
        prompt = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
        return Chat([{"role": "user", "content": prompt}, {"role": "assistant", "content": output}])
    if fmt == "completion":
        prompt = _string(_required(record, "prompt"), "prompt")
        completion = _string(_required(record, "completion"), "completion")
        return Chat([{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}])
    if fmt == "chat":
        chat = Chat([_message(turn, f"messages[{i}]", "role", "content")
                     for i, turn in enumerate(_turns(record, "messages"))], _tools(record))
    elif fmt == "sharegpt":
        chat = Chat([_message(turn, f"conversations[{i}]", "from", "value")
                     for i, turn in enumerate(_turns(record, "conversations"))], _tools(record))
    else:
        raise RecordError(None, f"unknown format {fmt!r}")
    if not any(m["role"] == "assistant" for m in chat.messages):
        key = "messages" if fmt == "chat" else "conversations"
        raise NothingToLearn(key, "has no assistant turn to learn from")
    return chat


def _turns(record: dict, key: str) -> list:
    turns = _required(record, key)
    if isinstance(turns, str):  # a CSV cell or a double-encoded export
        try:
            turns = json.loads(turns)
        except json.JSONDecodeError as exc:
            raise RecordError(key, f"a string that is not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(turns, list) or not turns:
        raise RecordError(key, f"expected a non-empty list of turns, got {kind(turns) if turns != [] else 'an empty list'}")
    return turns


def _tools(record: dict) -> list[dict] | None:
    tools = record.get("tools")
    if tools is None:
        return None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as exc:
            raise RecordError("tools", f"a string that is not valid JSON ({exc.msg})") from None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise RecordError("tools", f"expected a list of tool definitions (objects), got {kind(tools)}")
    return tools or None


def _message(turn: Any, where: str, role_key: str, content_key: str) -> dict[str, Any]:
    if not isinstance(turn, dict):
        raise RecordError(where, f"expected an object, got {kind(turn)}")
    raw_role = _required_at(turn, role_key, where)
    if not isinstance(raw_role, str) or raw_role.lower() not in ROLE_ALIASES:
        shown = raw_role if isinstance(raw_role, str) else kind(raw_role)
        raise RecordError(f"{where}.{role_key}", f"unknown role {shown!r}; expected one of "
                                                 f"{', '.join(sorted(ROLE_ALIASES))}")
    role = ROLE_ALIASES[raw_role.lower()]
    message: dict[str, Any] = {"role": role}
    calls = turn.get("tool_calls")
    if calls is not None:
        if role != "assistant":
            raise RecordError(f"{where}.tool_calls", f"only assistant turns call tools (this one is {raw_role!r})")
        message["tool_calls"] = _tool_calls(calls, f"{where}.tool_calls")
    content = _required_at(turn, content_key, where) if not calls else turn.get(content_key)
    message["content"] = _content(content, f"{where}.{content_key}", allow_null=bool(calls))
    if role == "tool":
        for key in ("tool_call_id", "name"):
            if turn.get(key) is not None:
                message[key] = _string(turn[key], f"{where}.{key}")
    return message


def _required_at(turn: dict, key: str, where: str) -> Any:
    if key not in turn:
        raise RecordError(f"{where}.{key}", "missing")
    return turn[key]


def _content(value: Any, where: str, allow_null: bool) -> str:
    if value is None and allow_null:
        return ""
    if isinstance(value, list):  # OpenAI content parts: text only
        texts = []
        for index, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text":
                what = part.get("type") if isinstance(part, dict) else kind(part)
                raise RecordError(f"{where}[{index}]", f"content part {what!r} is not supported; only text parts are")
            texts.append(_string(part.get("text"), f"{where}[{index}].text", allow_empty=True))
        value = "\n".join(texts)
    if value is None:
        raise RecordError(where, "is null (allowed only in an assistant turn that has tool_calls)")
    return _string(value, where)


def _tool_calls(calls: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(calls, list) or not calls:
        raise RecordError(where, f"expected a non-empty list of tool calls, got {kind(calls)}")
    out = []
    for index, call in enumerate(calls):
        at = f"{where}[{index}]"
        if not isinstance(call, dict):
            raise RecordError(at, f"expected an object, got {kind(call)}")
        function = call.get("function")
        if not isinstance(function, dict):
            raise RecordError(f"{at}.function", f"expected an object with 'name' and 'arguments', got {kind(function)}")
        name = _string(function.get("name"), f"{at}.function.name")
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):  # OpenAI sends arguments as a JSON string; templates want an object
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError as exc:
                raise RecordError(f"{at}.function.arguments", f"not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(arguments, dict):
            raise RecordError(f"{at}.function.arguments", f"expected an object, got {kind(arguments)}")
        entry: dict[str, Any] = {"type": "function", "function": {"name": name, "arguments": arguments}}
        if isinstance(call.get("id"), str):
            entry["id"] = call["id"]
        out.append(entry)
    return out
