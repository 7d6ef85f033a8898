"""Conversation agent: Qwen2.5-Omni (local GGUF) or SOLAR, with Home Assistant's tools."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
import json
from typing import Any, Literal

from homeassistant.components import conversation
from homeassistant.components.conversation.models import AbstractConversationAgent
from homeassistant.const import MATCH_ALL
from homeassistant.core import HomeAssistant
from homeassistant.exceptions import HomeAssistantError
from homeassistant.helpers import llm
from homeassistant.helpers.entity_platform import AddConfigEntryEntitiesCallback
import probatio

from . import SaraiConfigEntry
from .const import (
    CONF_LLM_HASS_API,
    CONF_MAX_TOKENS,
    CONF_PROMPT,
    CONF_TEMPERATURE,
    DEFAULT_MAX_TOKENS,
    DEFAULT_PROMPT,
    DEFAULT_TEMPERATURE,
    DOMAIN,
    MAX_TOOL_ITERATIONS,
)
from .engine import ChatDelta, ChatMessage, ChatRequest, RouteInfo, ToolCall, ToolSpec
from .engine.errors import EngineError
from .entity import SaraiEntity
from .errors import to_ha_error

PARALLEL_UPDATES = 0


async def async_setup_entry(
    hass: HomeAssistant, entry: SaraiConfigEntry, async_add_entities: AddConfigEntryEntitiesCallback
) -> None:
    """Add the conversation agent."""
    async_add_entities([SaraiConversationEntity(entry)])


def format_tool(tool: llm.Tool, custom_serializer: Any) -> ToolSpec:
    """Convert a Home Assistant tool with the same converter core's LLM integrations use."""
    schema = probatio.to_openapi(tool.parameters, custom_serializer=custom_serializer, openapi_version="3.1.0")
    return ToolSpec(name=tool.name, description=tool.description or "", parameters=schema)


def chat_log_messages(chat_log: conversation.ChatLog) -> list[ChatMessage]:
    """The chat log as engine messages."""
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


class SaraiConversationEntity(conversation.ConversationEntity, AbstractConversationAgent, SaraiEntity):
    """SARAi as an Assist conversation agent."""

    _attr_name = None
    _attr_supports_streaming = True

    def __init__(self, entry: SaraiConfigEntry) -> None:
        """Create the agent."""
        SaraiEntity.__init__(self, entry, "conversation")
        if entry.options.get(CONF_LLM_HASS_API, [llm.LLM_API_ASSIST]):
            self._attr_supported_features = conversation.ConversationEntityFeature.CONTROL

    @property
    def supported_languages(self) -> list[str] | Literal["*"]:
        """Qwen2.5-Omni is multilingual."""
        return MATCH_ALL

    async def async_added_to_hass(self) -> None:
        """Register as agent."""
        await super().async_added_to_hass()
        conversation.async_set_agent(self.hass, self.entry, self)

    async def async_will_remove_from_hass(self) -> None:
        """Unregister."""
        conversation.async_unset_agent(self.hass, self.entry)
        await super().async_will_remove_from_hass()

    async def _async_handle_message(
        self, user_input: conversation.ConversationInput, chat_log: conversation.ChatLog
    ) -> conversation.ConversationResult:
        """Answer one turn."""
        options = self.entry.options
        try:
            await chat_log.async_provide_llm_data(
                user_input.as_llm_context(DOMAIN),
                options.get(CONF_LLM_HASS_API, [llm.LLM_API_ASSIST]) or None,
                options.get(CONF_PROMPT, DEFAULT_PROMPT),
                user_input.extra_system_prompt,
            )
        except conversation.ConverseError as err:
            return err.as_conversation_result()
        decision = self.engine.decide(user_input.text)
        route = RouteInfo(route=decision.route, reason=decision.reason)
        await self.async_handle_chat_log(chat_log, route)
        result = conversation.async_get_result_from_chat_log(user_input, chat_log)
        chat_log.async_trace({"sarai_route": route.as_dict()})
        self.hass.bus.async_fire(f"{DOMAIN}_route", route.as_dict())
        return result

    async def async_handle_chat_log(
        self, chat_log: conversation.ChatLog, route: RouteInfo, json_schema: dict[str, Any] | None = None
    ) -> None:
        """Run the model until it stops calling tools (shared with AI Task)."""
        options = self.entry.options
        tools: list[ToolSpec] = []
        if chat_log.llm_api:
            tools = [format_tool(t, chat_log.llm_api.custom_serializer) for t in chat_log.llm_api.tools]
        for _ in range(MAX_TOOL_ITERATIONS):
            request = ChatRequest(
                messages=chat_log_messages(chat_log),
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
