"""Base entities: one device "SARAi" for every platform, and the shared chat-log loop."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
import json
from typing import Any

from homeassistant.components import conversation
from homeassistant.exceptions import HomeAssistantError
from homeassistant.helpers import llm
from homeassistant.helpers.device_registry import DeviceEntryType, DeviceInfo
from homeassistant.helpers.entity import Entity
import probatio

from . import SaraiConfigEntry
from .const import (
    CONF_MAX_TOKENS,
    CONF_TEMPERATURE,
    DEFAULT_MAX_TOKENS,
    DEFAULT_TEMPERATURE,
    DOMAIN,
    MAX_TOOL_ITERATIONS,
)
from .engine import ChatDelta, ChatMessage, ChatRequest, RouteInfo, ToolCall, ToolSpec
from .engine.errors import EngineError
from .errors import to_ha_error


class SaraiEntity(Entity):
    """Common device info and naming."""

    _attr_has_entity_name = True

    def __init__(self, entry: SaraiConfigEntry, key: str) -> None:
        """Attach to the SARAi device."""
        self.entry = entry
        self.engine = entry.runtime_data.engine
        self._attr_unique_id = f"{entry.entry_id}_{key}"
        self._attr_device_info = DeviceInfo(
            identifiers={(DOMAIN, entry.entry_id)},
            name="SARAi",
            manufacturer="SARAi",
            model="Qwen2.5-Omni",
            entry_type=DeviceEntryType.SERVICE,
        )


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


async def transform_stream(stream: AsyncIterator[ChatDelta]) -> AsyncGenerator[conversation.AssistantContentDeltaDict]:
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


class SaraiLLMEntity(SaraiEntity):
    """An entity that runs the model over a ChatLog (conversation and AI Task)."""

    async def async_handle_chat_log(
        self,
        chat_log: conversation.ChatLog,
        route: RouteInfo,
        json_schema: dict[str, Any] | None = None,
        extra_context: str | None = None,
    ) -> None:
        """Run the model until it stops calling tools; HA executes the tools in between."""
        options = self.entry.options
        tools: list[ToolSpec] = []
        if chat_log.llm_api:
            tools = [format_tool(t, chat_log.llm_api.custom_serializer) for t in chat_log.llm_api.tools]
        for _ in range(MAX_TOOL_ITERATIONS):
            request = ChatRequest(
                messages=chat_log_messages(chat_log, extra_context),
                tools=tools,
                max_tokens=int(options.get(CONF_MAX_TOKENS, DEFAULT_MAX_TOKENS)),
                temperature=float(options.get(CONF_TEMPERATURE, DEFAULT_TEMPERATURE)),
                json_schema=json_schema,
                conversation_id=chat_log.conversation_id,
            )
            try:
                async for _content in chat_log.async_add_delta_content_stream(
                    self.entity_id, transform_stream(self.engine.chat(request, route))
                ):
                    pass
            except EngineError as err:
                raise to_ha_error(err) from err
            if not chat_log.unresponded_tool_results:
                if not isinstance(chat_log.content[-1], conversation.AssistantContent):
                    raise HomeAssistantError(translation_domain=DOMAIN, translation_key="empty_response")
                return
        raise HomeAssistantError(translation_domain=DOMAIN, translation_key="too_many_tool_calls")
