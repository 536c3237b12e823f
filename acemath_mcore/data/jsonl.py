"""Reading conversation JSONL (AceMath-Instruct-Training-Data schema and prompt/response pairs) with exact
``file:line`` locations, so every rejected line can be found and fixed.

Accepted line schemas:
- ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...], "answer": ...}`` (extra keys ignored);
- ``{"prompt": str, "response": str, "system": str (optional)}``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

ROLES = ("system", "user", "assistant")


class Reason:
    """Why a line was rejected; the same names key the counts in the stats JSON."""

    INVALID_UTF8 = "invalid_utf8"
    INVALID_JSON = "invalid_json"
    NOT_AN_OBJECT = "not_an_object"
    UNRECOGNIZED_SCHEMA = "unrecognized_schema"
    BAD_MESSAGE = "bad_message"
    MISSING_ROLE = "missing_role"
    UNKNOWN_ROLE = "unknown_role"
    MISPLACED_SYSTEM = "misplaced_system"
    EMPTY_ASSISTANT_TURN = "empty_assistant_turn"
    NO_ASSISTANT_TURN = "no_assistant_turn"
    SPECIAL_TOKEN_IN_CONTENT = "special_token_in_content"


class DataError(ValueError):
    """A bad input line; ``str()`` reads ``file:line: reason: detail``."""

    def __init__(self, where: str, reason: str, detail: str):
        super().__init__(where, reason, detail)
        self.where, self.reason, self.detail = where, reason, detail

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}: {self.detail}"


def dropped_path(prefix: str) -> Path:
    """``<prefix>_dropped.jsonl``: every input preprocessing dropped, one :func:`drop_line` each."""
    return Path(prefix + "_dropped.jsonl")


def drop_line(where: str, reason: str, detail: str) -> str:
    return json.dumps({"where": where, "reason": reason, "detail": detail}) + "\n"


@dataclass
class Conversation:
    """One validated training sample."""

    where: str
    messages: list[dict]  # {"role", "content"} only, roles validated

    @property
    def prompt(self) -> str:
        """The user side of the conversation (all user turns), the unit of dedup and decontamination."""
        return "\n".join(m["content"] for m in self.messages if m["role"] == "user")

    @property
    def final_response(self) -> str:
        return next(m["content"] for m in reversed(self.messages) if m["role"] == "assistant")

    @property
    def responses(self) -> list[str]:
        return [m["content"] for m in self.messages if m["role"] == "assistant"]


def _messages_of(record: dict, where: str) -> list:
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(where, Reason.UNRECOGNIZED_SCHEMA, "'messages' must be a non-empty list")
        last = messages[-1]
        if "answer" in record and isinstance(last, dict) and last.get("role") == "user":
            # nvidia/AceMath-Instruct-Training-Data: 'messages' holds the prompt turns, 'answer' the response.
            if not isinstance(record["answer"], str):
                raise DataError(where, Reason.BAD_MESSAGE, f"'answer' is a {type(record['answer']).__name__}, not a "
                                                           "string")
            messages = messages + [{"role": "assistant", "content": record["answer"]}]
        return messages
    if "prompt" in record and "response" in record:
        messages = [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["response"]}]
        if record.get("system") is not None:
            messages.insert(0, {"role": "system", "content": record["system"]})
        return messages
    raise DataError(
        where, Reason.UNRECOGNIZED_SCHEMA, f"expected 'messages' or 'prompt'+'response', found keys {sorted(record)}"
    )


def validate_messages(raw_messages: list, where: str) -> list[dict]:
    """Check roles, order and contents; returns clean ``{"role", "content"}`` dicts or raises DataError."""
    messages = []
    for index, message in enumerate(raw_messages):
        if not isinstance(message, dict):
            raise DataError(where, Reason.BAD_MESSAGE, f"message {index} is a {type(message).__name__}, not an object")
        if "role" not in message:
            raise DataError(where, Reason.MISSING_ROLE, f"message {index} has no 'role'")
        role = message["role"]
        if role not in ROLES:
            raise DataError(where, Reason.UNKNOWN_ROLE, f"message {index} has role {role!r}; expected one of {ROLES}")
        content = message.get("content")
        if not isinstance(content, str):
            raise DataError(where, Reason.BAD_MESSAGE, f"message {index} ({role}) content is not a string")
        if not content.isascii():
            check_encodable(content, where, f"message {index} ({role})")
        if role == "system" and index != 0:
            raise DataError(where, Reason.MISPLACED_SYSTEM, f"system message at position {index}; only 0 is allowed")
        if role == "assistant" and not content.strip():
            raise DataError(where, Reason.EMPTY_ASSISTANT_TURN, f"message {index} (assistant) is empty")
        messages.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(where, Reason.NO_ASSISTANT_TURN, "conversation has no assistant turn to train on")
    return messages


def check_encodable(text: str, where: str, what: str) -> None:
    """JSON may escape half of a surrogate pair (a cut-off emoji, ``"\\ud83d"``): valid JSON, but no tokenizer
    can encode it, and one such string would otherwise stop a whole batch far from its line."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise DataError(where, Reason.INVALID_UTF8, f"{what} holds an unpaired surrogate "
                                                     f"{text[error.start]!r} at character {error.start}") from None


