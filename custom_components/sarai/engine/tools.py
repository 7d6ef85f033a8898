"""Qwen's native tool-call format: prompt rendering and robust streaming parsing."""

from __future__ import annotations

from collections.abc import Iterable
import json
import re
from typing import Any
import uuid

from .types import ChatDelta, ChatMessage, ToolCall, ToolSpec

TOOL_OPEN = "<tool_call>"
TOOL_CLOSE = "</tool_call>"

TOOLS_HEADER = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
)
TOOLS_FOOTER = (
    "\n</tools>\n\nFor each function call, return a json object with function name and "
    "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
)


Segment = tuple[str, bool]
"""A piece of prompt text and whether it may hold special tokens (only SARAi's own template does)."""


def tool_segments(tools: Iterable[ToolSpec]) -> list[Segment]:
    """The system-prompt block that offers ``tools`` to a Qwen model (the tools' JSON is plain text)."""
    out: list[Segment] = []
    for tool in tools:
        line = json.dumps(
            {
                "type": "function",
                "function": {"name": tool.name, "description": tool.description, "parameters": tool.parameters},
            },
            ensure_ascii=False,
        )
        out += [("\n", True), (line, False)] if out else [(TOOLS_HEADER, True), (line, False)]
    return [*out, (TOOLS_FOOTER, True)] if out else []


# Home Assistant appends this sentence to the system prompt when no GetDateTime tool is offered
# (helpers/llm.py DATE_TIME_PROMPT, after the instructions and the LLM API's prompt; only the extra
# system prompt comes after it). It changes every second.
# The start of the rewritten clock sentence that stays the same all day (what a prefill may keep).
DAY_PREFIX = re.compile(r"Today's date is \d{4}-\d{2}-\d{2}\. Current time is")
DATE_TIME = re.compile(
    r"Current time is (?P<time>\d{1,2}:\d{2}(?::\d{2})?)\. Today's date is (?P<date>\d{4}-\d{2}-\d{2})\."
)


def split_system(text: str) -> tuple[str, str]:
    """(static, dynamic) parts of a system prompt.

    The dynamic part is Home Assistant's date/time sentence and whatever follows it (the extra
    system prompt); it is rewritten date first, so that only the clock's digits change from one
    turn to the next. Without that sentence the whole text is static.
    """
    matches = list(DATE_TIME.finditer(text))
    if not matches:
        return text, ""
    match = matches[-1]
    static = text[: match.start()].rstrip()
    extra = text[match.end() :].strip()
    clock = f"Today's date is {match['date']}. Current time is {match['time']}."
    return static, f"{extra}\n{clock}" if extra else clock


def system_parts(system: ChatMessage | None, tools: list[ToolSpec]) -> tuple[list[Segment], list[Segment]]:
    """The system turn as (static prefix, dynamic tail): static first, so that it is a stable prompt prefix.

    Order: the tools block, then the system prompt's static text, then its dynamic part (the
    date/time sentence, the extra system prompt) and the end of the turn (in the prefix when there
    is no dynamic part). What the system message and the tools hold is plain text; only SARAi's
    template is special.
    """
    block = tool_segments(tools)
    if system is None and not block:
        return [], []
    static, dynamic = split_system(system.content) if system is not None else ("", "")
    head: list[Segment] = [("<|im_start|>system\n", True), *block]
    if static:
        head += [("\n\n", True), (static, False)] if block else [(static, False)]
    end: list[Segment] = [("<|im_end|>\n", True)]
    if not dynamic:
        return head + end, []
    return head, ([("\n", True)] if len(head) > 1 else []) + [(dynamic, False), *end]


def system_segments(system: ChatMessage | None, tools: list[ToolSpec]) -> list[Segment]:
    """The system turn (see ``system_parts``), or nothing at all."""
    head, tail = system_parts(system, tools)
    return head + tail


def message_segments(msg: ChatMessage) -> list[Segment]:
    """One message in ChatML: the markers are special, what the message holds is plain text."""
    if msg.role == "tool":
        return [
            ("<|im_start|>user\n<tool_response>\n", True),
            (msg.content, False),
            ("\n</tool_response><|im_end|>\n", True),
        ]
    out: list[Segment] = [(f"<|im_start|>{msg.role}\n", True), (msg.content, False)]
    for call in msg.tool_calls:
        args = json.dumps({"name": call.name, "arguments": call.arguments}, ensure_ascii=False)
        out += [(f"\n{TOOL_OPEN}\n", True), (args, False), (f"\n{TOOL_CLOSE}", True)]
    out.append(("<|im_end|>\n", True))
    return out


ASSISTANT_OPENER: list[Segment] = [("<|im_start|>assistant\n", True)]


def chatml_segments(messages: list[ChatMessage], tools: list[ToolSpec]) -> list[list[Segment]]:
    """The conversation as ChatML segments, one list per message (the system turn first, the opener last)."""
    msgs = list(messages)
    system = msgs.pop(0) if msgs and msgs[0].role == "system" else None
    head = system_segments(system, tools)
    return ([head] if head else []) + [message_segments(m) for m in msgs] + [ASSISTANT_OPENER]


def render_chatml(messages: list[ChatMessage], tools: list[ToolSpec]) -> str:
    """Render a conversation as Qwen ChatML text, ending with the assistant turn opener."""
    return "".join(text for part in chatml_segments(messages, tools) for text, _ in part)


def parse_tool_call(text: str) -> ToolCall | None:
    """Parse the JSON inside one <tool_call> block; tolerate code fences and trailing junk."""
    body = text.strip()
    body = re.sub(r"^```(?:json)?|```$", "", body).strip()
    start = body.find("{")
    if start < 0:
        return None
    try:
        obj, _ = json.JSONDecoder().raw_decode(body[start:])
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args: Any = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            args = {}
    if not isinstance(args, dict):
        args = {}
    return ToolCall(id=f"call_{uuid.uuid4().hex[:12]}", name=obj["name"], arguments=args)


class ToolCallStreamParser:
    """Split a stream of model text into visible content and complete tool calls."""

    def __init__(self) -> None:
        """Start with an empty buffer."""
        self._buf = ""
        self._in_call = False

    def feed(self, text: str) -> ChatDelta:
        """Consume text; return what can be shown now."""
        self._buf += text
        delta = ChatDelta()
        while True:
            if self._in_call:
                end = self._buf.find(TOOL_CLOSE)
                if end < 0:
                    return delta
                call = parse_tool_call(self._buf[:end])
                if call is not None:
                    delta.tool_calls.append(call)
                self._buf = self._buf[end + len(TOOL_CLOSE) :]
                self._in_call = False
                continue
            start = self._buf.find(TOOL_OPEN)
            if start >= 0:
                delta.content += self._buf[:start]
                self._buf = self._buf[start + len(TOOL_OPEN) :]
                self._in_call = True
                continue
            # Keep a possible partial "<tool_call>" at the end of the buffer.
            keep = 0
            for n in range(min(len(TOOL_OPEN) - 1, len(self._buf)), 0, -1):
                if TOOL_OPEN.startswith(self._buf[-n:]):
                    keep = n
                    break
            delta.content += self._buf[: len(self._buf) - keep]
            self._buf = self._buf[len(self._buf) - keep :]
            return delta

    def finish(self) -> ChatDelta:
        """Flush at the end of the stream (an unterminated call is parsed if it can be)."""
        delta = ChatDelta()
        if self._in_call:
            call = parse_tool_call(self._buf)
            if call is not None:
                delta.tool_calls.append(call)
        else:
            delta.content = self._buf
        self._buf = ""
        self._in_call = False
        return delta
