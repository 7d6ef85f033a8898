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
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
)
TOOLS_FOOTER = (
    "\n</tools>\n\nFor each function call, return a json object with function name and "
    "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
)


def render_tools(tools: Iterable[ToolSpec]) -> str:
    """The system-prompt block that offers ``tools`` to a Qwen model."""
    lines = [
        json.dumps(
            {
                "type": "function",
                "function": {"name": t.name, "description": t.description, "parameters": t.parameters},
            },
            ensure_ascii=False,
        )
        for t in tools
    ]
    return TOOLS_HEADER + "\n".join(lines) + TOOLS_FOOTER if lines else ""


def render_chatml(messages: list[ChatMessage], tools: list[ToolSpec]) -> str:
    """Render a conversation as Qwen ChatML text, ending with the assistant turn opener."""
    out: list[str] = []
    tool_block = render_tools(tools)
    msgs = list(messages)
    if tool_block:
        if msgs and msgs[0].role == "system":
            msgs[0] = ChatMessage(role="system", content=msgs[0].content + tool_block)
        else:
            msgs.insert(0, ChatMessage(role="system", content=tool_block.lstrip()))
    for msg in msgs:
        if msg.role == "tool":
            out.append(f"<|im_start|>user\n<tool_response>\n{msg.content}\n</tool_response><|im_end|>\n")
            continue
        body = msg.content
        for call in msg.tool_calls:
            body += (
                f"\n{TOOL_OPEN}\n"
                + json.dumps({"name": call.name, "arguments": call.arguments}, ensure_ascii=False)
                + f"\n{TOOL_CLOSE}"
            )
        out.append(f"<|im_start|>{msg.role}\n{body}<|im_end|>\n")
    out.append("<|im_start|>assistant\n")
    return "".join(out)


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
