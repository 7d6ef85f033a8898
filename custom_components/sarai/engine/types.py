"""Plain, serialisable values exchanged with the engine."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Role = Literal["system", "user", "assistant", "tool"]


@dataclass(slots=True)
class ToolCall:
    """A function call requested by a model."""

    id: str
    name: str
    arguments: dict[str, Any]


@dataclass(slots=True)
class ToolSpec:
    """A tool offered to the model: name, description, JSON schema of the arguments."""

    name: str
    description: str
    parameters: dict[str, Any]


@dataclass(slots=True)
class ChatMessage:
    """One message of a conversation."""

    role: Role
    content: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    tool_call_id: str | None = None
    name: str | None = None


@dataclass(slots=True)
class ChatRequest:
    """A chat completion request."""

    messages: list[ChatMessage]
    tools: list[ToolSpec] = field(default_factory=list)
    max_tokens: int = 256
    temperature: float = 0.7
    json_schema: dict[str, Any] | None = None
    conversation_id: str | None = None
    routing_mode: str | None = None  # None: the engine's configured mode
    agent: str | None = None  # the assistant asking (named in the route); None for internal work
    history_turns: int = 0  # past user turns kept (0: as many as the context holds)


@dataclass(slots=True)
class ChatDelta:
    """A piece of a streamed answer: text and/or complete tool calls."""

    content: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)


@dataclass(slots=True)
class BackendStatus:
    """What one backend is doing and what it costs."""

    name: str
    kind: str
    loaded: bool
    estimated_mb: int
    measured_mb: int | None
    last_used: float | None
    loads: int
    busy: bool


@dataclass(slots=True)
class EngineStatus:
    """A snapshot of the whole engine."""

    state: str
    budget_mb: int
    used_estimated_mb: int
    rss_mb: int
    backends: list[BackendStatus]
    capabilities: list[str]

    def as_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict."""
        return asdict(self)
