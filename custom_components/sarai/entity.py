"""Base entities and the shared chat-log loop.

The engine's device ("SARAi") holds speech-to-text, text-to-speech and the status sensors. Every sub-entry
(an assistant or a camera analysis) has its own device, linked to the engine's, and its one entity is bound
to the sub-entry (``config_subentry_id``), so adding or removing one touches nothing else.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterable
import json
from typing import Any

from homeassistant.components import conversation
from homeassistant.config_entries import ConfigSubentry
from homeassistant.exceptions import HomeAssistantError
from homeassistant.helpers import llm
from homeassistant.helpers.device_registry import DeviceEntryType, DeviceInfo
from homeassistant.helpers.entity import Entity
import probatio

from . import SaraiConfigEntry
from .const import (
    CONF_HISTORY_TURNS,
    CONF_MAX_TOKENS,
    CONF_ROUTING_MODE,
    CONF_TEMPERATURE,
    DEFAULT_HISTORY_TURNS,
    DEFAULT_MAX_TOKENS,
    DEFAULT_TEMPERATURE,
    DOMAIN,
    EVENT_ROUTE,
    MAX_TOOL_ITERATIONS,
)
from .engine import ChatDelta, ChatMessage, ChatRequest, ChatTurn, RouteInfo, ToolCall, ToolSpec
from .engine.errors import EngineError
from .errors import to_ha_error


def engine_device(entry: SaraiConfigEntry) -> DeviceInfo:
    """The engine's device: speech-to-text, text-to-speech and the status sensors live on it."""
    return DeviceInfo(
        identifiers={(DOMAIN, entry.entry_id)},
        name="SARAi",
        manufacturer="SARAi",
        model="Qwen2.5-Omni",
        entry_type=DeviceEntryType.SERVICE,
    )


def subentry_device(entry: SaraiConfigEntry, subentry: ConfigSubentry, model: str) -> DeviceInfo:
    """A sub-entry's own device (an assistant or a camera analysis), bound to that sub-entry."""
    return DeviceInfo(
        identifiers={(DOMAIN, subentry.subentry_id)},
        name=subentry.title,
        manufacturer="SARAi",
        model=model,
        entry_type=DeviceEntryType.SERVICE,
    )


class SaraiEntity(Entity):
    """An entity of the engine's device."""

    _attr_has_entity_name = True

    def __init__(self, entry: SaraiConfigEntry, key: str) -> None:
        """Attach to the SARAi engine device."""
        self.entry = entry
        self.engine = entry.runtime_data.engine
        self._attr_unique_id = f"{entry.entry_id}_{key}"
        self._attr_device_info = engine_device(entry)


class SaraiSubentryEntity(Entity):
    """The one entity of a sub-entry, on the sub-entry's own device (unique id = the sub-entry's id)."""

    _attr_has_entity_name = True

    def __init__(self, entry: SaraiConfigEntry, subentry: ConfigSubentry, model: str) -> None:
        """Attach to the sub-entry's device."""
        self.entry = entry
        self.subentry = subentry
        self.engine = entry.runtime_data.engine
        self._attr_unique_id = subentry.subentry_id
        self._attr_device_info = subentry_device(entry, subentry, model)


def format_tool(tool: llm.Tool, custom_serializer: Any) -> ToolSpec:
    """Convert a Home Assistant tool with the same converter core's LLM integrations use."""
    return ToolSpec(
        name=tool.name,
        description=tool.description or "",
        parameters=to_json_schema(tool.parameters, custom_serializer),
    )


def to_json_schema(schema: Any, custom_serializer: Any = None) -> dict[str, Any]:
    """A probatio/voluptuous schema as JSON schema (OpenAPI 3.1 flavour)."""
    return dict(
        probatio.to_openapi(
            schema, custom_serializer=custom_serializer or llm.selector_serializer, openapi_version="3.1.0"
        )
    )