def parse_json_line(raw: bytes, where: str) -> dict:
    """Decode one JSONL line into an object or raise DataError (UTF-8, JSON, object-ness)."""
    try:
        text = raw.decode("utf-8").removeprefix("\ufeff")  # the byte-order mark some editors put before line 1
    except UnicodeDecodeError as error:
        raise DataError(where, Reason.INVALID_UTF8, f"byte {error.start}: {error.reason}") from None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(where, Reason.INVALID_JSON, f"{error.msg} at character {error.pos}") from None
    except (ValueError, RecursionError) as error:  # e.g. an integer beyond Python's 4300-digit limit, deep nesting
        raise DataError(where, Reason.INVALID_JSON, str(error).splitlines()[0]) from None
    if not isinstance(record, dict):
        raise DataError(where, Reason.NOT_AN_OBJECT, f"line holds a JSON {type(record).__name__}")
    return record


def parse_conversation(raw: bytes, where: str) -> Conversation:
    """One JSONL line → a validated Conversation, or DataError naming ``where``."""
    record = parse_json_line(raw, where)
    return Conversation(where, validate_messages(_messages_of(record, where), where))


@dataclass
class LineChunk:
    """Consecutive raw lines of one file, the unit of work handed to a preprocessing worker."""

    path: str
    first_line: int  # 1-based number of lines[0]
    lines: list[bytes]

    def located(self) -> Iterator[tuple[str, bytes]]:
        """(``file:line``, raw line) for every non-blank line."""
        for offset, raw in enumerate(self.lines):
            if raw.strip():
                yield f"{self.path}:{self.first_line + offset}", raw

    @property
    def num_bytes(self) -> int:
        return sum(len(raw) for raw in self.lines)


def iter_line_chunks(paths: Sequence[str | Path], lines_per_chunk: int) -> Iterator[LineChunk]:
    """Raw lines of several JSONL files in order, in chunks that never span two files."""
    for path in paths:
        with open(path, "rb") as handle:
            chunk = LineChunk(str(path), 1, [])
            for line_number, raw in enumerate(handle, start=1):
                chunk.lines.append(raw)
                if len(chunk.lines) == lines_per_chunk:
                    yield chunk
                    chunk = LineChunk(str(path), line_number + 1, [])
            if chunk.lines:
                yield chunk


def read_jsonl(path: str | Path) -> Iterator[tuple[str, dict]]:
    """(``file:line``, object) for every non-blank line; raises DataError on the first unreadable one."""
    for chunk in iter_line_chunks([path], lines_per_chunk=4096):
        for where, raw in chunk.located():
            yield where, parse_json_line(raw, where)