def chat_log_messages(chat_log: conversation.ChatLog, extra_context: str | None = None) -> list[ChatMessage]:
    """The chat log as engine messages; ``extra_context`` is appended to the last user message."""
    messages: list[ChatMessage] = []
    for content in chat_log.content:
        if isinstance(content, conversation.SystemContent):
            messages.append(ChatMessage("system", content.content))
        elif isinstance(content, conversation.UserContent):
            messages.append(ChatMessage("user", content.content))
        elif isinstance(content, conversation.AssistantContent):
            calls = [ToolCall(c.id, c.tool_name, dict(c.tool_args)) for c in content.tool_calls or []]
            messages.append(ChatMessage("assistant", content.content or "", tool_calls=calls))
        elif isinstance(content, conversation.ToolResultContent):
            messages.append(
                ChatMessage(
                    "tool",
                    json.dumps(content.result.data, default=str, ensure_ascii=False),
                    tool_call_id=content.tool_call_id,
                    name=content.tool_name,
                )
            )
    if extra_context:
        for message in reversed(messages):
            if message.role == "user":
                message.content = f"{message.content}\n\n{extra_context}"
                break
    return messages


async def transform_stream(stream: AsyncIterable[ChatDelta]) -> AsyncGenerator[conversation.AssistantContentDeltaDict]:
    """Engine deltas -> ChatLog deltas (tool calls become llm.ToolInput, executed by HA)."""
    yield {"role": "assistant"}
    async for delta in stream:
        out: conversation.AssistantContentDeltaDict = {}
        if delta.content:
            out["content"] = delta.content
        if delta.tool_calls:
            out["tool_calls"] = [
                llm.ToolInput(id=c.id, tool_name=c.name, tool_args=c.arguments) for c in delta.tool_calls
            ]
        if out:
            yield out


class SaraiLLMEntity(SaraiSubentryEntity):
    """An assistant (conversation agent or AI Task) of one sub-entry, running the shared engine over a ChatLog."""

    _attr_name = None  # the assistant is its device: "conversation.casa", "ai_task.sarai_ai_task"

    def chat_request(
        self,
        chat_log: conversation.ChatLog,
        json_schema: dict[str, Any] | None = None,
        extra_context: str | None = None,
    ) -> ChatRequest:
        """The engine request for the chat log as it stands, with this assistant's settings and tools."""
        options = self.subentry.data
        tools: list[ToolSpec] = []
        if chat_log.llm_api:
            tools = [format_tool(t, chat_log.llm_api.custom_serializer) for t in chat_log.llm_api.tools]
        return ChatRequest(
            messages=chat_log_messages(chat_log, extra_context),
            tools=tools,
            max_tokens=int(options.get(CONF_MAX_TOKENS, DEFAULT_MAX_TOKENS)),
            temperature=float(options.get(CONF_TEMPERATURE, DEFAULT_TEMPERATURE)),
            json_schema=json_schema,
            conversation_id=chat_log.conversation_id,
            routing_mode=options.get(CONF_ROUTING_MODE),
            history_turns=int(options.get(CONF_HISTORY_TURNS, DEFAULT_HISTORY_TURNS)),
            agent=self.subentry.title,
        )

    async def async_handle_chat_log(
        self,
        chat_log: conversation.ChatLog,
        json_schema: dict[str, Any] | None = None,
        extra_context: str | None = None,
    ) -> RouteInfo:
        """Run the model until it stops calling tools (HA executes them in between); return the last route.

        The engine decides the route of each call; this only reads it and announces it (``sarai_route``).
        """
        turn: ChatTurn | None = None
        try:
            for _ in range(MAX_TOOL_ITERATIONS):
                turn = self.engine.chat(self.chat_request(chat_log, json_schema, extra_context))
                try:
                    async for _content in chat_log.async_add_delta_content_stream(
                        self.entity_id, transform_stream(turn)
                    ):
                        pass
                except EngineError as err:
                    raise to_ha_error(err) from err
                if not chat_log.unresponded_tool_results:
                    if not isinstance(chat_log.content[-1], conversation.AssistantContent):
                        raise HomeAssistantError(translation_domain=DOMAIN, translation_key="empty_response")
                    return turn.route
            raise HomeAssistantError(translation_domain=DOMAIN, translation_key="too_many_tool_calls")
        finally:
            if turn is not None:  # once per turn: the trace, the event and the last-route sensor
                chat_log.async_trace({"sarai_route": turn.route.as_dict()})
                self.hass.bus.async_fire(EVENT_ROUTE, {**turn.route.as_dict(), "entity_id": self.entity_id})
